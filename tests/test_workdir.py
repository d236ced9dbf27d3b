"""The workdir at start-up: OS errors as one-line errors, config.json only once the run has started, dataset
paths compared normalized."""

import errno

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from bit import cli, train
from bit.errors import ConfigError


@pytest.fixture
def folder(tmp_path):
  for split in ('train', 'test'):
    for c in ('a', 'b'):
      d = tmp_path / 'ds' / split / c
      d.mkdir(parents=True)
      for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 + 150 * (c == 'b'), np.uint8)).save(d / f'{i}.png')
  return tmp_path / 'ds'


def _train(workdir, folder, *extra):
  return [
    'bit-train',
    '--config',
    'configs/common.py',
    '--workdir',
    workdir,
    f'--config.dataset={folder}',
    '--config.batch_size=4',
    '--config.schedule=[0,0,1,2,3]',
    *extra,
  ]


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path, folder, capsys, monkeypatch):
  (tmp_path / 'file').write_text('x')
  code, _, err = run_cli(
    cli.train_main, _train(tmp_path / 'file', folder, '--config.model=R26x1'), capsys, monkeypatch
  )
  assert code == 2 and err.startswith(f"bit-train: error: --workdir='{tmp_path / 'file'}' cannot be used")
  assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err


def test_a_run_that_fails_at_start_up_leaves_no_config(tmp_path, folder, capsys, monkeypatch):
  code, _, err = run_cli(
    cli.train_main, _train(tmp_path / 'w', folder, '--config.model=R27x1'), capsys, monkeypatch
  )
  assert code == 2 and 'R27x1' in err
  assert not (tmp_path / 'w' / 'config.json').exists()  # the corrected command is not "a different run"


def test_dataset_paths_are_compared_normalized(tmp_path):
  train.files.write_json(tmp_path / 'config.json', {'dataset': '/data/flowers', 'seed': 0})
  train._check_workdir_config(tmp_path, {'dataset': '/data/flowers/', 'seed': 0}, write=False)
  train._check_workdir_config(tmp_path, {'dataset': '/data/./flowers', 'seed': 0}, write=False)
  with pytest.raises(ConfigError, match='holds a different run'):
    train._check_workdir_config(tmp_path, {'dataset': '/data/birds', 'seed': 0}, write=False)


def test_a_read_only_or_full_workdir_is_a_config_error(tmp_path):
  """EROFS (read-only) and ENOSPC (full disk) as they reach the code: one ConfigError naming the workdir."""
  for code, text in ((errno.EROFS, 'Read-only file system'), (errno.ENOSPC, 'No space left on device')):
    with pytest.raises(ConfigError, match=f"workdir='{tmp_path}' cannot be used: .*{text}; give a writable"):
      with train._workdir_errors(tmp_path):
        raise OSError(code, text, str(tmp_path / 'config.json'))
