"""The offline demo: the digits export, and `bit-train --config configs/demo.py` end to end at a tiny size.

The 'pretrained beats scratch' claim is for the full demo (a command, see the README); here the demo runs
with a few steps and asserts the story's artifacts: the pretrained official-layout checkpoint, both few-shot
runs with metrics, curves and confusion matrices, the summary with both accuracies, and a rerun that skips
every finished stage.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import without_compilation_cache
from PIL import Image

from bit.errors import ConfigError
from bit.tools import demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_CONFIG = str(ROOT / 'configs' / 'demo.py')
# The demo at a tiny size: 5 steps per stage, 2 shots, one seed (4 devices in the test session: batches of 8).
TINY = [
  '--config.demo.pretrain_steps=5',
  '--config.demo.pretrain_batch_size=8',
  '--config.examples_per_class=2',
  '--config.batch_size=8',
  '--config.schedule=(1,2,3,4,5)',
  '--config.demo.num_seeds=1',
  '--config.checkpoint_every=0',
  '--config.log_every=1',
]


def bit_train(*args, cache):
  cmd = [sys.executable, '-c', 'from bit.tools.cli import train_main; train_main()', *map(str, args)]
  # The demo's own JAX compilation cache goes there (not the test session's: the test checks the demo's).
  env = {**without_compilation_cache(os.environ), 'BIT_CACHE': str(cache)}
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def test_export_digits(tmp_path):
  out = demo.export_digits(tmp_path, image_size=32, seed=0, rotations=False)
  from sklearn.datasets import load_digits

  targets = load_digits().target
  seen = set()
  for part, digits in (('pretrain', demo.PRETRAIN_DIGITS), ('transfer', demo.TRANSFER_DIGITS)):
    root = out[part]
    assert sorted(p.name for p in root.iterdir()) == ['test', 'train']
    for d in digits:
      train = {p.name for p in (root / 'train' / str(d)).glob('*.png')}
      test = {p.name for p in (root / 'test' / str(d)).glob('*.png')}
      assert not train & test
      assert len(train) + len(test) == int((targets == d).sum())
      assert abs(len(test) - (targets == d).sum() / 3) <= 1
      seen |= train | test
    assert sorted(p.name for p in (root / 'train').iterdir()) == [str(d) for d in digits]
  assert len(seen) == len(targets)  # every scan exactly once
  some = next((out['transfer'] / 'test' / '7').glob('*.png'))
  with Image.open(some) as im:
    assert im.size == (32, 32) and im.mode == 'RGB'
    pixels = np.asarray(im)
  assert pixels.min() < 64 and pixels.max() > 192  # dark ink on white, not a blank image
  # A second export reuses the first; another seed gives another split.
  before = some.stat().st_mtime_ns
  assert demo.export_digits(tmp_path, image_size=32, seed=0, rotations=False) == out
  assert some.stat().st_mtime_ns == before
  other = demo.export_digits(tmp_path, image_size=32, seed=1, rotations=False)
  test0 = {p.name for p in (out['transfer'] / 'test' / '7').glob('*.png')}
  test1 = {p.name for p in (other['transfer'] / 'test' / '7').glob('*.png')}
  assert test0 != test1
  assert not list(tmp_path.glob('.digits*'))  # no temporary directory left behind


def test_export_digits_with_rotations(tmp_path):
  plain = demo.export_digits(tmp_path, image_size=32, seed=0, rotations=False)
  rot = demo.export_digits(tmp_path, image_size=32, seed=0, rotations=True)
  classes = sorted(p.name for p in (rot['pretrain'] / 'train').iterdir())
  assert classes == sorted(f'{d}_rot{a}' for d in demo.PRETRAIN_DIGITS for a in (0, 90, 180, 270))
  # The same scans in each orientation, the same split; the transfer set is untouched by rotations.
  for split in ('train', 'test'):
    names = {p.name for p in (plain['pretrain'] / split / '3').glob('*.png')}
    for a in (0, 90, 180, 270):
      assert {p.name for p in (rot['pretrain'] / split / f'3_rot{a}').glob('*.png')} == names
    assert sorted(p.name for p in (rot['transfer'] / split).iterdir()) == ['5', '6', '7', '8', '9']
  name = next((plain['pretrain'] / 'train' / '3').glob('*.png')).name
  upright = np.asarray(Image.open(rot['pretrain'] / 'train' / '3_rot0' / name), np.float32)
  turned = np.asarray(Image.open(rot['pretrain'] / 'train' / '3_rot90' / name), np.float32)
  assert np.abs(np.rot90(upright) - turned).mean() < 2  # up to the resampling's rounding
  assert np.abs(upright - turned).mean() > 10


def test_scaled_schedule_keeps_the_hyperrule_shape():
  assert demo.scaled_schedule(500) == (100, 200, 300, 400, 500)
  assert demo.scaled_schedule(50) == (10, 20, 30, 40, 50)
  assert demo.scaled_schedule(5) == (1, 2, 3, 4, 5)
  with pytest.raises(ConfigError, match='steps=3'):
    demo.scaled_schedule(3)


def test_finished_result_refuses_other_settings(tmp_path):
  from bit import config as common

  c = common.get_config()
  c.dataset, c.model = '/data/x', 'R26x1'
  (tmp_path / demo.RESULT_FILE).write_text(
    json.dumps({'metrics': {'top1': 0.5}, 'config': demo.fingerprint(c)})
  )
  assert demo.finished_result(tmp_path, c)['metrics']['top1'] == 0.5
  c.log_every = 1  # operational: the result still counts
  assert demo.finished_result(tmp_path, c) is not None
  c.base_lr = 0.1
  with pytest.raises(ConfigError, match='base_lr'):
    demo.finished_result(tmp_path, c)
  assert demo.finished_result(tmp_path / 'nothing_here', c) is None


def test_demo_end_to_end(tmp_path):
  workdir = tmp_path / 'demo'
  first = bit_train('--config', DEMO_CONFIG, '--workdir', workdir, *TINY, cache=tmp_path / 'cache')
  assert first.returncode == 0, first.stderr[-3000:]

  # The story's artifacts: the pretrained checkpoint in the official layout, loadable as a checkpoint.
  import bit

  model, params = bit.load(str(workdir / 'pretrain' / 'model.npz'), keep_head=True)
  assert params['head']['kernel'].shape[-1] == 20  # digits 0-4 x 4 orientations
  assert (workdir / 'pretrain' / 'labels.txt').read_text().split()[:5] == [
    '0_rot0',
    '0_rot180',
    '0_rot270',
    '0_rot90',
    '1_rot0',
  ]
  for stage in ('pretrain', 'finetune/2shot-seed0', 'scratch/2shot-seed0'):
    d = workdir / stage
    for name in ('model.npz', 'metrics.jsonl', 'config.json', 'curves.png', 'result.json'):
      assert (d / name).is_file(), f'{d / name} is missing'
    assert list(d.glob('confusion*.png')), f'no confusion matrix in {d}'
  ft = json.loads((workdir / 'finetune' / '2shot-seed0' / 'config.json').read_text())
  sc = json.loads((workdir / 'scratch' / '2shot-seed0' / 'config.json').read_text())
  assert ft['model'] == str(workdir / 'pretrain' / 'model.npz') and sc['model'] == 'R26x1'
  assert ft['examples_per_class'] == sc['examples_per_class'] == 2
  assert ft['dataset'] == sc['dataset'] and ft['dataset'].endswith('transfer')
  assert (workdir / 'finetune' / '2shot-seed0' / 'labels.txt').read_text().split() == [
    '5',
    '6',
    '7',
    '8',
    '9',
  ]

  # The summary holds both accuracies, side by side, as measured by the stages.
  summary = json.loads((workdir / 'demo.json').read_text())
  (row,) = summary['seeds']
  ft_top1 = json.loads((workdir / 'finetune' / '2shot-seed0' / 'result.json').read_text())['metrics']['top1']
  sc_top1 = json.loads((workdir / 'scratch' / '2shot-seed0' / 'result.json').read_text())['metrics']['top1']
  assert row['pretrained_top1'] == ft_top1 and row['scratch_top1'] == sc_top1
  assert 0.0 <= ft_top1 <= 1.0 and 0.0 <= sc_top1 <= 1.0
  md = (workdir / 'demo.md').read_text()
  assert f'{ft_top1:.1%}' in md and f'{sc_top1:.1%}' in md
  assert f'{ft_top1:.1%}' in first.stdout  # printed at the end of the run

  # A rerun skips every finished stage: nothing is trained or rewritten.
  mtimes = {p: p.stat().st_mtime_ns for p in workdir.glob('*/**/model.npz')}
  assert len(mtimes) == 3
  second = bit_train('--config', DEMO_CONFIG, '--workdir', workdir, *TINY, cache=tmp_path / 'cache')
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count('finished before') == 3, second.stdout
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  assert json.loads((workdir / 'demo.json').read_text())['seeds'] == summary['seeds']
  assert list((tmp_path / 'cache' / 'jax_compilation_cache').iterdir())  # later stages reuse compilations
