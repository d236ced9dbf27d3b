"""The offline distillation demo: the digits demo's 10-shot fine-tune as the teacher, the rest of the digits 5-9
training scans as unlabeled images, and a student trained from scratch; on a CPU with no network.

  bit-distill --config configs/demo_distill.py --workdir /tmp/bit_distill_demo

It reuses the stages of the offline demo (configs/demo.py: pretraining on digits 0-4, the 10-shot fine-tunes
and the scratch baselines, for 3 seeds) when `distill_demo.demo_workdir` names a workdir of
`bit-train --config configs/demo.py` that holds them (with the same settings), else runs them in WORKDIR/demo.
Per seed it then distills that seed's fine-tune (the teacher, R26x1) into an R26x1 from random init: the
labeled 10 shots per class plus every other digits 5-9 training scan, without its label (the teacher gives
the targets). The labels-only baseline is the demo's scratch stage: the same architecture, from scratch, on
the same 10 shots per class. WORKDIR/distill.md and distill.json show teacher, distilled and labels-only
test top-1 per seed; the README has the measured figures and the time.

The top-level keys are configs/demo.py's (the demo's stages); `distill_demo.*` sets the distillation stage.
"""

import ml_collections

from configs import demo


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The distillation demo config; `arg` is unused."""
  c = demo.get_config()
  d = ml_collections.ConfigDict()
  d.demo_workdir = ''  # a configs/demo.py workdir whose stages are reused; '' = WORKDIR/demo
  d.student = 'R26x1'  # the student, from random init (the same architecture as the scratch baseline)
  d.steps = 400  # distillation steps per seed ("patient": the labels-only run takes 100)
  d.batch_size = 50
  d.base_lr = 0.01  # the pretraining stage's lr: also a from-scratch run
  d.mixup_alpha = 1.0  # the paper's MixUp, Beta(1, 1), on every batch ("consistent")
  d.temperature = 1.0
  d.label_weight = 0.0  # the teacher alone; the 10 shots per class are in the batches, their labels unused
  with c.unlocked():
    c.distill_demo = d
  c.lock()
  return c
