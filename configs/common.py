"""The default config as a file to pass: every training config key at its default (`bit.config.DEFAULTS`, in
bit/config.py, lists each key with its default and what it means); the base of the per-dataset configs.

Runs on its own with overrides:

  bit-train --config configs/common.py --workdir /tmp/flowers \
      --config.dataset=tf_flowers --config.model=BiT-M-R50x1

Keys left unset (None) are filled in by the BiT-HyperRule from the data: `resize`/`crop` from the image size,
`mixup_alpha` and `schedule` from the number of training examples. `get_config('MODEL')` sets the model,
so `--config configs/common.py:BiT-S-R50x1` works too.

Transfer modes: `--config.transfer=head` trains only the new head on the frozen backbone;
`--config.transfer=partial --config.unfreeze_stages=1 --config.backbone_lr_scale=0.1` also trains block4 and
the final norm at a tenth of the learning rate; `--config.model=R50x1` trains the bare architecture from
scratch (the baseline that shows what pretraining buys). Early stopping:
`--config.eval_every=50 --config.early_stopping_patience=3`.
"""

from bit.config import get_config

__all__ = ['get_config']
