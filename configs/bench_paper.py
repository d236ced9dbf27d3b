"""bit-bench with the official settings, for the published figures (needs the network, and accelerators).

  bit-bench --config configs/bench_paper.py --workdir /tmp/bit_bench_paper

Two grids, each cell a full BiT-HyperRule fine-tune (schedule, MixUp and resolution from the data):
- `cifar`: BiT-M-R50x1 on CIFAR-10 and CIFAR-100, 1 and 5 examples per class and the full train split,
  5 seeds, with the official README's documented variant batch 128 / lr 0.001 (its "Expected results"
  table, min <- median -> max of at least five runs: CIFAR-10 54.1 / 82.4 / 97.3, CIFAR-100 35.2 / 64.8 /
  86.4 for the Jax code).
- `paper`: BiT-M-R152x4 on Oxford-IIIT Pets and Oxford Flowers-102, the paper's recipe: batch 512,
  lr 0.003, crop 480 (resize 512). The paper's BiT-M figures: Pets 94.47, Flowers 99.30.
The R152x4 cells need large accelerators (use --config.base.accum_steps to fit memory); the paper's
hyper-rule batch for CIFAR is --config.grids.cifar.overrides.batch_size=512
--config.grids.cifar.overrides.base_lr=0.003.
"""

import ml_collections

from bit import config


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The paper bench config; `arg` is unused."""
  c = ml_collections.ConfigDict()
  c.base = config.get_config()  # the hyper-rule defaults: batch 512, lr 0.003, the rest from the data
  c.base.eval_every = 0
  c.base.checkpoint_every = 500
  c.base.log_every = 50
  c.grids = ml_collections.ConfigDict()
  c.grids.cifar = ml_collections.ConfigDict(
    dict(
      models=('BiT-M-R50x1',),
      datasets=('cifar10', 'cifar100'),
      examples_per_class=(1, 5, 0),  # 0 = the full train split
      seeds=(0, 1, 2, 3, 4),
      overrides=ml_collections.ConfigDict(dict(batch_size=128, base_lr=0.001)),
    )
  )
  c.grids.paper = ml_collections.ConfigDict(
    dict(
      models=('BiT-M-R152x4',),
      datasets=('oxford_iiit_pet', 'oxford_flowers102'),
      examples_per_class=(0,),
      seeds=(0,),
      overrides=ml_collections.ConfigDict(dict(batch_size=512, base_lr=0.003, crop=480, resize=512)),
    )
  )
  c.lock()
  return c
