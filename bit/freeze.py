"""Transfer modes as masks over the parameter tree: full fine-tune, head only, or partial unfreezing.

Freezing is a mask on the one optimizer, not a second code path. `masked_optimizer` wraps whatever
`optax` transformation the training loop builds so that frozen parameters get an update of exactly zero
(`optax.set_to_zero()`), which leaves them bit-for-bit unchanged and keeps no optimizer state for them:

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule, momentum=0.9))
  tx = freeze.masked_optimizer(tx, params, 'partial', unfreeze_stages=1, backbone_lr_scale=0.1)
  opt_state = tx.init(params)          # the rest of the loop is unchanged

or, from a config with the keys `transfer`, `unfreeze_stages`, `unfreeze_units`, `backbone_lr_scale`:

  tx = freeze.optimizer_from_config(tx, params, config)

Modes:
- 'full': every parameter is trained (the BiT default).
- 'head': only `head/{kernel,bias}`; the backbone is a fixed feature extractor.
- 'partial': the head, `norm_pre_head` and the top `unfreeze_stages` stages (block4, then block3, ...) or the
  top `unfreeze_units` residual units counted down from the last unit of block4. The root block is only ever
  trained in 'full' mode.

The mask only stops updates; gradients of frozen parameters are still computed by `jax.grad`. That is cheap
next to the forward pass and keeps the training step identical across modes.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from bit.errors import ConfigError

MODES = ('full', 'head', 'partial')

# Labels of the optimizer groups built by `param_labels`.
TRAINABLE, BACKBONE, FROZEN = 'trainable', 'backbone', 'frozen'

_UNIT = re.compile(r'block(\d+)/unit(\d+)')


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _units(params) -> list[tuple[int, int]]:
  """All (block, unit) pairs of the tree, bottom to top."""
  found = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    m = _UNIT.search(_path_str(path))
    if m:
      found.add((int(m.group(1)), int(m.group(2))))
  return sorted(found)


def _check_mode(mode, unfreeze_stages, unfreeze_units):
  if mode not in MODES:
    raise ConfigError(f'Unknown transfer mode {mode!r}: use one of {", ".join(MODES)}.')
  for name, value in (('unfreeze_stages', unfreeze_stages), ('unfreeze_units', unfreeze_units)):
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
      raise ConfigError(f'{name} must be a non-negative integer, got {value!r}.')
  if mode != 'partial' and (unfreeze_stages or unfreeze_units):
    raise ConfigError(
      f'unfreeze_stages/unfreeze_units only apply to transfer mode "partial", not {mode!r}: '
      'set the mode to "partial" or drop them.'
    )
  if unfreeze_stages and unfreeze_units:
    raise ConfigError('Give either unfreeze_stages or unfreeze_units, not both.')


def _is_head(name: str) -> bool:
  return name == 'head' or name.startswith('head/')


def _is_pre_head_norm(name: str) -> bool:
  return name.startswith('norm_pre_head/')


def param_labels(
  params,
  mode: str = 'full',
  *,
  unfreeze_stages: int | None = None,
  unfreeze_units: int | None = None,
  split_backbone: bool = False,
) -> Any:
  """A pytree like `params` of group labels: 'trainable' or 'frozen'.

  With `split_backbone=True`, trainable parameters below the head (norm_pre_head and unfrozen units, or
  everything but the head in 'full' mode) are labelled 'backbone' instead, so they can get their own
  learning-rate scale.
  """
  _check_mode(mode, unfreeze_stages, unfreeze_units)
  units = _units(params)
  top = set()
  if mode == 'partial':
    if unfreeze_stages:
      blocks = sorted({b for b, _ in units})
      if unfreeze_stages > len(blocks):
        raise ConfigError(
          f'unfreeze_stages={unfreeze_stages} but the model has {len(blocks)} stages; use at most '
          f'{len(blocks)}, or transfer="full" to train everything.'
        )
      keep = set(blocks[len(blocks) - unfreeze_stages :])
      top = {u for u in units if u[0] in keep}
    elif unfreeze_units:
      if unfreeze_units > len(units):
        raise ConfigError(
          f'unfreeze_units={unfreeze_units} but the model has {len(units)} residual units; use at most '
          f'{len(units)}, or transfer="full" to train everything.'
        )
      top = set(units[len(units) - unfreeze_units :])

  def label(path, _):
    name = _path_str(path)
    if _is_head(name):
      return TRAINABLE
    trainable = mode == 'full'
    if mode == 'partial':
      m = _UNIT.search(name)
      trainable = _is_pre_head_norm(name) or bool(m and (int(m.group(1)), int(m.group(2))) in top)
    if not trainable:
      return FROZEN
    return BACKBONE if split_backbone else TRAINABLE

  return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(
  params, mode: str = 'full', *, unfreeze_stages: int | None = None, unfreeze_units: int | None = None
) -> Any:
  """A pytree like `params` of bools: True where the parameter is trained in this transfer mode."""
  labels = param_labels(params, mode, unfreeze_stages=unfreeze_stages, unfreeze_units=unfreeze_units)
  return jax.tree_util.tree_map(lambda lab: lab != FROZEN, labels)


def masked_optimizer(
  tx: optax.GradientTransformation,
  params,
  mode: str = 'full',
  *,
  unfreeze_stages: int | None = None,
  unfreeze_units: int | None = None,
  backbone_lr_scale: float = 1.0,
) -> optax.GradientTransformation:
  """Wraps `tx` so that only the parameters trained in `mode` move; frozen ones get zero updates.

  `backbone_lr_scale` multiplies the updates (so, for SGD with momentum, the learning rate) of trainable
  parameters below the head - the usual smaller learning rate when unfreezing part of a pretrained network.
  Mode 'full' with scale 1.0 returns `tx` itself, so the default path is exactly the unmasked optimizer.
  """
  if backbone_lr_scale <= 0:
    raise ConfigError(
      f'backbone_lr_scale must be positive, got {backbone_lr_scale!r}; freeze layers with the transfer mode.'
    )
  split = backbone_lr_scale != 1.0
  labels = param_labels(
    params, mode, unfreeze_stages=unfreeze_stages, unfreeze_units=unfreeze_units, split_backbone=split
  )
  if mode == 'full' and not split:
    return tx
  transforms = {TRAINABLE: tx, FROZEN: optax.set_to_zero()}
  if split:
    transforms[BACKBONE] = optax.chain(tx, optax.scale(backbone_lr_scale))
  return optax.multi_transform(transforms, labels)


def optimizer_from_config(tx: optax.GradientTransformation, params, config) -> optax.GradientTransformation:
  """`masked_optimizer` driven by config keys (each optional): `transfer` ('full'), `unfreeze_stages`,
  `unfreeze_units`, `backbone_lr_scale` (1.0)."""

  def get(key, default):
    try:
      value = config.get(key, default)
    except AttributeError:
      value = getattr(config, key, default)
    return default if value is None else value

  return masked_optimizer(
    tx,
    params,
    get('transfer', 'full'),
    unfreeze_stages=get('unfreeze_stages', 0) or None,
    unfreeze_units=get('unfreeze_units', 0) or None,
    backbone_lr_scale=float(get('backbone_lr_scale', 1.0)),
  )


def count_trainable(params, mask) -> tuple[int, int]:
  """(trainable, total) parameter counts for a mask from `trainable_mask`, for the training log."""
  leaves = jax.tree_util.tree_leaves(params)
  flags = jax.tree_util.tree_leaves(mask)
  return sum(int(p.size) for p, m in zip(leaves, flags, strict=True) if m), sum(int(p.size) for p in leaves)
