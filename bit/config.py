"""Every training config key: its default and what it means (`DEFAULTS`), and the config files that build on it.

`get_config(model=None)` is these defaults as a locked `ml_collections.ConfigDict`, the base every
`configs/*.py` starts from (`configs/common.py` is it as a file to pass: `--config configs/common.py`). Config
files are Python files with `get_config(arg=None)`, found by path (`configs/` of a checkout, or anywhere):
`load_module(path)` loads one, e.g. a config that builds on its sibling file.

Keys left unset (None) are filled in by the BiT-HyperRule from the data: `resize`/`crop` from the image size,
`mixup_alpha` and `schedule` from the number of training examples.

This module imports ml_collections only inside `get_config`: the library modules that read `DEFAULTS`
(train_state, train) stay importable without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import types
import typing
from typing import Any

if typing.TYPE_CHECKING:
  import ml_collections


@dataclasses.dataclass(frozen=True)
class Unset:
  """A key with no default: None until set (a typed `ml_collections` placeholder)."""

  type: type


DEFAULTS: dict[str, Any] = {
  # What to fine-tune and on what.
  'model': 'BiT-M-R50x1',  # registry name (bit.list_models()), an official .npz, or 'R50x1' (scratch)
  'dataset': Unset(str),  # TFDS name ('cifar10', 'name:1.2.0') or ROOT/<split>/<class>/
  'train_split': 'train',  # split to train on (TFDS split syntax such as 'train[:90%]' works for TFDS)
  'test_split': 'test',  # split to evaluate on; without a test split, a seeded holdout of train is used
  'data_dir': Unset(str),  # TFDS data_dir (None = TFDS default, ~/tensorflow_datasets)
  'examples_per_class': Unset(int),  # few-shot: train on k examples per class (None = all)
  # The recipe (BiT-HyperRule); None = from the hyper-rule and the data.
  'batch_size': 512,  # global batch size per update, over all devices and hosts (the paper's 512)
  'base_lr': 0.003,  # peak learning rate of SGD (momentum 0.9, no weight decay), after linear warmup
  'resize': Unset(int),  # resize train images to resize x resize before the random crop
  'crop': Unset(int),  # training crop side; eval images are resized to crop x crop
  'mixup_alpha': Unset(float),  # MixUp Beta(alpha, alpha); 0 = off
  'schedule': Unset(tuple),  # [warmup, decay1, decay2, decay3, total] steps: [2,4,6,8,10]
  # Transfer mode: which params train (a mask on the one optimizer; frozen params stay bit-for-bit).
  'transfer': 'full',  # 'full' (everything), 'head' (new head only), 'partial' (head + norm_pre_head + top N)
  'unfreeze_stages': 0,  # transfer='partial': also train the top N stages (1 = block4, 2 = block3+4, ...)
  'unfreeze_units': 0,  # transfer='partial': or the top N residual units instead (counted down from block4)
  'backbone_lr_scale': 1.0,  # lr multiplier for the trained params below the head (e.g. 0.1 for 'partial')
  'early_stopping_patience': 0,  # stop after N evals with no better top-1; export the best (needs eval_every)
  # How it runs.
  'parallelism': 'shard_map',  # 'shard_map' (jax.shard_map under jit) or 'pmap'
  'num_devices': 0,  # devices to use, 0 = all (single-process runs may pick fewer, e.g. 1 for debugging)
  'accum_steps': 1,  # gradient accumulation: split each batch into this many micro-batches (same update)
  'remat': 'none',  # recompute activations in the backward pass: 'none', 'unit' or 'stage' (less memory)
  'dtype': 'float32',  # compute dtype: 'float32' or 'bfloat16' (params and optimizer stay float32)
  'seed': 0,  # seeds the head/scratch init, crops, flips, MixUp and few-shot subsets
  'eval_every': 0,  # evaluate on the test split every this many steps (0 = only at the end)
  'checkpoint_every': 100,  # save an orbax checkpoint every this many steps and at the end (0 = end only)
  'log_every': 10,  # write a train line to metrics.jsonl / TensorBoard every this many steps
  'keep_checkpoints': 3,  # how many of the newest checkpoints to keep (0 = all)
  'restart': False,  # True: start over at step 0; the workdir's checkpoints are moved aside, not deleted
}

TRANSFER_KEYS = ('transfer', 'unfreeze_stages', 'unfreeze_units', 'backbone_lr_scale')


def default(key: str) -> Any:
  """The default of `key` (None for a key with no default)."""
  value = DEFAULTS[key]
  return None if isinstance(value, Unset) else value


def get_config(model: str | None = None) -> ml_collections.ConfigDict:
  """The default config as a locked ConfigDict; `model`, if given, sets `model` (`configs/common.py:NAME`)."""
  import ml_collections
  from ml_collections import config_dict

  c = ml_collections.ConfigDict()
  for key, value in DEFAULTS.items():
    c[key] = config_dict.placeholder(value.type) if isinstance(value, Unset) else value
  if model:
    c.model = model
  c.lock()
  return c


def load_module(path: str | os.PathLike[str]) -> types.ModuleType:
  """The config file at `path` as a module (its `get_config(arg=None)` builds the config).

  Config files are found by path, never imported as a package: a config that builds on another loads its
  sibling with `load_module(pathlib.Path(__file__).with_name('other.py'))`.
  """
  from bit.errors import ConfigError

  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ConfigError(f'config file {str(path)!r} does not exist; give a path such as configs/cifar10.py.')
  spec = importlib.util.spec_from_file_location(f'_bit_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


__all__ = ['DEFAULTS', 'TRANSFER_KEYS', 'Unset', 'default', 'get_config', 'load_module']
