"""Every training config key: its default and what it means (`DEFAULTS`), and the config files that build on it.

`get_config(model=None)` is these defaults as a locked `ml_collections.ConfigDict`, the base every
`configs/*.py` starts from (`configs/common.py` is it as a file to pass: `--config configs/common.py`). Config
files are Python files with `get_config(arg=None)`, found by path (`configs/` of a checkout, or anywhere):
`load_module(path)` loads one, e.g. a config that builds on its sibling file.

Keys left unset (None) are filled in by the BiT-HyperRule from the data: `resize`/`crop` from the image size,
`mixup_alpha` and `schedule` from the number of training examples.

A run's config is checked and resolved here: `as_config(config)` (a dict onto the defaults), `check(config)`
(cheap checks before any data or model is touched), `resolve(config, info)` (the hyper-rule keys from the
data), `transfer_settings(config)`; `OPERATIONAL_KEYS` may change between reruns of one workdir.

This module imports ml_collections and JAX only inside functions: the library modules that read `DEFAULTS`
(train_state, freeze) stay importable without them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import types
import typing
from typing import Any

if typing.TYPE_CHECKING:
  import ml_collections

from bit import hyperrule
from bit.errors import ConfigError


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
TRANSFER_MODES = ('full', 'head', 'partial')  # config.transfer (bit.freeze)


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
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ConfigError(f'config file {str(path)!r} does not exist; give a path such as configs/cifar10.py.')
  spec = importlib.util.spec_from_file_location(f'_bit_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Keys that change how a run is carried out but not its result: a rerun may change them freely.
OPERATIONAL_KEYS = frozenset(
  {
    'data_dir',
    'parallelism',
    'num_devices',
    'accum_steps',
    'eval_every',
    'checkpoint_every',
    'log_every',
    'keep_checkpoints',
    'remat',
    'restart',
  }
)
# Keys added after the first workdirs were written: a config.json without them ran with their defaults.
LATER_KEYS = (*TRANSFER_KEYS, 'early_stopping_patience', 'remat', 'restart')


# --- checks and resolution (bit.train runs them before any data or model is touched) ---------------------


def resolve(config: Any, info: Any) -> dict[str, Any]:
  """The config as a plain dict with the unset hyper-rule keys filled in from the data (`DatasetInfo`).

  resize/crop from `hyperrule.train_resolution(info.image_size)`, mixup_alpha and schedule from the number
  of training examples. Raises ConfigError for values that cannot work.
  """
  c = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  if c.get('resize') is None or c.get('crop') is None:
    resize, crop = hyperrule.train_resolution(info.image_size, crop=c.get('crop'))
    c['crop'] = crop if c.get('crop') is None else c['crop']
    c['resize'] = resize if c.get('resize') is None else c['resize']
  if c['crop'] > c['resize']:
    raise ConfigError(
      f'config.crop={c["crop"]} is larger than config.resize={c["resize"]}: the random crop is taken from '
      'the resized image, so set resize >= crop.'
    )
  if c.get('mixup_alpha') is None:
    c['mixup_alpha'] = hyperrule.mixup_alpha(info.train_size)
  if c.get('schedule') is None:
    c['schedule'] = hyperrule.schedule(info.train_size)
  c['schedule'] = check_schedule(c['schedule'])
  return c


def check_schedule(schedule: Any) -> list[int]:
  """The schedule's supports as ints; ConfigError unless they are [warmup, decay1, decay2, decay3, total]."""
  try:
    return hyperrule.check_supports(schedule)
  except ConfigError:
    raise ConfigError(
      f'config.schedule={schedule!r} is not [warmup, decay1, decay2, decay3, total] in steps with '
      'warmup <= decay1 < decay2 < decay3 < total, e.g. config.schedule=[100,200,300,400,500].'
    ) from None


def check(config: Any) -> None:
  """Cheap checks before any data or model is touched (ConfigError naming the key and what to do)."""
  from bit import models

  if not config.get('dataset'):
    raise ConfigError(
      'config.dataset is not set: set config.dataset=NAME (a TFDS name such as cifar10) '
      'or config.dataset=/path/to/folder (ROOT/<split>/<class>/<image>).'
    )
  if not config.get('model'):
    raise ConfigError(
      'config.model is not set: set config.model=BiT-M-R50x1 (see bit.list_models()), '
      'a path to an official-layout .npz, or an architecture such as R50x1 to train from scratch.'
    )
  if config.dtype not in models.DTYPES:
    raise ConfigError(f'config.dtype={config.dtype!r} is not one of {sorted(models.DTYPES)}.')
  for key in ('batch_size', 'accum_steps'):
    if int(config[key]) < 1:
      raise ConfigError(f'config.{key} must be a positive integer, got {config[key]}.')
  for key in ('eval_every', 'checkpoint_every', 'log_every', 'keep_checkpoints'):
    if int(config[key]) < 0:
      raise ConfigError(f'config.{key} must be >= 0, got {config[key]}.')
  if not float(config.base_lr) > 0:
    raise ConfigError(f'config.base_lr must be a positive number, got {config.base_lr}.')
  remat = config.get('remat', default('remat'))
  if remat not in models.REMAT:
    raise ConfigError(
      f'config.remat={remat!r} is not one of {", ".join(models.REMAT)}: "unit" recomputes each residual unit\'s '
      'activations in the backward pass, "stage" each stage\'s (less memory, more compute).'
    )
  check_transfer(config)


def transfer_settings(c: Any) -> dict[str, Any]:
  """The transfer-learning keys of a config (ConfigDict or resolved dict), defaults filled in."""
  t = {k: c.get(k, default(k)) for k in TRANSFER_KEYS}
  t['backbone_lr_scale'] = float(t['backbone_lr_scale'])
  return t


def check_transfer(config: Any) -> None:
  """The transfer-learning and early-stopping keys (part of `check`)."""
  t = transfer_settings(config)
  if t['transfer'] not in TRANSFER_MODES:
    raise ConfigError(
      f'config.transfer={t["transfer"]!r} is not one of {", ".join(TRANSFER_MODES)}: "full" fine-tunes '
      'everything, "head" trains only the new head, "partial" the head plus the top stages/units.'
    )
  patience = config.get('early_stopping_patience', default('early_stopping_patience'))
  for key, value in (
    ('unfreeze_stages', t['unfreeze_stages']),
    ('unfreeze_units', t['unfreeze_units']),
    ('early_stopping_patience', patience),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f'config.{key} must be an integer >= 0, got {value!r}.')
  if t['transfer'] != 'partial' and (t['unfreeze_stages'] or t['unfreeze_units']):
    raise ConfigError(
      f'config.unfreeze_stages/unfreeze_units only apply to config.transfer=partial, not '
      f'{t["transfer"]!r}: set config.transfer=partial or drop them.'
    )
  if t['unfreeze_stages'] and t['unfreeze_units']:
    raise ConfigError('Give either config.unfreeze_stages or config.unfreeze_units, not both.')
  if not (math.isfinite(t['backbone_lr_scale']) and t['backbone_lr_scale'] > 0):
    raise ConfigError(
      f'config.backbone_lr_scale must be a positive number, got {t["backbone_lr_scale"]}; '
      'freeze layers with config.transfer instead.'
    )
  if patience and not int(config.eval_every):
    raise ConfigError(
      f'config.early_stopping_patience={patience} needs evaluations during training: set '
      'config.eval_every=STEPS as well (early stopping counts evaluations, not steps).'
    )


def as_config(config: Any) -> Any:
  """`config` as a ConfigDict: one as given, or a plain dict put onto the defaults (bit/config.py).

  A dict's unknown keys are refused, naming them (bit/config.py lists every key); so is a value of the wrong
  type for its key.
  """
  import ml_collections

  if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return config
  if not isinstance(config, dict):
    raise ConfigError(
      'config= must be an ml_collections.ConfigDict (e.g. bit.config.get_config()) or a dict of its keys, '
      f'got {type(config).__name__}.'
    )
  base = get_config()
  unknown = sorted(str(k) for k in config if k not in base)
  if unknown:
    import difflib

    hints = [
      f'{k} (did you mean {m[0]}?)' if (m := difflib.get_close_matches(k, list(base), 1)) else k
      for k in unknown
    ]
    raise ConfigError(f'config= has unknown keys: {", ".join(hints)}; bit/config.py lists every key.')
  for key, value in config.items():
    try:
      base[key] = value
    except (TypeError, ValueError):
      wanted = base.get_type(key).__name__
      raise ConfigError(
        f'config[{key!r}]={value!r} is a {type(value).__name__}, but {key} takes type {wanted}.'
      ) from None
  return base


__all__ = [
  'DEFAULTS',
  'LATER_KEYS',
  'OPERATIONAL_KEYS',
  'TRANSFER_KEYS',
  'TRANSFER_MODES',
  'Unset',
  'as_config',
  'check',
  'check_schedule',
  'check_transfer',
  'default',
  'get_config',
  'load_module',
  'resolve',
  'transfer_settings',
]
