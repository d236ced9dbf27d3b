"""Oxford-IIIT Pet: 37 breeds, 3,680 training images, 3,669 test images.

  bit-train --config configs/oxford_iiit_pet.py --workdir /tmp/bit_oxford_iiit_pet
  bit-train --config configs/oxford_iiit_pet.py:BiT-M-R101x3 --workdir /tmp/bit_oxford_iiit_pet_r101x3   # another model

The paper's figure (Table 1, BiT-M = R152x4): 94.47% top-1; BiT-L 96.62%. Expect ~1-3 points less with
BiT-M-R50x1.

The hyper-rule picks the rest: resize 512 / crop 224 (the paper: 480; --config.crop=480),
no MixUp, 500 steps.
"""

from bit import config


def get_config(arg=None):
  """Returns the config; `arg` is the model name (default BiT-M-R50x1)."""
  c = config.get_config(arg)
  c.dataset = 'oxford_iiit_pet'
  c.eval_every = 100
  c.checkpoint_every = 100
  return c
