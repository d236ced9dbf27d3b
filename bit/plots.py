"""Pictures of a run: training curves from `metrics.jsonl` and confusion matrices, as PNG files.

Matplotlib runs on the Agg backend (no display needed). Files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from typing import Any

import numpy as np

from bit import files
from bit.errors import BitError

# Class names go on the axes up to this many classes; beyond it the axes show indices.
MAX_NAMED_CLASSES = 30
# Counts are written inside the cells up to this many classes.
MAX_ANNOTATED_CLASSES = 15

# Accepted spellings of the logged metrics (the first one found wins).
LOSS_KEYS = ('loss', 'train_loss', 'train/loss')
LR_KEYS = ('lr', 'learning_rate', 'train/lr')
TOP1_KEYS = (
  'top1',
  'top-1',
  'top_1',
  'eval_top1',
  'eval/top1',
  'eval/top-1',
  'test_top1',
  'accuracy',
  'prec@1',
)


def _pyplot():
  import matplotlib

  matplotlib.use('Agg', force=True)
  import matplotlib.pyplot as plt

  return plt


def _save(fig, out_png) -> pathlib.Path:
  out = pathlib.Path(out_png)
  try:
    with files.atomic_write(out, 'wb') as f:
      fig.savefig(f, format='png', dpi=110, bbox_inches='tight')
  finally:
    _pyplot().close(fig)
  return out


def _first(record: dict, keys):
  for k in keys:
    v = record.get(k)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      return float(v)
  return None


def read_metrics(metrics_jsonl_path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
  """Reads a metrics.jsonl into sorted (step, value) series for 'loss', 'lr' and 'top1'.

  A resumed run appends lines for steps it had already logged before the interruption; the line written last
  wins, so the curves show the run that produced the final model. Lines that are not JSON (e.g. a line cut off
  by a killed process) are skipped with a warning.
  """
  path = pathlib.Path(metrics_jsonl_path)
  if not path.is_file():
    raise BitError(
      f'No metrics file at {path}: train into that workdir first (bit-train writes metrics.jsonl).'
    )
  series = {'loss': {}, 'lr': {}, 'top1': {}}
  bad = 0
  with path.open() as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if not isinstance(record, dict) or not isinstance(record.get('step'), (int, float)):
        continue
      step = int(record['step'])
      for name, keys in (('loss', LOSS_KEYS), ('lr', LR_KEYS), ('top1', TOP1_KEYS)):
        value = _first(record, keys)
        if value is not None:
          series[name][step] = value
  if bad:
    warnings.warn(f'{path}: skipped {bad} line(s) that are not JSON.', stacklevel=2)
  return {name: sorted(points.items()) for name, points in series.items()}


def plot_curves(metrics_jsonl_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> pathlib.Path:
  """Plots training loss, learning rate and eval top-1 against the step into one PNG; returns its path."""
  series = read_metrics(metrics_jsonl_path)
  if not any(series.values()):
    raise BitError(f'{metrics_jsonl_path} holds no loss, lr or top-1 values to plot.')
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = [
    ('loss', 'Training loss', 'loss', 'tab:blue'),
    ('lr', 'Learning rate', 'learning rate', 'tab:orange'),
    ('top1', 'Eval top-1 accuracy', 'top-1 (%)', 'tab:green'),
  ]
  for ax, (name, title, ylabel, color) in zip(axes, panels, strict=True):
    points = series[name]
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not points:
      ax.text(0.5, 0.5, 'not logged yet', ha='center', va='center', transform=ax.transAxes, color='gray')
      continue
    steps, values = (np.array(v) for v in zip(*points, strict=True))
    if name == 'top1':
      # Accuracies are logged as fractions; show percent.
      values = values * 100 if values.max() <= 1.0 else values
      ax.plot(steps, values, marker='o', color=color)
      best = int(np.argmax(values))
      ax.annotate(
        f'best {values[best]:.1f}% @ {steps[best]}',
        (steps[best], values[best]),
        textcoords='offset points',
        xytext=(0, -15),
        ha='right',
        fontsize=9,
      )
    else:
      ax.plot(steps, values, color=color, marker='.' if len(points) < 30 else None)
      if name == 'lr':
        ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
  fig.tight_layout()
  return _save(fig, out_png)


def plot_confusion(
  matrix: Any, class_names: Any, out_png: str | os.PathLike[str], *, title: str | None = None
) -> pathlib.Path:
  """Plots a confusion matrix (rows: true class, columns: predicted) into a PNG; returns its path.

  Cells are coloured by the fraction of each true class (row-normalized), so small classes stay visible;
  counts are written in the cells for up to 15 classes. Class names label the axes for up to 30 classes,
  indices beyond that.
  """
  m = np.asarray(matrix)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise BitError(f'A confusion matrix must be square, got shape {m.shape}.')
  n = m.shape[0]
  names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
  if len(names) != n:
    raise BitError(f'{len(names)} class names for a {n}x{n} confusion matrix: pass one name per class.')
  rows = m.sum(axis=1, keepdims=True)
  frac = np.divide(m, rows, out=np.zeros(m.shape, np.float64), where=rows > 0)
  plt = _pyplot()
  # Named axes need room for the labels; an index-only matrix reads fine at a fixed size.
  side = min(max(5.0, 0.35 * n + 3), 14) if n <= MAX_NAMED_CLASSES else 10.0
  fig, ax = plt.subplots(figsize=(side + 1.5, side))
  im = ax.imshow(frac, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
  cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  cbar.set_label('fraction of the true class')
  if n <= MAX_NAMED_CLASSES:
    ticks = np.arange(n)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(names, rotation=60, ha='right', rotation_mode='anchor', fontsize=9)
    ax.set_yticklabels(names, fontsize=9)
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
  else:
    ax.set_xlabel('predicted class (index)')
    ax.set_ylabel('true class (index)')
  if n <= MAX_ANNOTATED_CLASSES:
    for i in range(n):
      for j in range(n):
        if m[i, j]:
          ax.text(
            j,
            i,
            str(int(m[i, j])),
            ha='center',
            va='center',
            fontsize=9,
            color='white' if frac[i, j] > 0.5 else 'black',
          )
  total = m.sum()
  acc = np.trace(m) / total * 100 if total else float('nan')
  ax.set_title(title or f'Confusion matrix ({int(total)} examples, top-1 {acc:.1f}%)')
  fig.tight_layout()
  return _save(fig, out_png)
