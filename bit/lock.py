"""One run per workdir: a run holds an advisory lock on `WORKDIR/.lock` for its lifetime.

  with lock.workdir_lock(workdir):   # ConfigError at once if another process holds it
    ...                              # the run

The lock is `fcntl.flock` on an open file: the operating system releases it when the process ends, however it
ends (kill -9 included), so a lock is never stale. The file keeps the holder's host and PID for the message
of the process that is refused. In a multi-process run the primary process (process 0) holds it. On a
filesystem without flock (some network filesystems) the lock is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import socket
from collections.abc import Iterator

from bit.errors import ConfigError

log: logging.Logger = logging.getLogger(__name__)

LOCK_FILE = '.lock'


def _holder(path: pathlib.Path) -> str:
  try:
    info = json.loads(path.read_text() or '{}')
    return f'host {info.get("host", "?")}, PID {info.get("pid", "?")}'
  except (OSError, ValueError):
    return 'another process (its host and PID are not recorded yet)'


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike[str], *, hold: bool = True) -> Iterator[pathlib.Path | None]:
  """Holds `WORKDIR/.lock` while the block runs; ConfigError naming the holder's host and PID when another
  process (on any host that shares the filesystem's locks) holds it. `hold=False` (the non-primary processes
  of a multi-process run) does nothing."""
  if not hold:
    yield None
    return
  import fcntl

  workdir = pathlib.Path(workdir).expanduser()
  created = not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  locked = False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise ConfigError(
          f'{workdir} is in use by another run ({_holder(path)}): two runs on one workdir would overwrite each '
          'other. Wait for it to finish (or stop it), or pass another workdir.'
        ) from None
      log.warning('cannot lock %s (%s): the workdir is not protected from a second run', path, e.strerror)
      yield None
      return
    locked = True
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}).encode(), 0)
    yield path
  finally:
    if locked and created and [p.name for p in workdir.iterdir()] == [LOCK_FILE]:
      # A run that never started (bad config or data) leaves no workdir behind, as before it had a lock.
      with contextlib.suppress(OSError):
        path.unlink()
        workdir.rmdir()
    os.close(fd)  # releases the lock (the OS does the same when the process dies)
