"""A training workdir: whether it holds this run, and the files a finished run leaves in it.

The file names are `bit.layout`'s (config.json, metrics.jsonl, checkpoints/, model.npz, labels.txt,
curves.png, confusion_<split>.png/.csv, eval_<split>.json); the orbax checkpoints are `bit.recovery`'s.

- `errors(workdir)`: an OSError on the workdir (a file, read-only, a full disk) as a one-line ConfigError.
- `check_same_run(workdir, resolved, write)`: writes config.json, or refuses a rerun with another config
  (`differences`: the keys that differ, `OPERATIONAL_KEYS` aside).
- `export(workdir, params, class_names)` and `write_report(workdir, result, class_names, split)`: the final
  files of a run, model.npz + labels.txt, then the eval report and curves.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib

from bit import files
from bit.config import LATER_KEYS, OPERATIONAL_KEYS, default
from bit.errors import ConfigError
from bit.layout import CHECKPOINT_DIR, CONFIG_FILE, CURVES_FILE, LABELS_FILE, METRICS_FILE, MODEL_FILE

log = logging.getLogger(__name__)

__all__ = [
  'CHECKPOINT_DIR',
  'CONFIG_FILE',
  'CURVES_FILE',
  'LABELS_FILE',
  'METRICS_FILE',
  'MODEL_FILE',
  'check_same_run',
  'differences',
  'errors',
  'export',
  'same_value',
  'write_report',
]


@contextlib.contextmanager
def errors(workdir: pathlib.Path):
  """An OS error on the workdir (it is a file, read-only, the disk is full) as a one-line ConfigError."""
  try:
    yield
  except OSError as e:
    where = e.filename or workdir
    raise ConfigError(
      f'workdir={str(workdir)!r} cannot be used: {where}: {e.strerror or e}; give a writable folder.'
    ) from e


def same_value(key: str, a, b) -> bool:
  """Whether two values of config `key` are the same setting (dataset and data_dir paths normalized)."""
  if key in ('dataset', 'data_dir') and isinstance(a, str) and isinstance(b, str) and ('/' in a or '/' in b):
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))
  return a == b


def differences(old: dict, new: dict, operational=OPERATIONAL_KEYS) -> list[str]:
  """The sorted keys whose values differ between two configs, `operational` keys aside."""
  return sorted(
    k for k in set(old) | set(new) if k not in operational and not same_value(k, old.get(k), new.get(k))
  )


def describe(old: dict, new: dict, keys) -> str:
  """`key: old there vs new now` for the first four of `keys`."""
  return ', '.join(f'{k}: {old.get(k)!r} there vs {new.get(k)!r} now' for k in list(keys)[:4])


def check_same_run(workdir: pathlib.Path, resolved: dict, write: bool) -> None:
  """Writes config.json, or checks that the one there describes the same run."""
  path = workdir / CONFIG_FILE
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f'{path} is not readable JSON ({e}): delete it or pass another workdir=.') from e
    new = json.loads(json.dumps(resolved))
    old = {**{k: default(k) for k in LATER_KEYS if k in new}, **old}
    operational = OPERATIONAL_KEYS
    if new.get('early_stopping_patience'):
      operational = operational - {'eval_every'}  # it decides when an early-stopped run stops
    diff = differences(old, new, operational)
    if diff:
      raise ConfigError(
        f'{workdir} holds a different run ({describe(old, new, diff)}): pass a new workdir=, or delete '
        f'{workdir} to start over.'
      )
  if write:
    files.write_json(path, resolved, sort_keys=True)


def export(workdir: pathlib.Path, params, class_names) -> None:
  """model.npz (official layout, written atomically), then labels.txt (one class name per line)."""
  from bit import checkpoints

  checkpoints.save_npz(params, workdir / MODEL_FILE)
  files.write_text(workdir / LABELS_FILE, ''.join(f'{n}\n' for n in class_names))


def write_report(workdir: pathlib.Path, result: dict, class_names, split: str) -> None:
  """The final eval's report (`evaluation.write_report`) and curves.png; a picture that fails to draw is a
  warning, never a failed run."""
  from bit import evaluation, plots

  try:
    evaluation.write_report(dict(result, class_names=class_names, split=split), workdir, class_names, split)
    plots.plot_curves(workdir / METRICS_FILE, workdir / CURVES_FILE)
  except Exception as e:  # noqa: BLE001 - a picture that fails to draw must not fail a finished run
    log.warning('Could not write the plots of %s (%s: %s); the model is saved.', workdir, type(e).__name__, e)
