"""Every training config key, its default and what it means; the base of the per-dataset configs.

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

import ml_collections
from ml_collections import config_dict


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The default config; `arg`, if given, is the model name."""
  c = ml_collections.ConfigDict()
  # What to fine-tune and on what.
  c.model = arg or 'BiT-M-R50x1'  # registry name (bit.list_models()), an official .npz, or 'R50x1' (scratch)
  c.dataset = config_dict.placeholder(str)  # TFDS name ('cifar10', 'name:1.2.0') or ROOT/<split>/<class>/
  c.train_split = 'train'  # split to train on (TFDS split syntax such as 'train[:90%]' works for TFDS)
  c.test_split = 'test'  # split to evaluate on; without a test split, a seeded holdout of train is used
  c.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None = TFDS default, ~/tensorflow_datasets)
  c.examples_per_class = config_dict.placeholder(int)  # few-shot: train on k examples per class (None = all)
  # The recipe (BiT-HyperRule); None = from the hyper-rule and the data.
  c.batch_size = 512  # global batch size per update, over all devices and hosts (the paper's 512)
  c.base_lr = 0.003  # peak learning rate of SGD (momentum 0.9, no weight decay), after linear warmup
  c.resize = config_dict.placeholder(int)  # resize train images to resize x resize before the random crop
  c.crop = config_dict.placeholder(int)  # training crop side; eval images are resized to crop x crop
  c.mixup_alpha = config_dict.placeholder(float)  # MixUp Beta(alpha, alpha); 0 = off
  c.schedule = config_dict.placeholder(tuple)  # [warmup, decay1, decay2, decay3, total] steps: [2,4,6,8,10]
  # Transfer mode: which params train (a mask on the one optimizer; frozen params stay bit-for-bit).
  c.transfer = 'full'  # 'full' (everything), 'head' (new head only), 'partial' (head + norm_pre_head + top N)
  c.unfreeze_stages = 0  # transfer='partial': also train the top N stages (1 = block4, 2 = block3+4, ...)
  c.unfreeze_units = 0  # transfer='partial': or the top N residual units instead (counted down from block4)
  c.backbone_lr_scale = 1.0  # lr multiplier for the trained params below the head (e.g. 0.1 for 'partial')
  c.early_stopping_patience = 0  # stop after N evals with no better top-1; export the best (needs eval_every)
  # How it runs.
  c.parallelism = 'shard_map'  # 'shard_map' (jax.shard_map under jit) or 'pmap'
  c.num_devices = 0  # devices to use, 0 = all (single-process runs may pick fewer, e.g. 1 for debugging)
  c.accum_steps = 1  # gradient accumulation: split each batch into this many micro-batches (same update)
  c.remat = 'none'  # recompute activations in the backward pass: 'none', 'unit' or 'stage' (less memory)
  c.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (params and optimizer stay float32)
  c.seed = 0  # seeds the head/scratch init, crops, flips, MixUp and few-shot subsets
  c.eval_every = 0  # evaluate on the test split every this many steps (0 = only at the end)
  c.checkpoint_every = 100  # save an orbax checkpoint every this many steps and at the end (0 = end only)
  c.log_every = 10  # write a train line to metrics.jsonl / TensorBoard every this many steps
  c.keep_checkpoints = 3  # how many of the newest checkpoints to keep (0 = all)
  c.restart = False  # True: start over at step 0; the workdir's checkpoints are moved aside, not deleted
  c.lock()
  return c
