"""Atomic writes: a file is either its old self or its complete new self, never half-written.

Every file the project writes into a workdir or a cache goes through `atomic_write` (a temporary file in the
same folder, then `os.replace`), so a run killed at any moment loses nothing already written.
"""

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = 'w', **open_kwargs: Any) -> Any:
  """Opens a temporary file next to `path`; on success it replaces `path`, on error it is removed.

  Yields the open file object. `mode` is 'w' (text, utf-8 unless given) or 'wb'.
  """
  path = pathlib.Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  if 'b' not in mode:
    open_kwargs.setdefault('encoding', 'utf-8')
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_text(path: str | os.PathLike[str], text: str) -> pathlib.Path:
  """Writes `text` to `path` atomically."""
  with atomic_write(path) as f:
    f.write(text)
  return pathlib.Path(path)


def write_json(path: str | os.PathLike[str], obj: Any, **dump_kwargs: Any) -> pathlib.Path:
  """Writes `obj` as JSON (indented, with a final newline) to `path` atomically."""
  dump_kwargs.setdefault('indent', 2)
  return write_text(path, json.dumps(obj, **dump_kwargs) + '\n')


def save_npz(path: str | os.PathLike[str], **arrays: Any) -> pathlib.Path:
  """Writes numpy arrays as an uncompressed .npz to `path` atomically."""
  with atomic_write(path, 'wb') as f:
    np.savez(f, **arrays)
  return pathlib.Path(path)
