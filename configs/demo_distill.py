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
test top-1 per seed; docs/distillation.md has the measured figures and the time.

The top-level keys are configs/demo.py's (the demo's stages); `distill_demo.recipe` is the distillation
stage's config (configs/distill.py's keys; teacher, dataset, unlabeled, shots and seed are set per seed),
e.g. --config.distill_demo.recipe.schedule=[40,80,120,160,200].
"""

import pathlib

import ml_collections

from bit import config

demo = config.load_module(pathlib.Path(__file__).with_name('demo.py'))  # the sibling configs/demo.py
distill = config.load_module(pathlib.Path(__file__).with_name('distill.py'))


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The distillation demo config; `arg` is unused."""
  c = demo.get_config()
  r = distill.get_config('R26x1')  # the student, from random init (the scratch baseline's architecture)
  r.batch_size = 50
  r.base_lr = 0.01  # the demo's pretraining lr: also a from-scratch run
  r.schedule = (80, 160, 240, 320, 400)  # "patient": the labels-only run takes 100 steps of batch 10
  r.resize, r.crop = c.resize, c.crop  # 32 px scans, random 32 px crops of 36 px
  r.mixup_alpha = 1.0  # the paper's MixUp, Beta(1, 1), on every batch ("consistent")
  r.temperature = 1.0
  r.label_weight = 0.0  # the teacher alone; the 10 shots per class are in the batches, their labels unused
  r.eval_every = 0
  r.checkpoint_every = 100
  r.log_every = 10
  d = ml_collections.ConfigDict()
  d.demo_workdir = ''  # a configs/demo.py workdir whose stages are reused; '' = WORKDIR/demo
  d.recipe = r
  with c.unlocked():
    c.distill_demo = d
  c.lock()
  return c
