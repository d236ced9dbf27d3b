"""The workdir at start-up: OS errors as one-line errors, config.json only once the run has started, dataset
paths compared normalized."""

import errno
import os

import numpy as np
import pytest
from helpers import checkpoint_bytes
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


def _one_line_workdir_error(workdir, folder, text):
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(_config(folder, 'R26x1'), workdir)
  message = str(e.value)
  assert message.startswith(f"workdir='{workdir}' cannot be used: ") and '\n' not in message, message
  assert text in message and message.endswith('give a writable folder.'), message


def test_a_workdir_inside_a_file_is_a_one_line_error(tmp_path, folder):
  (tmp_path / 'file').write_text('x')
  _one_line_workdir_error(tmp_path / 'file' / 'run', folder, 'Not a directory')


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a read-only folder')
def test_a_workdir_in_a_read_only_folder_is_a_one_line_error(tmp_path, folder):
  (tmp_path / 'ro').mkdir(mode=0o555)
  _one_line_workdir_error(tmp_path / 'ro' / 'run', folder, 'Permission denied')


@pytest.mark.parametrize(
  'code, text', [(errno.EROFS, 'Read-only file system'), (errno.ENOSPC, 'No space left on device')]
)
def test_a_read_only_or_full_disk_is_a_one_line_error(tmp_path, folder, monkeypatch, code, text):
  """The OS's answer when the workdir is on a read-only or full file system (what running as root, or
  without such a disk, cannot set up): creating the folder fails."""
  mkdir = os.mkdir

  def full_or_read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path / 'disk')):
      raise OSError(code, text, str(path))
    return mkdir(path, *args, **kwargs)

  monkeypatch.setattr(os, 'mkdir', full_or_read_only)
  _one_line_workdir_error(tmp_path / 'disk' / 'run', folder, text)


def test_every_reader_of_a_finished_run_takes_its_size_from_the_runs_crop(tmp_path):
  """bit-export, bit-predict and bit-eval read a workdir through `workdir.load`: the size is the run's crop
  (48 here), never a default of 224, and a config.json without a crop is an error naming it."""
  from bit import prediction
  from bit.export import load_source

  (tmp_path / 'model.npz').write_bytes(checkpoint_bytes(classes=3))
  files.write_text(tmp_path / 'labels.txt', 'a\nb\nc\n')
  files.write_json(tmp_path / 'config.json', {'dataset': 'x', 'crop': 48})
  run = workdir.load(tmp_path)
  assert (run.model.input_size, run.model.num_classes, run.class_names) == (48, 3, ['a', 'b', 'c'])
  assert run.config['crop'] == 48 and run.npz == tmp_path / 'model.npz'
  assert load_source(workdir=tmp_path)[2:] == (['a', 'b', 'c'], 48, tmp_path / 'model.npz')
  assert prediction.load_for_prediction(workdir=tmp_path)[2:] == (['a', 'b', 'c'], 48)
  files.write_json(tmp_path / 'config.json', {'dataset': 'x'})
  with pytest.raises(BitError, match=r'config.json has no valid crop'):
    workdir.load(tmp_path)
  files.write_text(tmp_path / 'labels.txt', 'a\nb\n')
  files.write_json(tmp_path / 'config.json', {'dataset': 'x', 'crop': 48})
  with pytest.raises(BitError, match=r'labels.txt has 2 names but .* has 3 classes'):
    workdir.load(tmp_path)
