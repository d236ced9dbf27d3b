"""bit.downloader (bit.download) against a local HTTP server on 127.0.0.1: cache, resume, clean retry, integrity, offline."""

import contextlib
import hashlib
import socket

import pytest
from helpers import FileServer, checkpoint_bytes

from bit import downloader as dl
from bit.errors import DownloadError


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
