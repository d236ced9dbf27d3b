"""bit.downloader (bit.download) against a local HTTP server on 127.0.0.1: cache, resume, clean retry, integrity, offline."""

import contextlib
import hashlib
import http.server
import io
import socket
import threading

import numpy as np
import pytest
from make_checkpoint import random_checkpoint

from bit import downloader as dl
from bit.errors import DownloadError


class _QuietServer(http.server.ThreadingHTTPServer):
  def handle_error(self, request, client_address):
    pass  # a client that hangs up early (as some tests make it) is expected here, not a failure


class FileServer:
  """Serves `files` (name -> bytes) on 127.0.0.1 and records every request as (path, Range header).

  Misbehaviour on demand: `ranges=False` ignores Range headers (always 200, whole file); `drops=n` cuts the
  body of the next n responses after `drop_at` bytes and closes the connection (the Content-Length still
  promises the whole body).
  """

  def __init__(self, files):
    self.files = dict(files)
    self.requests = []
    self.ranges = True
    self.drops = 0
    self.drop_at = 0
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 - the http.server API
        rng = self.headers.get('Range')
        server.requests.append((self.path, rng))
        data = server.files.get(self.path.lstrip('/'))
        if data is None:
          self.send_error(404)
          return
        start = 0
        if rng and server.ranges:
          start = int(rng.split('=')[1].split('-')[0])
          if start >= len(data):
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{len(data)}')
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
          self.send_response(206)
          self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        else:
          self.send_response(200)
        if server.ranges:
          self.send_header('Accept-Ranges', 'bytes')
        body = data[start:]
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if server.drops > 0:
          server.drops -= 1
          body = body[: server.drop_at]
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = _QuietServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
    self.thread = threading.Thread(
      target=self.httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True
    )

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


def checkpoint_bytes(depth=26, classes=10, seed=0) -> bytes:
  """A generated checkpoint in the official layout, as the bytes of its .npz file."""
  buf = io.BytesIO()
  np.savez(buf, **random_checkpoint(depth=depth, width=1, classes=classes, seed=seed))
  return buf.getvalue()


@pytest.fixture(scope='module')
def blob():
  return checkpoint_bytes()


@pytest.fixture
def server(blob):
  with FileServer({'BiT-T-R26x1.npz': blob}) as s:
    yield s


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
  monkeypatch.setenv('BIT_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(dl, 'BACKOFF', 0.0)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
  assert dl.cache_dir() == tmp_path / 'cache'
  monkeypatch.delenv('BIT_CACHE')
  assert str(dl.cache_dir()).endswith('.cache/bit') and '~' not in str(dl.cache_dir())


def test_first_download_then_cache_hit(server, blob, tmp_path):
  url = server.url + 'BiT-T-R26x1.npz'
  path = dl.download(url, progress=False)
  assert path == tmp_path / 'cache' / 'BiT-T-R26x1.npz'
  assert path.read_bytes() == blob
  assert not path.with_name(path.name + '.part').exists()
  assert server.requests == [('/BiT-T-R26x1.npz', None)]
  # A cache hit makes no request at all.
  assert dl.download(url, progress=False, size=len(blob)) == path
  assert len(server.requests) == 1


def test_progress_bar_on_stderr_only_when_asked(server, blob, tmp_path, capsys):
  dl.download(server.url + 'BiT-T-R26x1.npz', tmp_path / 'x.npz', progress=True)
  out, err = capsys.readouterr()
  assert out == '' and 'x.npz' in err and 'B/s' in err  # stdout stays clean for piping
  assert (tmp_path / 'x.npz').read_bytes() == blob
  dl.download(server.url + 'BiT-T-R26x1.npz', tmp_path / 'y.npz', progress=False)
  assert capsys.readouterr() == ('', '')


def test_dropped_connection_is_resumed_with_range(server, blob):
  server.drops, server.drop_at = 1, len(blob) // 2
  path = dl.download(server.url + 'BiT-T-R26x1.npz', progress=False)
  assert path.read_bytes() == blob
  assert len(server.requests) == 2 and server.requests[0] == ('/BiT-T-R26x1.npz', None)
  # The second request asks only for the rest (from what reached the disk: at most the half that was sent).
  start = int(server.requests[1][1].removeprefix('bytes=').removesuffix('-'))
  assert 0 < start <= len(blob) // 2


def test_part_file_of_an_earlier_run_is_resumed(server, blob, tmp_path):
  path = tmp_path / 'cache' / 'BiT-T-R26x1.npz'
  path.parent.mkdir(parents=True)
  third = len(blob) // 3
  (tmp_path / 'cache' / 'BiT-T-R26x1.npz.part').write_bytes(blob[:third])
  assert dl.download(server.url + 'BiT-T-R26x1.npz', progress=False) == path
  assert path.read_bytes() == blob
  assert server.requests == [('/BiT-T-R26x1.npz', f'bytes={third}-')]


def test_server_without_range_support_gets_a_clean_retry(server, blob):
  server.ranges = False
  server.drops, server.drop_at = 1, len(blob) // 2
  path = dl.download(server.url + 'BiT-T-R26x1.npz', progress=False)
  assert path.read_bytes() == blob  # not the first half twice
  assert len(server.requests) == 2


def test_stale_part_longer_than_the_file_restarts(server, blob, tmp_path):
  part = tmp_path / 'cache' / 'BiT-T-R26x1.npz.part'
  part.parent.mkdir(parents=True)
  part.write_bytes(blob + b'junk')
  assert dl.download(server.url + 'BiT-T-R26x1.npz', progress=False).read_bytes() == blob


def test_truncated_download_never_reaches_the_final_name(server, blob, tmp_path):
  server.ranges = False
  server.drops, server.drop_at = 100, len(blob) - 10
  with pytest.raises(DownloadError, match='BiT-T-R26x1.npz') as e:
    dl.download(server.url + 'BiT-T-R26x1.npz', progress=False)
  assert 'failed 4 times' in str(e.value)
  assert not (tmp_path / 'cache' / 'BiT-T-R26x1.npz').exists()
  assert len(server.requests) == dl.RETRIES + 1


def test_size_mismatch_is_rejected(server, blob, tmp_path):
  with pytest.raises(DownloadError, match=f'{len(blob)} bytes on the server, but {len(blob) + 1}'):
    dl.download(server.url + 'BiT-T-R26x1.npz', size=len(blob) + 1, progress=False)
  assert not (tmp_path / 'cache' / 'BiT-T-R26x1.npz').exists()


def test_cached_file_of_the_wrong_size_is_fetched_again(server, blob, tmp_path):
  path = tmp_path / 'cache' / 'BiT-T-R26x1.npz'
  path.parent.mkdir(parents=True)
  path.write_bytes(blob[:100])
  assert dl.download(server.url + 'BiT-T-R26x1.npz', size=len(blob), progress=False).read_bytes() == blob
  assert len(server.requests) == 1


def test_sha256_checked(server, blob, tmp_path):
  url = server.url + 'BiT-T-R26x1.npz'
  with pytest.raises(DownloadError, match='SHA-256'):
    dl.download(url, sha256='0' * 64, progress=False)
  assert not (tmp_path / 'cache' / 'BiT-T-R26x1.npz').exists()
  assert not (tmp_path / 'cache' / 'BiT-T-R26x1.npz.part').exists()
  good = hashlib.sha256(blob).hexdigest()
  assert dl.download(url, sha256=good, progress=False).read_bytes() == blob


def test_http_error_names_the_url(server):
  with pytest.raises(DownloadError, match=r'nothing\.npz failed: HTTP 404'):
    dl.download(server.url + 'nothing.npz', progress=False)


def test_offline_error_says_what_to_fetch_and_where(tmp_path):
  with contextlib.closing(socket.socket()) as s:  # a port that nobody listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}/BiT-M-R50x1.npz'
  with pytest.raises(DownloadError) as e:
    dl.download(url, progress=False)
  msg = str(e.value)
  assert f'fetch {url}' in msg
  assert f'put it at {tmp_path / "cache" / "BiT-M-R50x1.npz"}' in msg
  assert not (tmp_path / 'cache' / 'BiT-M-R50x1.npz').exists()
