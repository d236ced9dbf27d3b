"""CIFAR-10: 10 classes, 50,000 training and 10,000 test images of 32x32.

  bit-train --config configs/cifar10.py --workdir /tmp/bit_cifar10
  bit-train --config configs/cifar10.py:BiT-M-R101x3 --workdir /tmp/bit_cifar10_r101x3   # another model

The paper's figure (Table 1, BiT-M = R152x4): 98.91% top-1; BiT-L 99.37%. Expect about 97% with
BiT-M-R50x1.

The hyper-rule picks the rest: resize 160 / crop 128, MixUp alpha 0.1, 10,000 steps
([500, 3000, 6000, 9000, 10000]).
"""

from bit import config


def get_config(arg=None):
  """Returns the config; `arg` is the model name (default BiT-M-R50x1)."""
  c = config.get_config(arg)
  c.dataset = 'cifar10'
  c.eval_every = 1000
  c.checkpoint_every = 500
  return c
