"""Atomic writes: a file is either its old self or its complete new self, never half-written.

Every file the project writes into a workdir or a cache goes through `atomic_write` (a temporary file in the
same folder, then `os.replace`), so a run killed at any moment loses nothing already written.

Permissions: a file written here gets the mode a plain `open()` would give it (0666 less the umask: 0644
under the usual umask 022), and `temporary_dir` folders 0777 less the umask (0755), so what a run ships
(model.npz, labels.txt, config.json, metrics.jsonl, plots, reports, exports) can be read by another user or
a serving container; `private=True` keeps a file to its owner (0600).
"""

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np


def umask() -> int:
  """The process's umask, read without changing it where Linux tells it (/proc), else by setting it back."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def temporary_dir(parent: str | os.PathLike[str], prefix: str = '', suffix: str = '.tmp') -> pathlib.Path:
  """`tempfile.mkdtemp` in `parent`, with the mode of a plain mkdir (0777 less the umask; mkdtemp gives 0700),
  for a folder built in place and then renamed to its final name (an export)."""
  path = pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
  os.chmod(path, 0o777 & ~umask())
  return path


def replace_dir(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
  """Puts the finished folder `tmp` at `path` by rename; a folder already at `path` is moved aside first and
  removed only once the new one is in place (an export replaced with overwrite=True)."""
  import shutil

  tmp, path = pathlib.Path(tmp), pathlib.Path(path)
  if path.exists():
    old = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.old'))
    os.replace(path, old / path.name)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(
  path: str | os.PathLike[str], mode: str = 'w', *, private: bool = False, **open_kwargs: Any
) -> Any:
  """Opens a temporary file next to `path`; on success it replaces `path`, on error it is removed.

  Yields the open file object. `mode` is 'w' (text, utf-8 unless given) or 'wb'. The file gets the mode of a
  plain `open()` (0666 less the umask), or 0600 with `private=True`.
  """
  path = pathlib.Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  if not private:  # mkstemp makes 0600 whatever the umask
    os.fchmod(fd, 0o666 & ~umask())
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
