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

The mask keeps the optimizer honest; `Split` makes the step cost what the mode trains. The train step
(`bit.train_state.train_step`) differentiates the loss with respect to the trainable leaves only and feeds the
frozen ones in as constants, so below the lowest trainable layer the network runs forward only: JAX neither
differentiates it nor keeps its activations for a backward pass. The model takes its conv kernels already
weight-standardized (`models.ResNetV2(standardized=True)`, the form inference uses): the frozen kernels are
standardized once per run (`Split.prepare_frozen`), the trainable ones inside the step, as before. The
params themselves (checkpoints, `model.npz`) keep the original kernels. One code path for every mode: in
'full' nothing is frozen and the step is the plain full backward pass.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import optax

from bit import models, ops
from bit.config import TRANSFER_MODES, default
from bit.errors import ConfigError
from bit.types import Mode

MODES = TRANSFER_MODES

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
  params: Any,
  mode: Mode = 'full',
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
  params: Any, mode: Mode = 'full', *, unfreeze_stages: int | None = None, unfreeze_units: int | None = None
) -> Any:
  """A pytree like `params` of bools: True where the parameter is trained in this transfer mode."""
  labels = param_labels(params, mode, unfreeze_stages=unfreeze_stages, unfreeze_units=unfreeze_units)
  return jax.tree_util.tree_map(lambda lab: lab != FROZEN, labels)


def masked_optimizer(
  tx: optax.GradientTransformation,
  params: Any,
  mode: Mode = 'full',
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


def optimizer_from_config(
  tx: optax.GradientTransformation, params: Any, config: Any
) -> optax.GradientTransformation:
  """`masked_optimizer` driven by config keys (each optional): `transfer` ('full'), `unfreeze_stages`,
  `unfreeze_units`, `backbone_lr_scale` (1.0)."""

  def get(key):
    try:
      value = config.get(key, None)
    except AttributeError:
      value = getattr(config, key, None)
    return default(key) if value is None else value

  return masked_optimizer(
    tx,
    params,
    get('transfer'),
    unfreeze_stages=get('unfreeze_stages') or None,
    unfreeze_units=get('unfreeze_units') or None,
    backbone_lr_scale=float(get('backbone_lr_scale')),
  )


def count_trainable(params: Any, mask: Any) -> tuple[int, int]:
  """(trainable, total) parameter counts for a mask from `trainable_mask`, for the training log."""
  leaves = jax.tree_util.tree_leaves(params)
  flags = jax.tree_util.tree_leaves(mask)
  return sum(int(p.size) for p, m in zip(leaves, flags, strict=True) if m), sum(int(p.size) for p in leaves)


# --- the trainable/frozen split of the forward pass ------------------------------------------------------


@jax.jit
def _standardize_all(kernels):
  return [ops.standardize(k) for k in kernels]


@dataclasses.dataclass(frozen=True)
class Split:
  """Which leaves of a param tree (in `jax.tree.leaves` order) are trained, and which are standardized kernels.

  Hashable, so it can be a static field of the train state. `standardized` flags the conv kernels a
  `models.ResNetV2(standardized=True)` expects pre-standardized (all False for other models): frozen ones are
  standardized once by `prepare_frozen`, trainable ones by `forward_params` inside the differentiated function.
  """

  trainable: tuple[bool, ...]
  standardized: tuple[bool, ...]

  @classmethod
  def create(cls, params: Any, mask: Any, *, standardized: bool = False) -> 'Split':
    """From a bool tree `mask` shaped like `params` (`trainable_mask`); `standardized` for a ResNetV2 applied
    with `standardized=True`."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flags = jax.tree.leaves(mask)
    if len(flags) != len(flat):
      raise ConfigError(f'The trainable mask has {len(flags)} leaves but the params have {len(flat)}.')
    std = tuple(bool(standardized) and models.is_standardized_kernel(p, x) for p, x in flat)
    return cls(tuple(bool(f) for f in flags), std)

  @property
  def num_frozen(self) -> int:
    return len(self.trainable) - sum(self.trainable)

  def _leaves(self, params):
    leaves, treedef = jax.tree.flatten(params)
    if len(leaves) != len(self.trainable):
      raise ConfigError(
        f'The params have {len(leaves)} leaves but this split was made for {len(self.trainable)}: '
        'build the train state from the same model.'
      )
    return leaves, treedef

  def partition(self, params: Any) -> Any:
    """(leaves, treedef, trainable leaves): what the step differentiates is the third."""
    leaves, treedef = self._leaves(params)
    return leaves, treedef, [x for x, t in zip(leaves, self.trainable, strict=True) if t]

  def merge(self, treedef: Any, leaves: Sequence[Any], trainable: Sequence[Any]) -> Any:
    """The tree of `leaves` with the trainable ones replaced by `trainable` (in order)."""
    it = iter(trainable)
    return treedef.unflatten([next(it) if t else x for x, t in zip(leaves, self.trainable, strict=True)])

  def prepare_frozen(self, params: Any) -> tuple[Any, ...]:
    """The frozen conv kernels, weight-standardized (float32, in leaf order): once per run. Also traceable
    (`jax.eval_shape` of a state built from shapes)."""
    leaves, _ = self._leaves(params)
    kernels = [x for x, t, s in zip(leaves, self.trainable, self.standardized, strict=True) if s and not t]
    return tuple(_standardize_all(kernels)) if kernels else ()

  def forward_params(
    self, treedef: Any, leaves: Sequence[Any], trainable: Sequence[Any], prepared: Sequence[Any]
  ) -> Any:
    """The params the model is applied to in the step: `trainable` (the differentiated leaves) with their
    kernels standardized here, the frozen leaves from `leaves`, their kernels from `prepared`."""
    want = sum(s and not t for t, s in zip(self.trainable, self.standardized, strict=True))
    if len(prepared) != want:
      raise ValueError(
        f'{len(prepared)} prepared frozen kernels for a split with {want}: use prepare_frozen.'
      )
    it, pre = iter(trainable), iter(prepared)
    out = []
    for x, t, s in zip(leaves, self.trainable, self.standardized, strict=True):
      if t:
        x = next(it)
        out.append(ops.standardize(x) if s else x)
      else:
        out.append(next(pre) if s else x)
    return treedef.unflatten(out)
