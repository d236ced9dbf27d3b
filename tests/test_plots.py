"""Training curves and confusion-matrix pictures."""

import json

import numpy as np
import pytest

from bit import plots
from bit.errors import BitError

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _is_png(path):
  data = path.read_bytes()
  return data[:8] == PNG_MAGIC and len(data) > 5000


def _write_log(path, lines):
  path.write_text(''.join((json.dumps(x) if isinstance(x, dict) else x) + '\n' for x in lines))


def test_read_metrics_resumed_log_keeps_the_last_line_per_step(tmp_path):
  log = tmp_path / 'metrics.jsonl'
  _write_log(
    log,
    [
      {'step': 1, 'loss': 2.0, 'lr': 0.001},
      {'step': 2, 'loss': 1.8, 'lr': 0.002},
      {'step': 3, 'loss': 1.7, 'lr': 0.003},
      {'step': 2, 'top1': 0.4, 'top5': 0.9},
      '{"step": 4, "loss": 1.',  # cut off by a killed process
      # resumed from the checkpoint at step 2: steps 3 and 4 are logged again
      {'step': 3, 'loss': 1.5, 'lr': 0.003},
      {'step': 4, 'loss': 1.2, 'lr': 0.004},
      {'step': 4, 'top-1': 0.6},
    ],
  )
  with pytest.warns(UserWarning, match='not JSON'):
    series = plots.read_metrics(log)
  assert series['loss'] == [(1, 2.0), (2, 1.8), (3, 1.5), (4, 1.2)]
  assert series['top1'] == [(2, 0.4), (4, 0.6)]
  assert [s for s, _ in series['lr']] == [1, 2, 3, 4]


def test_plot_curves(tmp_path):
  log = tmp_path / 'metrics.jsonl'
  lines = [
    {'step': s, 'loss': 2.3 * 0.98**s, 'lr': 0.003 * min(1, s / 10), 'images/s': 50.0} for s in range(1, 60)
  ]
  lines += [{'step': s, 'top1': 0.3 + s / 100, 'top5': 0.9} for s in (20, 40, 59)]
  _write_log(log, lines)
  out = plots.plot_curves(log, tmp_path / 'curves.png')
  assert out == tmp_path / 'curves.png' and _is_png(out)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temp files left behind


def test_plot_curves_without_eval_lines(tmp_path):
  log = tmp_path / 'metrics.jsonl'
  _write_log(log, [{'step': s, 'loss': 1.0 / s, 'lr': 0.01} for s in range(1, 5)])
  assert _is_png(plots.plot_curves(log, tmp_path / 'c.png'))


def test_plot_curves_errors(tmp_path):
  with pytest.raises(BitError, match='No metrics file'):
    plots.plot_curves(tmp_path / 'missing.jsonl', tmp_path / 'c.png')
  (tmp_path / 'empty.jsonl').write_text('{"step": 1, "images/s": 3}\n')
  with pytest.raises(BitError, match='no loss'):
    plots.plot_curves(tmp_path / 'empty.jsonl', tmp_path / 'c.png')


@pytest.mark.parametrize('n', [4, 40])
def test_plot_confusion(tmp_path, n, monkeypatch):
  import matplotlib.axes

  shown = []
  imshow = matplotlib.axes.Axes.imshow
  monkeypatch.setattr(
    matplotlib.axes.Axes, 'imshow', lambda ax, x, **kw: shown.append(x) or imshow(ax, x, **kw)
  )
  rng = np.random.default_rng(0)
  m = rng.integers(0, 5, (n, n)) + np.eye(n, dtype=int) * 20
  m[1] = 0  # a class with no examples must not break the row normalization
  names = [f'class_{i}' for i in range(n)]
  out = plots.plot_confusion(m, names, tmp_path / f'confusion_{n}.png')
  assert _is_png(out)
  # What is drawn is each true class's row as fractions of that class; the empty row stays 0, not NaN.
  (frac,) = shown
  assert np.isfinite(frac).all() and (frac[1] == 0).all()
  others = np.delete(np.arange(n), 1)
  np.testing.assert_allclose(frac[others], m[others] / m[others].sum(1, keepdims=True))


def test_plot_confusion_checks_its_input(tmp_path):
  with pytest.raises(BitError, match='square'):
    plots.plot_confusion(np.zeros((2, 3)), ['a', 'b'], tmp_path / 'c.png')
  with pytest.raises(BitError, match='class names'):
    plots.plot_confusion(np.zeros((2, 2)), ['a'], tmp_path / 'c.png')
