"""Checks of the public functions' arguments: a wrong type gets one sentence naming the argument (`model=`,
`params=`, `dataset=`, `images=`), not a traceback from deep inside JAX or TFDS.

The sentences name Python arguments; the command-line tools show them as their flags (`bit.tools.cli`).
"""

from __future__ import annotations

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
  """`params` must be the param tree of `model` (unwrapped from {'params': ...}); returns it."""
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
  return params


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
