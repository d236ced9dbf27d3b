"""Oxford Flowers-102: 102 classes, 1,020 training images, 6,149 test images.

  bit-train --config configs/oxford_flowers102.py --workdir /tmp/bit_oxford_flowers102
  bit-train --config configs/oxford_flowers102.py:BiT-M-R101x3 --workdir /tmp/bit_oxford_flowers102_r101x3   # another model

The paper's figure (Table 1, BiT-M = R152x4 on ImageNet-21k): 99.30% top-1; BiT-L 99.63%. BiT-M-R50x1
is a few tenths to a point lower.

The hyper-rule picks the rest: resize 512 / crop 224 (the paper: 480; --config.crop=480),
no MixUp, 500 steps.
"""

from configs import common


def get_config(arg=None):
  """Returns the config; `arg` is the model name (default BiT-M-R50x1)."""
  c = common.get_config(arg)
  c.dataset = 'oxford_flowers102'
  c.eval_every = 100
  c.checkpoint_every = 100
  return c
