"""Atomic writes: the old file survives a failed write, and no temporary file is left behind."""

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
