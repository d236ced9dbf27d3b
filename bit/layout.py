"""The file names of a training workdir: the one place they are spelled (`bit.workdir` reads and writes them).

  WORKDIR/
    config.json               CONFIG_FILE: the resolved config (a rerun with a different one is refused)
    metrics.jsonl             METRICS_FILE: one JSON object per line (train, eval, start and stop lines)
    events.out.*              TensorBoard
    checkpoints/<step>/       CHECKPOINT_DIR: orbax checkpoints of {step, params, opt_state} (+ early stop)
    model.npz, labels.txt     MODEL_FILE, LABELS_FILE: the fine-tuned model (official layout), its class names
    curves.png                CURVES_FILE: loss, learning rate and eval top-1 against the step
    confusion_<split>.png/.csv, eval_<split>.json   `report_files(workdir, split)`: an evaluation's report

A leaf module (no bit imports): checkpoints, evaluation and metrics_log use the names without importing
what reads a whole workdir.
"""

from __future__ import annotations

import os
import pathlib
import re

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
CHECKPOINT_DIR = 'checkpoints'
MODEL_FILE = 'model.npz'
LABELS_FILE = 'labels.txt'
CURVES_FILE = 'curves.png'


def split_tag(split: str) -> str:
  """`split` as it appears in a file name (TFDS syntax such as 'train[:90%]' made safe)."""
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', split).strip('_') or 'split'


def report_files(workdir: str | os.PathLike[str], split: str) -> dict[str, pathlib.Path]:
  """{'csv', 'png', 'json'}: the confusion matrix (CSV and picture) and the eval summary of `split`."""
  workdir, tag = pathlib.Path(workdir), split_tag(split)
  return {
    'csv': workdir / f'confusion_{tag}.csv',
    'png': workdir / f'confusion_{tag}.png',
    'json': workdir / f'eval_{tag}.json',
  }
