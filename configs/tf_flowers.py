"""tf_flowers: 3,670 flower photos in 5 classes (TFDS has only a train split).

  bit-train --config configs/tf_flowers.py --workdir /tmp/bit_tf_flowers
  bit-train --config configs/tf_flowers.py:BiT-M-R101x3 --workdir /tmp/bit_tf_flowers_r101x3   # another model

Not a benchmark of the paper. tf_flowers has no test split, so a seeded 10% holdout of train is the test
set. Expect about 97-99% top-1 with BiT-M-R50x1 (an estimate, not a published figure).

The hyper-rule picks the rest: resize 512 / crop 224, no MixUp (< 20k examples), 500 steps
([100, 200, 300, 400, 500]) at batch 512.
"""

from bit import config


def get_config(arg=None):
  """Returns the config; `arg` is the model name (default BiT-M-R50x1)."""
  c = config.get_config(arg)
  c.dataset = 'tf_flowers'
  c.eval_every = 100
  c.checkpoint_every = 100
  return c
