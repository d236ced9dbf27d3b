"""The workdir at start-up: OS errors as one-line errors, config.json only once the run has started, dataset
paths compared normalized."""

import errno

import numpy as np
import pytest
from PIL import Image

from bit import config as common
from bit import files, train, workdir
from bit.errors import BitError, ConfigError
from bit.tools import cli


@pytest.fixture
def folder(tmp_path):
  for split in ('train', 'test'):
    for c in ('a', 'b'):
      d = tmp_path / 'ds' / split / c
      d.mkdir(parents=True)
      for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 + 150 * (c == 'b'), np.uint8)).save(d / f'{i}.png')
  return tmp_path / 'ds'


def _config(folder, model):
  c = common.get_config()
  c.model, c.dataset, c.batch_size, c.schedule, c.num_devices = model, str(folder), 4, (0, 0, 1, 2, 3), 1
  return c


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path, folder):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(_config(folder, 'R26x1'), tmp_path / 'file')
  message = str(e.value)
  assert message.startswith(f"workdir='{tmp_path / 'file'}' cannot be used") and '\n' not in message
  assert cli.as_flags('bit-train', message).startswith(f"--workdir='{tmp_path / 'file'}' cannot be used")


def test_a_run_that_fails_at_start_up_leaves_no_config(tmp_path, folder):
  with pytest.raises(BitError, match='R27x1'):
    train.train_and_evaluate(_config(folder, 'R27x1'), tmp_path / 'w')
  assert not (tmp_path / 'w' / 'config.json').exists()  # the corrected command is not "a different run"


def test_dataset_paths_are_compared_normalized(tmp_path):
  files.write_json(tmp_path / 'config.json', {'dataset': '/data/flowers', 'seed': 0})
  workdir.check_same_run(tmp_path, {'dataset': '/data/flowers/', 'seed': 0}, write=False)
  workdir.check_same_run(tmp_path, {'dataset': '/data/./flowers', 'seed': 0}, write=False)
  with pytest.raises(ConfigError, match='holds a different run'):
    workdir.check_same_run(tmp_path, {'dataset': '/data/birds', 'seed': 0}, write=False)


def test_a_read_only_or_full_workdir_is_a_config_error(tmp_path):
  """EROFS (read-only) and ENOSPC (full disk) as they reach the code: one ConfigError naming the workdir."""
  for code, text in ((errno.EROFS, 'Read-only file system'), (errno.ENOSPC, 'No space left on device')):
    with pytest.raises(ConfigError, match=f"workdir='{tmp_path}' cannot be used: .*{text}; give a writable"):
      with workdir.errors(tmp_path):
        raise OSError(code, text, str(tmp_path / 'config.json'))
