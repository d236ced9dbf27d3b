"""Checks of the public functions' arguments: a wrong type gets one sentence naming the argument (`model=`,
`params=`, `dataset=`, `images=`), not a traceback from deep inside JAX or TFDS.

The sentences name Python arguments; the command-line tools show them as their flags (`bit.tools.cli`).
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Mapping
from typing import Any

from bit.errors import BitError, DataError

if typing.TYPE_CHECKING:
  from bit import models


def describe(value: Any) -> str:
  """A short description of a value for an error message: its type and a glimpse of it."""
  if isinstance(value, Mapping):
    keys = list(value)
    more = ', ...' if len(keys) > 5 else ''
    return f'a {type(value).__name__} with keys {", ".join(map(str, keys[:5]))}{more}'
  if hasattr(value, 'shape') and hasattr(value, 'dtype'):
    return f'an array ({type(value).__name__}) of shape {tuple(value.shape)} and dtype {value.dtype}'
  text = repr(value)
  return f'the {type(value).__name__} {text[:60] + "..." if len(text) > 60 else text}'


def check_model(model: Any, fn: str) -> models.ResNetV2:
  """`model` must be a bit.ResNetV2 (as `bit.load` returns it)."""
  from bit import models

  if isinstance(model, models.ResNetV2):
    return model
  hint = ''
  if isinstance(model, Mapping):
    hint = ' (params? the order is model, params)'
  elif isinstance(model, (str, os.PathLike)):
    hint = f': load it first, model, params = bit.load({os.fspath(model)!r}, keep_head=True)'
  raise BitError(f'{fn}: model= must be a bit.ResNetV2 (from bit.load), got {describe(model)}{hint}.')


def check_params(model: models.ResNetV2, params: Any, fn: str) -> dict[str, Any]:
  """`params` must be the param tree of `model` (unwrapped from {'params': ...}); returns it.

  The whole tree is compared with the model's own parameter shapes (`jax.eval_shape`, cached per
  architecture): a missing, unexpected or mis-shaped leaf is a BitError listing them by name and saying which
  architecture each side is (Flax alone would ignore extra params and fail deep inside on a wrong shape).
  """
  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  if not isinstance(params, Mapping) or not isinstance(params.get('head'), Mapping):
    hint = ''
    if isinstance(params, (str, os.PathLike)):
      hint = f': load it first, model, params = bit.load({os.fspath(params)!r}, keep_head=True)'
    raise BitError(
      f'{fn}: params= must be the param tree of a bit model (the dict bit.load returns), got '
      f'{describe(params)}{hint}.'
    )
  kernel = params['head'].get('kernel')
  classes = getattr(kernel, 'shape', (None,))[-1]
  if classes is not None and classes != model.num_classes:
    raise BitError(
      f'{fn}: params= has a {classes}-class head but model= has {model.num_classes} classes: use the model '
      f'that bit.load returned with these params (or model.clone(num_classes={classes})).'
    )
  _check_tree(model, params, fn)
  return params


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'block1/unit01/conv1/kernel': shape} of a nested param dict (leaves: anything with a shape)."""
  out: dict[str, tuple[int, ...]] = {}

  def walk(node: Any, prefix: str) -> None:
    for key, value in node.items():
      name = f'{prefix}/{key}' if prefix else str(key)
      if isinstance(value, Mapping):
        walk(value, name)
      else:
        out[name] = tuple(getattr(value, 'shape', ()) or ())

  walk(tree, '')
  return out


@functools.lru_cache(maxsize=32)
def model_shapes(depth: int, width: int, num_classes: int, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
  """The flat {name: shape} param tree of a ResNetV2 (eval_shape: nothing is allocated), cached."""
  from bit import models

  model = models.ResNetV2(depth=depth, width=width, num_classes=num_classes, in_chans=in_chans)
  return _flat_shapes(models.param_shapes(model))


def implied_architecture(shapes: dict[str, tuple[int, ...]]) -> str:
  """What a flat {name: shape} param tree looks like: 'R50x1 (block units 3/4/6/3, root 64 channels, 10
  classes)'; the parts that cannot be told are left out or marked '?'."""
  from bit import models

  units = []
  for b in range(1, 5):
    names = {n.split('/')[1] for n in shapes if n.startswith(f'block{b}/') and n.count('/') >= 2}
    units.append(len(names))
  root = shapes.get('root_block/conv_root/kernel')
  channels = root[-1] if root and len(root) == 4 else None
  depth = next((d for d, blocks in models.BLOCKS.items() if tuple(units) == blocks), None)
  width = channels // 64 if channels and channels % 64 == 0 else None
  head = shapes.get('head/kernel')
  arch = f'R{depth or "?"}x{width or "?"}'
  parts = [f'block units {"/".join(map(str, units))}', f'root {channels if channels else "?"} channels']
  if head and len(head) == 2:
    parts.append(f'{head[-1]} classes')
  return f'{arch} ({", ".join(parts)})'


def _listed(items: list[str], limit: int = 4) -> str:
  more = f' and {len(items) - limit} more' if len(items) > limit else ''
  return ', '.join(items[:limit]) + more


def _modules(names: list[str]) -> list[str]:
  """Leaf names collapsed to their residual unit (or top-level module): 'block1/unit03', 'head/kernel'."""
  out: dict[str, None] = {}
  for n in names:
    parts = n.split('/')
    out.setdefault('/'.join(parts[:2]) if parts[0].startswith('block') else n, None)
  return list(out)


def _check_tree(model: Any, params: Any, fn: str) -> None:
  want = model_shapes(
    int(model.depth), int(model.width), int(model.num_classes), int(getattr(model, 'in_chans', 3))
  )
  have = _flat_shapes(params)
  missing = _modules([n for n in want if n not in have])
  unexpected = _modules([n for n in have if n not in want])
  misshaped = [f'{n} {have[n]} (model: {want[n]})' for n in want if n in have and have[n] != want[n]]
  if not (missing or unexpected or misshaped):
    return
  problems = []
  if missing:
    problems.append(f'missing {_listed(missing)}')
  if unexpected:
    problems.append(f'unexpected {_listed(unexpected)}')
  if misshaped:
    problems.append(f'mis-shaped {_listed(misshaped)}')
  raise BitError(
    f'{fn}: params= do not fit model=: the params are {implied_architecture(have)}, the model is '
    f'{model.architecture} ({implied_architecture(want).split(" (", 1)[1]}; {"; ".join(problems)}. '
    'Use the model that bit.load returned with these params (model, params = bit.load(...)).'
  )


def check_dataset(dataset: Any, fn: str) -> Any:
  """`dataset` must be a TFDS name or an image folder (str or path)."""
  if isinstance(dataset, (str, os.PathLike)) and str(os.fspath(dataset)).strip():
    return dataset
  hint = ''
  if hasattr(dataset, 'shape') or isinstance(dataset, (list, tuple)):
    hint = ': for images in memory use bit.predict(model, params, images)'
  raise DataError(
    f'{fn}: dataset= must be a TFDS name (e.g. cifar10) or an image folder path, got {describe(dataset)}{hint}.'
  )


def check_size(size: Any, name: str, fn: str) -> int | None:
  """An image side (None = the default) as an int >= 32."""
  if size is None:
    return None
  from bit import models

  try:
    value = int(size)
  except (TypeError, ValueError):
    value = None
  if value is None or value != size or value < models.MIN_IMAGE_SIZE:
    raise BitError(
      f'{fn}: {name}= must be an image side in pixels, at least {models.MIN_IMAGE_SIZE}, got {size!r}.'
    )
  return value
