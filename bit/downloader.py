"""Downloads into the local cache: atomic, resumable, size- and checksum-checked.

A file is streamed into `<path>.part` and renamed to its final name only after it has passed its checks, so
a file under the final name is always complete. An interrupted download keeps its `.part` file and the next
attempt (in the same call or a later one) asks the server for the rest with an HTTP Range request; a server
that ignores Range gets a clean retry from byte 0.
"""

import contextlib
import hashlib
import os
import pathlib
import time
import urllib.parse

import requests
from tqdm import auto as tqdm

from bit.errors import DownloadError

CHUNK = 1 << 20
TIMEOUT = (15, 60)  # (connect, read) seconds: a stalled read becomes an error that a retry resumes from
RETRIES = 3  # attempts after the first one, each resuming from what is on disk
BACKOFF = 0.5  # seconds before the first retry; doubles each time


def cache_dir() -> pathlib.Path:
  """The download cache: `$BIT_CACHE`, default `~/.cache/bit`."""
  return pathlib.Path(os.environ.get('BIT_CACHE') or '~/.cache/bit').expanduser()


def cache_path(url: str) -> pathlib.Path:
  """Where `download(url)` puts a file by default: the cache directory plus the URL's file name."""
  name = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name
  if not name:
    raise DownloadError(f'Cannot name a cache file after {url!r}: the URL has no file name; pass path=.')
  return cache_dir() / name


def _fix_it(url: str, path: pathlib.Path) -> str:
  return (
    f'To use the file without network access, fetch {url} on a machine that has it '
    f'(e.g. `wget {url}`) and put it at {path} (set $BIT_CACHE to use another cache directory).'
  )


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(CHUNK), b''):
      h.update(block)
  return h.hexdigest()


@contextlib.contextmanager
def _lock(path: pathlib.Path):
  """An advisory lock so that two processes on one machine never write the same .part file."""
  try:
    import fcntl
  except ImportError:  # not POSIX: no lock, the atomic rename still keeps the final file whole
    yield
    return
  with open(f'{path}.lock', 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _cached_ok(path: pathlib.Path, size: int | None) -> bool:
  if not path.is_file():
    return False
  if size is not None and path.stat().st_size != size:
    # Not written by us (our files are checked before the rename): fetch it again rather than trust it.
    path.unlink()
    return False
  return True


class _Incomplete(Exception):
  """The connection ended before the whole file arrived; what did arrive is kept for a resume."""


def _attempt(url, part: pathlib.Path, size, progress) -> int:
  """One request: resumes `part` if it has bytes, returns the expected total size (or -1 if unknown)."""
  have = part.stat().st_size if part.exists() else 0
  headers = {'Range': f'bytes={have}-'} if have else {}
  with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
    if r.status_code == 416 and have:
      total = r.headers.get('Content-Range', '').rpartition('/')[2]
      if total.isdigit() and int(total) == have and size in (None, have):
        return have  # the .part was already whole (the process stopped before the rename)
      # The .part is not a prefix of the file the server has now (e.g. the file changed): start over.
      part.unlink()
      raise _Incomplete(f'server rejected the range {have}- (HTTP 416)')
    if r.status_code >= 500:
      raise _Incomplete(f'HTTP {r.status_code} {r.reason}')
    if r.status_code not in (200, 206):
      raise DownloadError(
        f'Downloading {url} failed: HTTP {r.status_code} {r.reason}. Check the URL (or $BIT_MODELS_URL).'
      )
    if r.status_code == 206:
      start = int(r.headers.get('Content-Range', 'bytes 0-').split()[1].split('-')[0])
      if start != have:
        part.unlink()
        raise _Incomplete(f'server resumed at byte {start}, not at {have}')
      total = r.headers.get('Content-Range', '').rpartition('/')[2]
      total = int(total) if total.isdigit() else -1
      mode = 'ab'
    else:  # 200: a fresh start, whether or not we asked for a range
      have = 0
      length = r.headers.get('Content-Length')
      total = int(length) if length and length.isdigit() else -1
      mode = 'wb'
    if size is not None and total not in (-1, size):
      raise DownloadError(
        f'{url} is {total} bytes on the server, but {size} bytes were expected: the file has changed or '
        'the URL is wrong.'
      )
    expected = size if size is not None else total
    bar = tqdm.tqdm(
      total=expected if expected >= 0 else None,
      initial=have,
      unit='B',
      unit_scale=True,
      unit_divisor=1024,
      desc=part.name[: -len('.part')],
      disable=not progress,
      leave=False,
    )
    try:
      with open(part, mode) as f:
        for chunk in r.iter_content(CHUNK):
          f.write(chunk)
          bar.update(len(chunk))
    except requests.RequestException as e:  # dropped connection, short body, read timeout
      raise _Incomplete(str(e)) from e
    finally:
      bar.close()
  got = part.stat().st_size
  if expected >= 0 and got < expected:
    raise _Incomplete(f'got {got} of {expected} bytes')
  if expected >= 0 and got > expected:
    part.unlink()
    raise DownloadError(
      f'{url} sent {got} bytes, more than the expected {expected}; removed the partial file.'
    )
  return expected


def download(
  url: str,
  path: str | os.PathLike[str] | None = None,
  *,
  sha256: str | None = None,
  size: int | None = None,
  progress: bool = True,
) -> pathlib.Path:
  """Downloads `url` to `path` (default: `cache_dir()/<file name>`) unless it is there already.

  Returns the path. The file is written to `<path>.part` and renamed only once it is complete: its size
  matches `size` (or the server's Content-Length) and its SHA-256 matches `sha256` when given. A dropped
  connection is resumed with a Range request (or restarted when the server does not support ranges), up to
  `RETRIES` times. Raises DownloadError, naming the URL and where to put the file by hand, when it fails.
  """
  path = pathlib.Path(path).expanduser() if path is not None else cache_path(url)
  if _cached_ok(path, size):
    return path
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DownloadError(f'Cannot create the cache directory {path.parent}: {e}. Set $BIT_CACHE.') from e
  part = pathlib.Path(f'{path}.part')
  with _lock(path):
    if _cached_ok(path, size):  # another process finished it while we waited for the lock
      return path
    errors = []
    for attempt in range(RETRIES + 1):
      had = part.stat().st_size if part.exists() else 0
      try:
        _attempt(url, part, size, progress)
        break
      except _Incomplete as e:
        errors.append(str(e))
      except requests.RequestException as e:
        # Nothing arrived in this attempt (no connection, DNS, refused): most likely offline, so say so
        # now rather than retrying. A connection that dies mid-file is an _Incomplete and is retried.
        raise DownloadError(f'Cannot download {url}: {e}. {_fix_it(url, path)}') from e
      if attempt < RETRIES:
        now = part.stat().st_size if part.exists() else 0
        # No progress in this attempt: wait before asking again; progress: resume at once.
        if now <= had:
          time.sleep(BACKOFF * 2**attempt)
    else:
      raise DownloadError(
        f'Downloading {url} failed {RETRIES + 1} times ({"; ".join(errors)}). The partial file {part} is '
        f'kept and the next call resumes it. {_fix_it(url, path)}'
      )
    if sha256 is not None:
      digest = _sha256(part)
      if digest != sha256.lower():
        part.unlink()
        raise DownloadError(
          f'{url} has SHA-256 {digest}, expected {sha256}: the download is corrupt or the file changed; '
          'removed it, call again to retry.'
        )
    os.replace(part, path)
  return path
