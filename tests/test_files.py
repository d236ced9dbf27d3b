"""Atomic writes: the old file survives a failed write, and no temporary file is left behind."""

import os
import stat

import numpy as np
import pytest

from bit import files


def test_write_text_and_json(tmp_path):
  files.write_text(tmp_path / 'a' / 'x.txt', 'hello')
  assert (tmp_path / 'a' / 'x.txt').read_text() == 'hello'
  files.write_json(tmp_path / 'y.json', {'k': 1})
  assert (tmp_path / 'y.json').read_text() == '{\n  "k": 1\n}\n'


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / 'keep.txt'
  files.write_text(path, 'old')
  with pytest.raises(RuntimeError):
    with files.atomic_write(path) as f:
      f.write('half of the new')
      raise RuntimeError('killed mid-write')
  assert path.read_text() == 'old'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.txt']


def test_save_npz(tmp_path):
  files.save_npz(tmp_path / 'w.npz', a=np.arange(3), b=np.ones((2, 2), np.float32))
  with np.load(tmp_path / 'w.npz') as z:
    assert sorted(z.files) == ['a', 'b'] and z['a'].tolist() == [0, 1, 2]


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_keep_the_umask_permissions(tmp_path, umask):
  files.write_text(tmp_path / 'labels.txt', 'a\n')
  files.write_json(tmp_path / 'config.json', {})
  files.save_npz(tmp_path / 'model.npz', a=np.zeros(1))
  for name in ('labels.txt', 'config.json', 'model.npz'):
    assert _mode(tmp_path / name) == 0o666 & ~umask, name  # 0644 under umask 022: readable by others
  with files.atomic_write(tmp_path / 'secret', private=True) as f:
    f.write('x')
  assert _mode(tmp_path / 'secret') == 0o600
  folder = files.temporary_dir(tmp_path, prefix='.export.')
  assert _mode(folder) == 0o777 & ~umask  # 0755 under umask 022 (mkdtemp alone gives 0700)
  assert files.umask() == umask
