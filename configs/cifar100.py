"""CIFAR-100: 100 classes, 50,000 training and 10,000 test images of 32x32.

  bit-train --config configs/cifar100.py --workdir /tmp/bit_cifar100
  bit-train --config configs/cifar100.py:BiT-M-R101x3 --workdir /tmp/bit_cifar100_r101x3   # another model

The paper's figure (Table 1, BiT-M = R152x4): 92.17% top-1; BiT-L 93.51%. Expect about 86-88% with
BiT-M-R50x1.

The hyper-rule picks the rest: resize 160 / crop 128, MixUp alpha 0.1, 10,000 steps
([500, 3000, 6000, 9000, 10000]).
"""

from bit import config


def get_config(arg=None):
  """Returns the config; `arg` is the model name (default BiT-M-R50x1)."""
  c = config.get_config(arg)
  c.dataset = 'cifar100'
  c.eval_every = 1000
  c.checkpoint_every = 500
  return c
