"""Linear probes: they learn a separable set and not random labels; features are cached; few-shot rows."""

import json
import pathlib

import numpy as np
import pytest
from helpers import fast_params, run_cli
from PIL import Image

from bit import checkpoints, data, models, probe
from bit.errors import ConfigError, DataError
from bit.tools import cli


def separable(n_per_class, num_classes=4, dim=64, noise_seed=0, noise=1.0):
  """Gaussian clusters around fixed class means, plus a large offset per feature (what whitening is for).

  The means and offsets are the same for every call; `noise_seed` draws fresh points around them.
  """
  fixed = np.random.default_rng(1234)
  means = fixed.normal(0, 1, (num_classes, dim))
  offset = fixed.normal(50, 10, dim)
  y = np.repeat(np.arange(num_classes), n_per_class)
  x = means[y] + np.random.default_rng(noise_seed).normal(0, noise, (len(y), dim)) + offset
  return x.astype(np.float32), y


@pytest.mark.parametrize('method', ['ridge', 'logreg'])
def test_probe_learns_a_separable_set(method):
  x, y = separable(60, noise_seed=0)
  tx, ty = separable(40, noise_seed=1)
  clf, acc = probe.fit_linear_probe(x, y, 4, method=method, test_x=tx, test_y=ty, steps=300)
  assert acc >= 0.95, acc
  assert clf.method == method and clf.weights.shape == (64, 4)
  assert clf.accuracy(x, y) >= 0.95


@pytest.mark.parametrize('method', ['ridge', 'logreg'])
def test_probe_does_not_learn_random_labels(method):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(400, 32)).astype(np.float32)
  y = rng.integers(0, 4, 400)
  tx = rng.normal(size=(400, 32)).astype(np.float32)
  ty = rng.integers(0, 4, 400)
  _, acc = probe.fit_linear_probe(x, y, 4, method=method, test_x=tx, test_y=ty, steps=300)
  assert acc < 0.35, acc  # chance is 0.25


def test_ridge_matches_the_closed_form():
  # Fewer points than features takes the X X^T branch; both branches equal the textbook solution.
  for n, d in ((30, 10), (8, 20)):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, 3, n)
    clf, _ = probe.fit_linear_probe(x, y, 3, l2_reg=2.0)
    mean, std = x.mean(0), x.std(0) + 1e-5
    z = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=probe.BIAS_CONSTANT)
    t = 2.0 * np.eye(3)[y] - 1
    w = np.linalg.solve(z.T @ z + 2.0 * np.eye(d + 1), z.T @ t)
    np.testing.assert_allclose(clf.logits(x), z @ w, rtol=1e-3, atol=1e-3)


def test_fit_checks_its_input():
  with pytest.raises(ConfigError, match='probe method'):
    probe.fit_linear_probe(np.zeros((2, 3)), np.array([0, 1]), 2, method='svm')
  with pytest.raises(DataError, match='labels must be in'):
    probe.fit_linear_probe(np.zeros((2, 3)), np.array([0, 7]), 2)
  with pytest.raises(DataError, match='shapes'):
    probe.fit_linear_probe(np.zeros((2, 3)), np.array([0, 1, 1]), 2)


def test_few_shot_protocol_and_report():
  x, y = separable(30, num_classes=3, dim=16, noise=0.5)
  tx, ty = separable(10, num_classes=3, dim=16, noise=0.5, noise_seed=1)
  with pytest.warns(UserWarning, match='50-shot skipped'):
    accs = probe.few_shot_accuracies(x, y, tx, ty, 3, shots=(1, 5, 50), seeds=3)
  assert sorted(accs) == [1, 5] and all(len(v) == 3 for v in accs.values())
  assert np.median(accs[5]) >= 0.9
  rows = probe.few_shot_report({1: [0.52, 0.558, 0.6], 5: {0: 0.853, 1: 0.872, 2: 0.891}})
  assert rows == ['  1-shot: 52.0 ← 55.8 → 60.0  (3 seeds)', '  5-shot: 85.3 ← 87.2 → 89.1  (3 seeds)']
  assert probe.few_shot_report({10: [0.5]}, ascii_arrows=True) == [' 10-shot: 50.0 <- 50.0 -> 50.0  (1 seed)']


@pytest.fixture(scope='module')
def workdir_and_folder(tmp_path_factory):
  """A two-class folder (bright vs dark images) and a tiny official-layout model.npz."""
  root = tmp_path_factory.mktemp('probe')
  rng = np.random.default_rng(0)
  for split, n in (('train', 6), ('test', 3)):
    for c, level in (('dark', 40), ('bright', 215)):
      d = root / 'data' / split / c
      d.mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(level + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f'{i}.png')
  model = models.create_model('R26x1', num_classes=2)
  checkpoints.save_npz(fast_params(model), root / 'model.npz')
  return root


def test_run_probe_caches_features(workdir_and_folder, monkeypatch):
  root = workdir_and_folder
  config = {'model': str(root / 'model.npz'), 'dataset': str(root / 'data'), 'crop': 32, 'seed': 0}
  work = root / 'work'
  r = probe.run_probe(config, work, shots=[1, 2], seeds=2, batch_size=4)
  assert r['train_size'] == 12 and r['test_size'] == 6 and r['num_features'] == 2048
  assert r['top1'] >= 5 / 6  # bright vs dark is linearly separable even in random features
  assert sorted(r['few_shot']) == ['1', '2'] and len(r['few_shot_report']) == 2
  saved = json.loads((work / 'probe.json').read_text())
  assert saved['top1'] == r['top1']
  cached = sorted((work / 'features').glob('*.npz'))
  assert len(cached) == 2
  # A second run reads the cache: no image is read or fed to the model again.
  stamps = [p.stat().st_mtime_ns for p in cached]

  def boom(*a, **k):
    raise AssertionError('features were extracted again instead of read from the cache')

  monkeypatch.setattr(data, 'eval_iterator', boom)
  r2 = probe.run_probe(config, work, method='ridge', batch_size=4)
  assert r2['top1'] == r['top1']
  assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_bit_probe_command(workdir_and_folder, capsys, monkeypatch):
  root = workdir_and_folder
  config = pathlib.Path(__file__).parent.parent / 'configs' / 'common.py'
  argv = [
    'bit-probe',
    '--config',
    config,
    f'--config.model={root / "model.npz"}',
    f'--config.dataset={root / "data"}',
    '--config.crop=32',
    '--workdir',
    root / 'work',
    '--shots=1,2',
    '--seeds=2',
    '--batch_size=4',
  ]
  code, out, err = run_cli(cli.probe_main, argv, capsys, monkeypatch)
  assert code == 0, err
  result = json.loads((root / 'work' / 'probe.json').read_text())
  assert f'top-1 {100 * result["top1"]:.2f}%' in out and '(train 12, test 6, 2048 features)' in out
  assert '1-shot:' in out and '2-shot:' in out and '←' in out
  # (config_flags defines its --config.* flags once per process: the other invocations use plain flags.)
  plain = [
    'bit-probe',
    f'--model={root / "model.npz"}',
    f'--dataset={root / "data"}',
    '--workdir',
    root / 'w1',
  ]
  code, out, err = run_cli(cli.probe_main, plain + ['--method=svm'], capsys, monkeypatch)
  assert code != 0 and 'Traceback' not in err and "Unknown probe method 'svm'" in err
  code, out, err = run_cli(cli.probe_main, ['bit-probe', '--workdir', root / 'w2'], capsys, monkeypatch)
  assert code != 0 and 'give the model and the dataset' in err
