"""bit-bench offline, on the demo's digits: does a pretrained checkpoint beat scratch, over shots and seeds?

  bit-bench --config configs/bench_demo.py --workdir /tmp/bit_bench_demo

Runs the demo's recipe (configs/demo.py) as a grid: the demo's R26x1 pretrained on digits 0-4
(`demo:pretrained`, trained once in WORKDIR/pretrain), the same architecture from scratch (`R26x1`), and the
official BiT-M-R50x1 (downloaded; marked `unavailable` when there is no network), each fine-tuned on digits
5-9 (`demo:digits5-9`) with 1 and 5 examples per class, 3 seeds; results in WORKDIR/results.md and
results.csv. There is no official figure for these cells; what it measured, and how long it took, is in the
docs/benchmarks.md (The offline grid).

Smaller: --config.grids.digits.seeds=(0,) --config.grids.digits.examples_per_class=(5,)
"""

import pathlib

import ml_collections

from bit import config

demo_config = config.load_module(pathlib.Path(__file__).with_name('demo.py'))  # the sibling configs/demo.py


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The offline bench config; `arg` is unused."""
  demo = demo_config.get_config()
  c = ml_collections.ConfigDict()
  # The training config of every cell: the demo's few-shot recipe (each cell sets model, dataset, shots, seed).
  base = config.get_config()
  for key in base:
    base[key] = demo[key]
  c.base = base
  c.demo = demo.demo  # the demo's data export and pretraining stage, for the demo: names
  c.grids = ml_collections.ConfigDict()
  c.grids.digits = ml_collections.ConfigDict(
    dict(
      models=('demo:pretrained', 'R26x1', 'BiT-M-R50x1'),
      datasets=('demo:digits5-9',),
      examples_per_class=(1, 5),  # 0 = the full train split
      seeds=(0, 1, 2),
      overrides=ml_collections.ConfigDict(),  # base keys set for this grid only, e.g. {'base_lr': 0.003}
    )
  )
  c.lock()
  return c
