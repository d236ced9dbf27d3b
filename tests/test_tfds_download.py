"""TFDS's real download-and-prepare path (not tfds.testing.mock_data), offline.

A tiny builder in a package module (as TFDS's own builders are) downloads its archive through TFDS's download
manager from a local HTTP server, then `bit.evaluate` and `train_and_evaluate` use it by name. A real TFDS
name with the network unreachable fails with a network error that says what to do; an unknown name names a
few close matches, never TFDS's whole catalogue.
"""

import socket

import numpy as np
import pytest
from helpers import FileServer, fast_params
from tfds_builders import bit_tiny_download as tiny

import bit
from bit import config as common
from bit import data_sources, models, train
from bit.errors import DataError
from bit.testing import random_checkpoint
from bit.tools import cli


@pytest.fixture
def offline(monkeypatch):
  """No host but 127.0.0.1 resolves (as on a machine without network), and TFDS does not retry for minutes."""
  from tensorflow_datasets.core.download import downloader

  real = socket.getaddrinfo

  def getaddrinfo(host, *args, **kwargs):
    if host not in ('127.0.0.1', 'localhost'):
      raise socket.gaierror(socket.EAI_NONAME, f'{host}: name resolution is off in this test')
    return real(host, *args, **kwargs)

  monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)
  monkeypatch.setattr(downloader, 'MAX_RETRIES', 0)
  for var in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'ALL_PROXY', 'all_proxy'):
    monkeypatch.delenv(var, raising=False)


def test_a_tfds_builder_that_downloads_is_prepared_then_evaluated_and_trained_by_name(
  tmp_path, monkeypatch, offline
):
  with FileServer({tiny.ARCHIVE: tiny.archive_bytes()}) as server:
    monkeypatch.setattr(tiny.BitTinyDownload, 'URL', server.url)
    model = models.create_model('R26x1', num_classes=2)
    result = bit.evaluate(
      model, fast_params(model, head_std=0.1), 'bit_tiny_download', data_dir=tmp_path, crop=32, batch_size=4
    )
  assert [r[0] for r in server.requests] == [f'/{tiny.ARCHIVE}']  # downloaded once, through TFDS
  assert result['count'] == 4 and result['class_names'] == list(tiny.CLASSES)
  assert (tmp_path / 'bit_tiny_download' / '1.0.0').is_dir()

  # Prepared now: training by name reads it from data_dir (the server is gone).
  npz = tmp_path / 'r26x1.npz'
  np.savez(npz, **random_checkpoint(26, 1, 5, 0))
  c = common.get_config()
  c.model, c.dataset, c.data_dir = str(npz), 'bit_tiny_download', str(tmp_path)
  c.batch_size, c.resize, c.crop, c.schedule, c.mixup_alpha, c.num_devices = (
    4,
    32,
    32,
    (0, 0, 1, 2, 3),
    0.0,
    1,
  )
  metrics = train.train_and_evaluate(c, tmp_path / 'run')
  assert metrics['step'] == 3 and metrics['num_examples'] == 4 and np.isfinite(metrics['loss'])
  assert (tmp_path / 'run' / 'labels.txt').read_text().split() == list(tiny.CLASSES)


def test_a_real_tfds_name_without_network_says_so_and_what_to_do(tmp_path, offline):
  with pytest.raises(DataError) as e:
    data_sources.load_split('cifar10', 'train', tmp_path)
  message = str(e.value)
  assert "TFDS dataset 'cifar10'" in message and 'www.cs.toronto.edu cannot be reached' in message
  assert 'HTTPS_PROXY' in message and 'data_dir=' in message
  assert 'No module named' not in message and '\n' not in message
  # The command line shows the argument as its flag.
  assert 'as --config.data_dir=' in cli.as_flags('bit-train', message)
  assert 'as --config.data_dir=' in cli.as_flags('bit-probe', message)


def test_an_unknown_tfds_name_names_a_few_close_matches(tmp_path):
  with pytest.raises(DataError) as e:
    data_sources.load_split('cifar_10', 'train', tmp_path)
  message = str(e.value)
  assert "dataset='cifar_10'" in message and "'cifar10'" in message and len(message) < 400
  with pytest.raises(DataError) as e:
    data_sources.load_split('qqqqqqqq', 'train', tmp_path)
  assert 'tfds.list_builders()' in str(e.value) and len(str(e.value)) < 400
