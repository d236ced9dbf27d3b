"""Nested parameter dicts as (path, leaf) pairs and back, and the strict check every checkpoint format uses
(`checkpoints` for the official .npz, `hub` for timm's safetensors): the lowest layer of both, importing no
other bit module but the errors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from bit.errors import CheckpointError


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  """(path, leaf) for every leaf of a nested dict, depth first in key order."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from flatten(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def unflatten(items: Any) -> dict[str, Any]:
  """The nested dict of (path, leaf) pairs."""
  tree = {}
  for path, v in items:
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def strict_check(
  weights: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], header: str, footer: str
) -> None:
  """CheckpointError (`header`, every missing, unexpected, mis-shaped and non-float array, `footer`) unless
  `weights` has exactly the names and shapes of `expected`, all floating point."""
  missing = [f'{k} {shape}' for k, shape in expected.items() if k not in weights]
  unexpected = [f'{k} {tuple(np.shape(w))}' for k, w in weights.items() if k not in expected]
  misshaped, nonfloat = [], []
  for k, shape in expected.items():
    if k in weights:
      w = weights[k]
      if tuple(w.shape) != tuple(shape):
        misshaped.append(f'{k}: {tuple(w.shape)} in the file, the model expects {tuple(shape)}')
      elif not np.issubdtype(w.dtype, np.floating):
        nonfloat.append(f'{k}: dtype {w.dtype}')
  if missing or unexpected or misshaped or nonfloat:
    lines = [header]
    for title, items in (
      ('missing', missing),
      ('unexpected', unexpected),
      ('wrong shape', misshaped),
      ('not floating point', nonfloat),
    ):
      if items:
        lines.append(f'  {title} ({len(items)}):')
        lines.extend(f'    {item}' for item in items)
    lines.append(footer)
    raise CheckpointError('\n'.join(lines))


def root_kernel(params: Mapping[str, Any]) -> Any:
  """The root convolution's kernel (HWIO): its input axis is the model's channel count."""
  return params['root_block']['conv_root']['kernel']
