"""A training workdir: whether it holds this run, and the files a finished run leaves in it.

The file names are `bit.layout`'s (config.json, metrics.jsonl, checkpoints/, model.npz, labels.txt,
curves.png, confusion_<split>.png/.csv, eval_<split>.json); the orbax checkpoints are `bit.recovery`'s.

- `errors(workdir)`: an OSError on the workdir (a file, read-only, a full disk) as a one-line ConfigError.
- `check_same_run(workdir, resolved, write)`: writes config.json, or refuses a rerun with another config
  (`differences`: the keys that differ, `OPERATIONAL_KEYS` aside).
- `export(workdir, params, class_names)` and `write_report(workdir, result, class_names, split)`: the final
  files of a run, model.npz + labels.txt, then the eval report and curves.png.
- `load(workdir) -> FinishedRun`: the one loader of a finished run (bit-eval, bit-predict, bit-export):
  model.npz with its head, `model.input_size` the run's crop, labels.txt, config.json.
- `evaluate(workdir, split=None)`: bit-eval, the finished run's model on a split of its dataset at its crop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

from bit import files
from bit.config import LATER_KEYS, OPERATIONAL_KEYS, default
from bit.errors import BitError, ConfigError
from bit.layout import CHECKPOINT_DIR, CONFIG_FILE, CURVES_FILE, LABELS_FILE, METRICS_FILE, MODEL_FILE
from bit.types import PathLike

log: logging.Logger = logging.getLogger(__name__)

__all__ = [
  'CHECKPOINT_DIR',
  'CONFIG_FILE',
  'CURVES_FILE',
  'FinishedRun',
  'LABELS_FILE',
  'METRICS_FILE',
  'MODEL_FILE',
  'check_same_run',
  'differences',
  'errors',
  'evaluate',
  'export',
  'load',
  'same_value',
  'write_report',
]


@contextlib.contextmanager
def errors(workdir: pathlib.Path) -> Any:
  """An OS error on the workdir (it is a file, read-only, the disk is full) as a one-line ConfigError."""
  try:
    yield
  except OSError as e:
    where = e.filename or workdir
    raise ConfigError(
      f'workdir={str(workdir)!r} cannot be used: {where}: {e.strerror or e}; give a writable folder.'
    ) from e


def same_value(key: str, a: Any, b: Any) -> bool:
  """Whether two values of config `key` are the same setting (dataset and data_dir paths normalized)."""
  if key in ('dataset', 'data_dir') and isinstance(a, str) and isinstance(b, str) and ('/' in a or '/' in b):
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))
  return a == b


def differences(old: dict[str, Any], new: dict[str, Any], operational: Any = OPERATIONAL_KEYS) -> list[str]:
  """The sorted keys whose values differ between two configs, `operational` keys aside."""
  return sorted(
    k for k in set(old) | set(new) if k not in operational and not same_value(k, old.get(k), new.get(k))
  )


def describe(old: dict[str, Any], new: dict[str, Any], keys: Any) -> str:
  """`key: old there vs new now` for the first four of `keys`."""
  return ', '.join(f'{k}: {old.get(k)!r} there vs {new.get(k)!r} now' for k in list(keys)[:4])


def check_same_run(workdir: pathlib.Path, resolved: dict[str, Any], write: bool) -> None:
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
    from bit import data_sources

    if data_sources.same_test_split(old.get('test_split'), new.get('test_split')):
      old['test_split'] = new.get('test_split')  # written before the split was resolved: 'test' meant this
    diff = differences(old, new, operational)
    if diff:
      raise ConfigError(
        f'{workdir} holds a different run ({describe(old, new, diff)}): pass a new workdir=, or delete '
        f'{workdir} to start over.'
      )
  if write:
    files.write_json(path, resolved, sort_keys=True)


def export(workdir: pathlib.Path, params: Any, class_names: Any) -> None:
  """model.npz (official layout, written atomically), then labels.txt (one class name per line)."""
  from bit import checkpoints

  checkpoints.save_npz(params, workdir / MODEL_FILE)
  files.write_text(workdir / LABELS_FILE, ''.join(f'{n}\n' for n in class_names))


def write_report(workdir: pathlib.Path, result: dict[str, Any], class_names: Any, split: str) -> None:
  """The final eval's report (`evaluation.write_report`) and curves.png; a picture that fails to draw is a
  warning, never a failed run."""
  from bit import evaluation, plots

  try:
    evaluation.write_report(dict(result, class_names=class_names, split=split), workdir, class_names, split)
    plots.plot_curves(workdir / METRICS_FILE, workdir / CURVES_FILE)
  except Exception as e:  # noqa: BLE001 - a picture that fails to draw must not fail a finished run
    log.warning('Could not write the plots of %s (%s: %s); the model is saved.', workdir, type(e).__name__, e)


# --- a finished run ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinishedRun:
  """What a finished bit-train run left in its workdir.

  `config`: its config.json (the resolved config); `model` with `input_size` = the run's crop and `params`
  (its fine-tuned head kept); `class_names` from labels.txt (None without it); `npz`: the model.npz path.
  """

  config: dict[str, Any]
  model: Any
  params: Any
  class_names: list[str] | None
  npz: pathlib.Path


def load(workdir: PathLike) -> FinishedRun:
  """The model.npz, labels.txt and config.json of a finished bit-train run; BitError naming the missing file,
  a config.json without a crop, or labels that are not the head's."""
  from bit import checkpoints

  workdir = pathlib.Path(workdir).expanduser()
  if not workdir.is_dir():
    raise BitError(f'workdir={str(workdir)!r} does not exist: give the workdir of a bit-train run.')
  config_path, npz = workdir / CONFIG_FILE, workdir / MODEL_FILE
  if not npz.is_file():
    raise BitError(
      f'{npz} is missing: the run in {workdir} has not finished; rerun bit-train on it to finish.'
    )
  if not config_path.is_file():
    raise BitError(f'{config_path} is missing: {workdir} is not a bit-train workdir.')
  try:
    config = json.loads(config_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise BitError(f'{config_path} is not readable JSON ({e}).') from e
  model, params = checkpoints.load(npz, keep_head=True)  # input_size: the crop of config.json
  if model.input_size is None:
    raise BitError(f'{config_path} has no valid crop: it was not written by bit-train.')
  names = checkpoints.label_names(npz)
  if names is not None and len(names) != model.num_classes:
    raise BitError(
      f'{workdir / LABELS_FILE} has {len(names)} names but {npz} has {model.num_classes} classes: the two '
      'files come from different runs.'
    )
  return FinishedRun(config=config, model=model, params=params, class_names=names, npz=npz)


def evaluate(
  workdir: PathLike, *, split: str | None = None, batch_size: int | None = None, progress: bool = False
):
  """bit-eval: a finished run's model.npz on `split` (default: its test split) of its dataset, at its crop.

  Writes the report (`evaluation.write_report`) into the workdir; returns (result, paths).
  """
  from bit import evaluation

  run = load(workdir)
  if run.config.get('dataset') is None:
    raise BitError(f"{run.npz.parent / CONFIG_FILE} has no 'dataset': it was not written by bit-train.")
  split = split or run.config.get('test_split') or 'test'
  result = evaluation.evaluate(
    run.model,
    run.params,
    run.config['dataset'],
    split=split,
    batch_size=batch_size or evaluation.DEFAULT_BATCH_SIZE,
    crop=run.model.input_size,
    data_dir=run.config.get('data_dir'),
    progress=progress,
  )
  if run.class_names is not None:
    result['class_names'] = run.class_names
  paths = evaluation.write_report(result, run.npz.parent, result['class_names'], split)
  return result, paths
