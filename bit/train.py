"""Fine-tuning: `train_and_evaluate(config, workdir)`, the loop around the per-device step.

The loop loads the model (`bit.load`), resolves the unset hyper-rule keys from the data, trains for the
schedule's total steps on all devices, evaluates on the whole test split, checkpoints with orbax and
exports `model.npz` + `labels.txt`. Rerunning it on the same workdir resumes from the latest good
checkpoint and gives the same final params as an uninterrupted run, because every random draw (crop, flip,
MixUp, init) is a function of the seed and the step, made on the host.

Transfer learning is a mask on the one optimizer (`config.transfer`: 'full', 'head' or 'partial', see
`bit.freeze`); training from scratch is `config.model='R50x1'`. With `config.early_stopping_patience=N` the
run stops once N evaluations in a row have not improved the best eval top-1, and exports the best eval's
params.

Workdir:
  config.json       the resolved config (a rerun with a different one is refused)
  metrics.jsonl     one JSON object per line: train lines (loss, lr, images_per_sec), eval lines (top1, top5,
                    eval_loss), the trainable-parameter count at the start, an early-stopping line
  events.out.*      TensorBoard
  checkpoints/<step>/  orbax checkpoints of {step, params, opt_state} (+ the best eval so far, with early
                    stopping)
  model.npz, labels.txt  the fine-tuned model in the official layout and its class names
  curves.png        loss, learning rate and eval top-1 against the step
  confusion_<split>.png/.csv, eval_<split>.json  the final evaluation (the best one, with early stopping)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import signal
import threading
import time
from typing import Any, Callable, Hashable

import jax
import numpy as np

from bit import config as config_keys
from bit import files, freeze, hyperrule, models, parallel
from bit.errors import BitError, ConfigError, Interrupted
from bit.metrics_log import MetricsWriter
from bit.train_state import (
  TrainState,
  create_state,
  lr_schedule,
  start_state,
  state_to_tree,
  train_step,
  tree_to_state,
)

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
# Keys that change how a run is carried out but not its result: a rerun may change them freely.
OPERATIONAL_KEYS = frozenset(
  {
    'data_dir',
    'parallelism',
    'num_devices',
    'accum_steps',
    'eval_every',
    'checkpoint_every',
    'log_every',
    'keep_checkpoints',
    'remat',
    'restart',
  }
)
# Keys added after the first workdirs were written: a config.json without them ran with their defaults.
LATER_KEYS = (*config_keys.TRANSFER_KEYS, 'early_stopping_patience', 'remat', 'restart')


class NonFiniteLossError(BitError):
  """The loss or the gradients stopped being finite numbers."""


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
  """What a run trains for when it is not the labels' cross-entropy alone; `bit.distill` makes one. The loop,
  its checkpoints, resume, preemption, evaluation and export stay those of every run.

  `loss_fn(logits, labels, images, extra) -> scalar` is the per-device loss (`train_state.TrainState`);
  `extra` a host tree given to every step, replicated over the devices, never donated nor changed (a
  teacher's params); `key` identifies `loss_fn` in the compiled-step cache; `train_records`, when set, are
  the examples trained on (`data_sources.Records`) instead of the train split; `check_model(model, params)`
  runs once the model is loaded.
  """

  loss_fn: Callable
  extra: Any
  key: Hashable
  train_records: Any = None
  check_model: Callable | None = None


@dataclasses.dataclass
class FitResult:
  """What `fit` leaves behind: the final metrics and the final params (host numpy tree)."""

  metrics: dict
  params: dict
  config: dict


# --- config ------------------------------------------------------------------------------------------------


def resolve_config(config, info) -> dict:
  """The config as a plain dict with the unset hyper-rule keys filled in from the data (`DatasetInfo`).

  resize/crop from `hyperrule.train_resolution(info.image_size)`, mixup_alpha and schedule from the number
  of training examples. Raises ConfigError for values that cannot work.
  """
  c = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  if c.get('resize') is None or c.get('crop') is None:
    resize, crop = hyperrule.train_resolution(info.image_size, crop=c.get('crop'))
    c['crop'] = crop if c.get('crop') is None else c['crop']
    c['resize'] = resize if c.get('resize') is None else c['resize']
  if c['crop'] > c['resize']:
    raise ConfigError(
      f'config.crop={c["crop"]} is larger than config.resize={c["resize"]}: the random crop is taken from '
      'the resized image, so set resize >= crop.'
    )
  if c.get('mixup_alpha') is None:
    c['mixup_alpha'] = hyperrule.mixup_alpha(info.train_size)
  if c.get('schedule') is None:
    c['schedule'] = hyperrule.schedule(info.train_size)
  c['schedule'] = _check_schedule(c['schedule'])
  return c


def _check_schedule(schedule) -> list[int]:
  try:
    return hyperrule.check_supports(schedule)
  except ConfigError:
    raise ConfigError(
      f'config.schedule={schedule!r} is not [warmup, decay1, decay2, decay3, total] in steps with '
      'warmup <= decay1 < decay2 < decay3 < total, e.g. config.schedule=[100,200,300,400,500].'
    ) from None


def _check_config(config) -> None:
  """Cheap checks before any data or model is touched."""
  if not config.get('dataset'):
    raise ConfigError(
      'config.dataset is not set: set config.dataset=NAME (a TFDS name such as cifar10) '
      'or config.dataset=/path/to/folder (ROOT/<split>/<class>/<image>).'
    )
  if not config.get('model'):
    raise ConfigError(
      'config.model is not set: set config.model=BiT-M-R50x1 (see bit.list_models()), '
      'a path to an official-layout .npz, or an architecture such as R50x1 to train from scratch.'
    )
  if config.dtype not in models.DTYPES:
    raise ConfigError(f'config.dtype={config.dtype!r} is not one of {sorted(models.DTYPES)}.')
  for key in ('batch_size', 'accum_steps'):
    if int(config[key]) < 1:
      raise ConfigError(f'config.{key} must be a positive integer, got {config[key]}.')
  for key in ('eval_every', 'checkpoint_every', 'log_every', 'keep_checkpoints'):
    if int(config[key]) < 0:
      raise ConfigError(f'config.{key} must be >= 0, got {config[key]}.')
  if not float(config.base_lr) > 0:
    raise ConfigError(f'config.base_lr must be a positive number, got {config.base_lr}.')
  remat = config.get('remat', config_keys.default('remat'))
  if remat not in models.REMAT:
    raise ConfigError(
      f'config.remat={remat!r} is not one of {", ".join(models.REMAT)}: "unit" recomputes each residual unit\'s '
      'activations in the backward pass, "stage" each stage\'s (less memory, more compute).'
    )
  _check_transfer_config(config)


def _transfer_settings(c) -> dict:
  """The transfer-learning keys of a config (ConfigDict or resolved dict), defaults filled in."""
  t = {k: c.get(k, config_keys.default(k)) for k in config_keys.TRANSFER_KEYS}
  t['backbone_lr_scale'] = float(t['backbone_lr_scale'])
  return t


def _check_transfer_config(config) -> None:
  t = _transfer_settings(config)
  if t['transfer'] not in freeze.MODES:
    raise ConfigError(
      f'config.transfer={t["transfer"]!r} is not one of {", ".join(freeze.MODES)}: "full" fine-tunes '
      'everything, "head" trains only the new head, "partial" the head plus the top stages/units.'
    )
  patience = config.get('early_stopping_patience', config_keys.default('early_stopping_patience'))
  for key, value in (
    ('unfreeze_stages', t['unfreeze_stages']),
    ('unfreeze_units', t['unfreeze_units']),
    ('early_stopping_patience', patience),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f'config.{key} must be an integer >= 0, got {value!r}.')
  if t['transfer'] != 'partial' and (t['unfreeze_stages'] or t['unfreeze_units']):
    raise ConfigError(
      f'config.unfreeze_stages/unfreeze_units only apply to config.transfer=partial, not '
      f'{t["transfer"]!r}: set config.transfer=partial or drop them.'
    )
  if t['unfreeze_stages'] and t['unfreeze_units']:
    raise ConfigError('Give either config.unfreeze_stages or config.unfreeze_units, not both.')
  if not (math.isfinite(t['backbone_lr_scale']) and t['backbone_lr_scale'] > 0):
    raise ConfigError(
      f'config.backbone_lr_scale must be a positive number, got {t["backbone_lr_scale"]}; '
      'freeze layers with config.transfer instead.'
    )
  if patience and not int(config.eval_every):
    raise ConfigError(
      f'config.early_stopping_patience={patience} needs evaluations during training: set '
      'config.eval_every=STEPS as well (early stopping counts evaluations, not steps).'
    )


@contextlib.contextmanager
def _workdir_errors(workdir: pathlib.Path):
  """An OS error on the workdir (it is a file, read-only, the disk is full) as a one-line ConfigError."""
  try:
    yield
  except OSError as e:
    where = e.filename or workdir
    raise ConfigError(
      f'workdir={str(workdir)!r} cannot be used: {where}: {e.strerror or e}; give a writable folder.'
    ) from e


def _same_value(key: str, a, b) -> bool:
  if key in ('dataset', 'data_dir') and isinstance(a, str) and isinstance(b, str) and ('/' in a or '/' in b):
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))
  return a == b


def _check_workdir_config(workdir: pathlib.Path, resolved: dict, write: bool) -> None:
  """Writes config.json, or checks that the one there describes the same run."""
  path = workdir / CONFIG_FILE
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f'{path} is not readable JSON ({e}): delete it or pass another workdir=.') from e
    new = json.loads(json.dumps(resolved))
    old = {**{k: config_keys.default(k) for k in LATER_KEYS if k in new}, **old}
    operational = OPERATIONAL_KEYS
    if new.get('early_stopping_patience'):
      operational = operational - {'eval_every'}  # it decides when an early-stopped run stops
    diff = sorted(
      k for k in set(old) | set(new) if k not in operational and not _same_value(k, old.get(k), new.get(k))
    )
    if diff:
      details = ', '.join(f'{k}: {old.get(k)!r} there vs {new.get(k)!r} now' for k in diff[:4])
      raise ConfigError(
        f'{workdir} holds a different run ({details}): pass a new workdir=, or delete {workdir} to start over.'
      )
  if write:
    files.write_json(path, resolved, sort_keys=True)


# --- checkpoints --------------------------------------------------------------------------------------------


class CheckpointRestoreError(BitError):
  """Checkpoints exist but none of them restores; nothing was deleted or moved."""


def _checkpoint_manager(workdir: pathlib.Path, keep: int, *, asynchronous: bool = True):
  import orbax.checkpoint as ocp

  # cleanup_tmp_directories stays False (orbax's default): a save cut short leaves a
  # `<step>.orbax-checkpoint-tmp-*` folder that orbax does not list as a step, and nothing here deletes it.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep or None, create=True, enable_async_checkpointing=asynchronous
  )
  return ocp.CheckpointManager(workdir / CHECKPOINT_DIR, options=options)


def _reason(e: BaseException) -> str:
  text = str(e).splitlines()[0][:300] if str(e) else ''
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _free_name(directory: pathlib.Path, name: str) -> pathlib.Path:
  path, n = directory / name, 1
  while path.exists() or path.with_name(path.name + '.txt').exists():
    n += 1
    path = directory / f'{name}-{n}'
  return path


def _set_aside(directory: pathlib.Path, step: int, reason: str, primary: bool) -> pathlib.Path | None:
  """Moves checkpoint `step` to `unreadable-<step>/` with the reason in `unreadable-<step>.txt` beside it."""
  if not primary:
    return None
  directory = pathlib.Path(directory)
  dest = _free_name(directory, f'unreadable-{step}')
  os.replace(directory / str(step), dest)
  files.write_text(
    dest.with_name(dest.name + '.txt'),
    f'Checkpoint step {step} did not restore and was moved here from {directory / str(step)}.\n'
    f'Reason: {reason}\n'
    'bit never reads or deletes this folder: delete it yourself once you no longer need it.\n',
  )
  return dest


def _set_all_aside(manager, primary: bool) -> pathlib.Path | None:
  """`config.restart`: moves every checkpoint to `restart-<UTC time>/<step>/` (kept, never read again)."""
  steps = list(manager.all_steps())
  if not steps or not primary:
    return None
  directory = pathlib.Path(manager.directory)
  dest = _free_name(directory, 'restart-' + time.strftime('%Y%m%dT%H%M%SZ', time.gmtime()))
  dest.mkdir()
  for step in steps:
    os.replace(directory / str(step), dest / str(step))
  return dest


def _sync(name: str) -> None:
  """Waits for every process (after process 0 moved checkpoints, before anyone lists them again)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _check_like(tree, template) -> None:
  """ValueError unless `tree` has the structure and shapes of `template` (orbax restores numpy leaves as
  saved, whatever the template says)."""
  if jax.tree.structure(tree) != jax.tree.structure(template):
    raise ValueError('its tree of arrays is not the one this run trains (a different model or optimizer?)')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(template), strict=True):
    if np.shape(a) != np.shape(b):
      raise ValueError(f'{jax.tree_util.keystr(path)} has shape {np.shape(a)}, this run needs {np.shape(b)}')


def _restore_latest(manager, template, *, primary: bool = True):
  """(tree, step) of the newest checkpoint that restores, or (None, 0) when there is none.

  A checkpoint that fails to restore is never deleted: once an older one restores, the newer failed ones are
  moved aside (`_set_aside`); when none restores, CheckpointRestoreError lists each and why, and nothing
  is moved (the cause may be a changed setup rather than damage).
  """
  import orbax.checkpoint as ocp

  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      tree = manager.restore(step, args=ocp.args.StandardRestore(template))
      if int(tree['step']) != step:
        raise ValueError(f'it holds step {int(tree["step"])}')
      _check_like(tree, template)
    except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint cannot be used
      failed.append((step, _reason(e)))
      log.warning(
        'Checkpoint %s/%d is damaged or unreadable (%s); trying the one before.',
        manager.directory,
        step,
        failed[-1][1],
      )
      continue
    for bad, reason in failed:
      dest = _set_aside(manager.directory, bad, reason, primary)
      if dest is not None:
        log.warning('Moved checkpoint %d aside to %s (the reason is in %s.txt).', bad, dest, dest)
    if failed:
      _sync('bit-set-aside')
      manager.reload()
    return tree, step
  if failed:
    listing = '; '.join(f'step {s}: {r}' for s, r in failed)
    raise CheckpointRestoreError(
      f'None of the {len(failed)} checkpoints in {manager.directory} restores ({listing}). Nothing was '
      'deleted or moved. Fix the cause (a changed model or config, a read error, a full disk) and rerun, '
      'or set config.restart=True to start over (the checkpoints are then moved aside, not deleted).'
    )
  return None, 0


# --- early stopping -----------------------------------------------------------------------------------------

# The numbers of an `evaluation.evaluate_batches` result that a checkpoint keeps for the best eval.
_RESULT_KEYS = (
  'top1',
  'top5',
  'loss',
  'count',
  'mean_per_class_accuracy',
  'per_class_accuracy',
  'class_counts',
  'confusion',
)


def _numbers(result) -> dict:
  """The `_RESULT_KEYS` of an eval result: arrays as numpy, scalars as Python numbers (for JSON)."""
  out = {}
  for k in _RESULT_KEYS:
    v = np.asarray(result[k])
    out[k] = v.item() if v.ndim == 0 else v.copy()
  return out


@dataclasses.dataclass
class BestEval:
  """The early-stopping state: the best eval top-1 so far, its step, params and result.

  `bad_evals` counts the evaluations since the best one; `stopped` is set once it reaches the patience.
  It is checkpointed with the train state, so a resumed run stops where an uninterrupted one would.
  """

  params: dict
  result: dict
  top1: float = -1.0
  step: int = -1
  bad_evals: int = 0
  stopped: bool = False

  @classmethod
  def initial(cls, params, num_classes: int) -> BestEval:
    """Before any eval: placeholders of the right shapes (what a checkpoint is restored into)."""
    result = {
      'top1': np.float64(0),
      'top5': np.float64(0),
      'loss': np.float64(0),
      'count': np.int64(0),
      'mean_per_class_accuracy': np.float64(0),
      'per_class_accuracy': np.zeros(num_classes, np.float64),
      'class_counts': np.zeros(num_classes, np.int64),
      'confusion': np.zeros((num_classes, num_classes), np.int64),
    }
    return cls(params=jax.tree.map(np.array, params), result=result)

  def update(self, step: int, result: dict, params_fn, patience: int) -> bool:
    """Records an eval at `step`; returns True when training should stop. `params_fn()` gives host params."""
    if result['top1'] > self.top1:  # strictly better: a tie keeps the earlier (shorter-trained) model
      self.top1, self.step, self.bad_evals = float(result['top1']), int(step), 0
      self.params = jax.tree.map(np.array, params_fn())  # a copy: the device buffers are donated next step
      self.result = _numbers(result)
      return False
    self.bad_evals += 1
    self.stopped = self.bad_evals >= patience
    return self.stopped

  def to_tree(self) -> dict:
    return {
      'params': self.params,
      'result': {k: np.asarray(v) for k, v in self.result.items()},
      # 0-d arrays, not numpy scalars: orbax saves and restores arrays.
      'top1': np.asarray(self.top1, np.float64),
      'step': np.asarray(self.step, np.int64),
      'bad_evals': np.asarray(self.bad_evals, np.int64),
      'stopped': np.asarray(self.stopped, np.int64),
    }

  @classmethod
  def from_tree(cls, tree) -> BestEval:
    return cls(
      params=jax.tree.map(np.asarray, tree['params']),
      result=_numbers(tree['result']),
      top1=float(tree['top1']),
      step=int(tree['step']),
      bad_evals=int(tree['bad_evals']),
      stopped=bool(int(tree['stopped'])),
    )


# --- the loop -----------------------------------------------------------------------------------------------

# The static parts of recent runs (apply_fn, optimizer, schedule, wrapped step): a second run of the same
# setup in one process (a notebook, a test, a finished run rerun) reuses the compiled step.
_STEPS_CACHE: dict = {}
_STEPS_CACHE_SIZE = 4


def _step_with_extra(state, batch, extra):
  return train_step(state, batch, parallel.DATA_AXIS, extra)


def _compiled(dp, model, params, supports, base_lr, accum_steps, transfer: dict, objective=None):
  key = (
    repr(model),
    tuple(supports),
    float(base_lr),
    int(accum_steps),
    tuple(sorted(transfer.items())),
    dp.mode,
    tuple(d.id for d in dp.devices),
    None if objective is None else objective.key,
  )
  if key not in _STEPS_CACHE:
    if len(_STEPS_CACHE) >= _STEPS_CACHE_SIZE:
      _STEPS_CACHE.pop(next(iter(_STEPS_CACHE)))
    loss_fn = None if objective is None else objective.loss_fn
    template = create_state(
      model, params, lr_schedule(supports, base_lr), accum_steps=accum_steps, loss_fn=loss_fn, **transfer
    )
    template = template.replace(params=None, opt_state=None, frozen=())  # the static fields, not the arrays
    if objective is None:
      step = dp.wrap(train_step, donate=True)
    else:  # the extra input (a teacher) is replicated once and never donated
      step = dp.wrap(_step_with_extra, donate=True, extra_inputs=1)
    _STEPS_CACHE[key] = (template, step)
  template, p_train = _STEPS_CACHE[key]
  return start_state(template, params), p_train


def _eval_line(result: dict) -> dict:
  """The metrics.jsonl eval line of an `evaluation.evaluate_batches` result."""
  return {
    'top1': float(result['top1']),
    'top5': float(result['top5']),
    'eval_loss': float(result['loss']),
    'mean_per_class_accuracy': float(result['mean_per_class_accuracy']),
    'num_examples': int(result['count']),
  }


def _sum_over_processes(result: dict) -> dict:
  """Combines the per-process results of a multi-process evaluation (each process saw its own examples)."""
  from jax.experimental import multihost_utils

  from bit import evaluation

  count = int(result['count'])
  local = {
    'confusion': np.asarray(result['confusion'], np.int32),
    'hits5': np.int32(round(float(result['top5']) * count) if count else 0),
    'loss_sum': np.float32(float(result['loss']) * count if count else 0.0),
  }
  gathered = multihost_utils.process_allgather(local)
  confusion = np.asarray(gathered['confusion']).sum(axis=0).astype(np.int64)
  hits5, loss_sum = int(np.sum(gathered['hits5'])), float(np.sum(gathered['loss_sum'], dtype=np.float64))
  return evaluation.metrics_from_counts(confusion, hits5, loss_sum)  # the same metrics as one process


def train_and_evaluate(config, workdir) -> dict:
  """Fine-tunes `config.model` on `config.dataset` in `workdir`; returns the final metrics.

  `config`: a ConfigDict (`bit.config.get_config()`; bit/config.py lists every key) or a plain dict of those keys,
  put onto the defaults, e.g. `{'model': 'BiT-M-R50x1', 'dataset': 'cifar10'}`.

  The dict has `step` (the last trained step), `top1`, `top5`, `eval_loss`, `mean_per_class_accuracy` and
  `num_examples` (on the whole test split) and `loss` (the last train loss). With early stopping the eval
  numbers are the best eval's (the exported model), `best_step` is its step and `stopped_early` says whether
  the run stopped before the schedule's end. SIGTERM or Ctrl-C stops after the step in flight with a
  checkpoint of it and raises `bit.errors.Interrupted` (exit_code 143 or 130). See the module docstring for
  the workdir layout; `bit/config.py` for the keys.
  """
  return fit(config, workdir).metrics


def _itstime(step: int, every: int, total: int) -> bool:
  """Whether an every-`every`-steps action (0 = only at the end) runs at `step`; always at the last step."""
  return step == total or bool(every and step % every == 0)


@dataclasses.dataclass
class _Setup:
  """Everything the loop starts from: built once by `_setup`, read (not changed) by the loop."""

  cfg: dict  # the resolved config
  info: Any  # data.DatasetInfo
  workdir: pathlib.Path
  dp: parallel.DataParallel
  model: Any
  state: TrainState  # host-side, at `start`
  p_train: Any  # the train step over all devices
  manager: Any  # orbax CheckpointManager
  best: BestEval | None  # early stopping (None without it)
  start: int  # the restored step (0: a fresh start)
  restored: bool
  what: str  # the trainable-parameter count, for the log
  counts: dict  # the metrics.jsonl start line
  objective: Objective | None = None  # None: the labels' cross-entropy on the train split

  @property
  def total(self) -> int:
    return self.cfg['schedule'][-1]

  @property
  def primary(self) -> bool:
    return jax.process_index() == 0


def _setup(config, workdir, objective: Objective | None = None) -> _Setup:
  """Checks and resolves the config, loads the model, restores the latest checkpoint."""
  from bit import checkpoints, data

  _check_config(config)
  dp = parallel.DataParallel(config.parallelism, parallel.select_devices(config.get('num_devices', 0)))
  dp.check_batch(int(config.batch_size), int(config.accum_steps))
  info = data.get_info(
    config.dataset,
    train_split=config.train_split,
    test_split=config.test_split,
    data_dir=config.data_dir,
    examples_per_class=config.examples_per_class,
    seed=config.seed,
  )
  if objective is not None and objective.train_records is not None:
    info = dataclasses.replace(info, train_size=len(objective.train_records))  # what the hyper-rule sizes
  cfg = resolve_config(config, info)
  del config  # from here on, the resolved one
  workdir = pathlib.Path(workdir).expanduser().absolute()
  primary = jax.process_index() == 0
  with _workdir_errors(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir_config(workdir, cfg, write=False)  # written below, once the model loads too

  model, params = checkpoints.load(
    cfg['model'], num_classes=info.num_classes, dtype=models.DTYPES[cfg['dtype']], seed=cfg['seed']
  )
  model = _with_remat(model, cfg)
  if objective is not None and objective.check_model is not None:
    objective.check_model(model, params)
  transfer = _transfer_settings(cfg)
  mask = freeze.trainable_mask(
    params,
    transfer['transfer'],
    unfreeze_stages=transfer['unfreeze_stages'] or None,
    unfreeze_units=transfer['unfreeze_units'] or None,
  )
  num_trainable, num_params = freeze.count_trainable(params, mask)
  scratch = bool(re.fullmatch(r'R\d+x\d+', str(cfg['model'])))
  if scratch and transfer['transfer'] != 'full':
    log.warning(
      'config.model=%r is a randomly initialized architecture and config.transfer=%r freezes part of it: '
      'the frozen layers stay random. Use config.transfer=full to train from scratch.',
      cfg['model'],
      transfer['transfer'],
    )
  patience = int(cfg.get('early_stopping_patience') or 0)
  state, p_train = _compiled(
    dp, model, params, cfg['schedule'], cfg['base_lr'], cfg['accum_steps'], transfer, objective
  )
  best = BestEval.initial(params, info.num_classes) if patience else None
  template = state_to_tree(state)
  if best is not None:
    template['early_stopping'] = best.to_tree()
  if primary:
    with _workdir_errors(workdir):
      _check_workdir_config(workdir, cfg, write=True)
  manager = _checkpoint_manager(workdir, int(cfg['keep_checkpoints']))
  if cfg.get('restart'):
    moved = _set_all_aside(manager, primary)
    _sync('bit-restart')
    manager.reload()
    if moved is not None:
      log.warning('config.restart=True: starting over; the old checkpoints are kept in %s.', moved)
  try:
    restored, start = _restore_latest(manager, template, primary=primary)
  except BaseException:
    manager.close()
    raise
  if restored is not None:
    state = tree_to_state(state, restored)
    if best is not None:
      best = BestEval.from_tree(restored['early_stopping'])
  return _Setup(
    cfg=cfg,
    info=info,
    workdir=workdir,
    dp=dp,
    model=model,
    state=state,
    p_train=p_train,
    manager=manager,
    best=best,
    start=start,
    restored=restored is not None,
    what=f'{num_trainable:,} of {num_params:,} parameters trainable (transfer={transfer["transfer"]!r})',
    counts={'trainable_params': num_trainable, 'total_params': num_params, 'transfer': transfer['transfer']},
    objective=objective,
  )


def _with_remat(model, cfg: dict):
  """The model with `config.remat` (same params): activations recomputed per unit or stage."""
  remat = cfg.get('remat', 'none')
  return model if remat == 'none' else model.clone(remat=remat)


class _TrainLog:
  """Train metrics between two writes: the device metrics of the steps since, fetched together on `flush`.

  Fetching every step would stall the devices; `flush` fetches, stops on a non-finite loss and writes one
  train line (mean loss, last lr and gradient norm, images per second since the last line).
  """

  def __init__(self, setup: _Setup, writer: MetricsWriter, bar):
    self.setup, self.writer, self.bar = setup, writer, bar
    self.pending = []  # (step, device metrics)
    self.last_loss = None
    self.tick, self.tick_step = time.perf_counter(), setup.start

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def pause_clock(self) -> None:
    """Evaluation and checkpoint time are not training throughput."""
    self.tick = time.perf_counter()

  def flush(self, step: int, last_good: int | None) -> float | None:
    """Returns the mean loss of the pending steps (or the last one, if none are pending)."""
    if not self.pending:
      return self.last_loss
    dp = self.setup.dp
    fetched = [(s, jax.device_get(dp.unreplicate(m))) for s, m in self.pending]
    self.pending = []
    for s, m in fetched:
      if not (math.isfinite(float(m['loss'])) and math.isfinite(float(m['grad_norm']))):
        where = (
          f'step {last_good} in {self.setup.workdir / CHECKPOINT_DIR} (rerunning the same command resumes '
          'from it)'
          if last_good
          else 'none: no checkpoint was saved yet'
        )
        raise NonFiniteLossError(
          f'The training loss became {float(m["loss"])} (gradient norm {float(m["grad_norm"])}) at step {s}; '
          f'the last good checkpoint is {where}. Lower config.base_lr= or set config.dtype=float32.'
        )
    now = time.perf_counter()
    loss = float(np.mean([float(m['loss']) for _, m in fetched]))
    ips = (step - self.tick_step) * self.setup.cfg['batch_size'] / max(now - self.tick, 1e-9)
    self.tick, self.tick_step = now, step
    line = {
      'loss': loss,
      'lr': float(fetched[-1][1]['lr']),
      'grad_norm': float(fetched[-1][1]['grad_norm']),
      'images_per_sec': ips,
    }
    self.writer.write(step, line, prefix='train')
    self.bar.set_postfix(loss=f'{loss:.4f}', lr=f'{line["lr"]:.2e}', img_s=f'{ips:.1f}', refresh=False)
    self.last_loss = loss
    return loss


class _StopSignals:
  """SIGTERM and the first SIGINT ask the loop to stop after the step in flight; a second SIGINT raises
  KeyboardInterrupt at once. Installed only in the main thread (signals are delivered there)."""

  NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT'}

  def __init__(self):
    self.signum = 0
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.NAMES:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    if self.signum and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if not self.signum:
      self.signum = signum
      log.warning(
        'Got %s: finishing the step in flight, saving its checkpoint, then exiting%s.',
        self.NAMES[signum],
        ' (Ctrl-C again exits at once, without saving)' if signum == signal.SIGINT else '',
      )

  def agreed(self) -> int:
    """The signal every process stops for (0: none): each step, processes share theirs, so all stop at the
    same step even when only some of them got it."""
    if jax.process_count() == 1:
      return self.signum
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.asarray(self.signum, np.int32))
    return int(np.max(got))


def _interrupted(signum: int, step: int, setup: _Setup, saved: bool) -> Interrupted:
  name = _StopSignals.NAMES.get(signum, f'signal {signum}')
  where = setup.workdir / CHECKPOINT_DIR / str(step)
  return Interrupted(
    f'stopped by {name} after step {step} of {setup.total}; '
    + (f'its checkpoint is {where}' if saved else 'nothing new to save')
    + ': rerun the same command to resume.',
    exit_code=128 + int(signum),
  )


def _save_checkpoint(setup: _Setup, dstate, best: BestEval | None, step: int) -> None:
  """An asynchronous orbax save of {step, params, opt_state} (+ the early-stopping state) at `step`."""
  import orbax.checkpoint as ocp

  tree = state_to_tree(setup.dp.unreplicate(dstate))
  if best is not None:
    tree['early_stopping'] = best.to_tree()
  setup.manager.save(step, args=ocp.args.StandardSave(tree))


def evaluate_test_split(apply_fn, params, cfg: dict, num_classes: int, *, devices=None) -> dict:
  """The whole test split of a resolved config through `evaluation.evaluate_batches` (the same per-batch step
  as bit-eval), each process its slice, the counts summed over processes."""
  from bit import data, evaluation

  batches = data.eval_iterator(
    cfg['dataset'],
    split=cfg['test_split'],
    global_batch_size=cfg['batch_size'] // cfg['accum_steps'],
    crop=cfg['crop'],
    data_dir=cfg['data_dir'],
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  result = evaluation.evaluate_batches(apply_fn, params, batches, num_classes, devices=devices)
  return _sum_over_processes(result) if jax.process_count() > 1 else result


def _evaluator(setup: _Setup):
  """`evaluate(dstate) -> result`: the student's params on the whole test split."""
  cfg, dp = setup.cfg, setup.dp
  apply_fn = models.Inference(setup.model)  # hashable, one per model: the eval step compiles once

  def evaluate(dstate) -> dict:
    # Single-process shard_map: the replicated params are already where the eval step wants them.
    single = dp.mode == 'shard_map' and jax.process_count() == 1
    params = dstate.params if single else dp.unreplicate(dstate.params)
    return evaluate_test_split(apply_fn, params, cfg, setup.info.num_classes, devices=dp.local_devices)

  return evaluate


def _train_iterator(setup: _Setup):
  from bit import data

  cfg = setup.cfg
  return data.train_iterator(
    cfg['dataset'],
    split=cfg['train_split'],
    global_batch_size=cfg['batch_size'],
    resize=cfg['resize'],
    crop=cfg['crop'],
    num_classes=setup.info.num_classes,
    mixup_alpha=cfg['mixup_alpha'],
    seed=cfg['seed'],
    start_step=setup.start,
    examples_per_class=cfg['examples_per_class'],
    data_dir=cfg['data_dir'],
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    records=None if setup.objective is None else setup.objective.train_records,
  )


def as_config(config):
  """`config` as a ConfigDict: one as given, or a plain dict put onto the defaults (bit/config.py).

  A dict's unknown keys are refused, naming them (bit/config.py lists every key); so is a value of the wrong
  type for its key.
  """
  import ml_collections

  if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return config
  if not isinstance(config, dict):
    raise ConfigError(
      'config= must be an ml_collections.ConfigDict (e.g. bit.config.get_config()) or a dict of its keys, '
      f'got {type(config).__name__}.'
    )
  from bit import config as config_lib

  base = config_lib.get_config()
  unknown = sorted(str(k) for k in config if k not in base)
  if unknown:
    import difflib

    hints = [
      f'{k} (did you mean {m[0]}?)' if (m := difflib.get_close_matches(k, list(base), 1)) else k
      for k in unknown
    ]
    raise ConfigError(f'config= has unknown keys: {", ".join(hints)}; bit/config.py lists every key.')
  for key, value in config.items():
    try:
      base[key] = value
    except (TypeError, ValueError):
      wanted = base.get_type(key).__name__
      raise ConfigError(
        f'config[{key!r}]={value!r} is a {type(value).__name__}, but {key} takes type {wanted}.'
      ) from None
  return base


def fit(config, workdir, objective: Objective | None = None) -> FitResult:
  """`train_and_evaluate`, also returning the exported params (host numpy) and the resolved config.

  `objective` trains for another loss (and on other examples) in this same loop: see `Objective`.
  """
  from tqdm.auto import tqdm

  config = as_config(config)
  if not isinstance(workdir, (str, os.PathLike)) or not str(os.fspath(workdir)).strip():
    raise ConfigError(f'workdir= must be a folder path (str or pathlib.Path), got {workdir!r}.')
  setup = _setup(config, workdir, objective)
  cfg, dp, best, total, start = setup.cfg, setup.dp, setup.best, setup.total, setup.start
  patience = int(cfg.get('early_stopping_patience') or 0)
  writer = MetricsWriter(setup.workdir, enabled=setup.primary)
  if start or writer.path.exists():
    # Marks where this attempt starts: lines after it supersede earlier lines for the same steps.
    if start:
      log.warning('Resuming %s from its checkpoint at step %d of %d.', setup.workdir, start, total)
    else:
      log.warning('%s has no checkpoint to resume from: starting over at step 0.', setup.workdir)
    writer.write(start, {'resumed_from_step': start})
  log.info('%s: %s.', setup.workdir, setup.what)
  if not start:
    writer.write(0, setup.counts)
  dstate = dp.replicate(setup.state)
  extra = () if objective is None else (dp.replicate(objective.extra),)
  evaluate = _evaluator(setup)
  train_iter = _train_iterator(setup)
  # A run that stopped early before it was interrupted (or finished) has nothing left to train.
  end = start if best is not None and best.stopped else total
  bar = tqdm(
    total=end, initial=start, desc='train', unit='step', disable=not setup.primary, dynamic_ncols=True
  )
  if setup.primary:
    bar.write(setup.what)
  train_log = _TrainLog(setup, writer, bar)
  last_good = start if setup.restored else None  # the newest checkpoint: restored or saved by this attempt
  final = None  # the eval result of the params at `step`, once there is one
  step = start

  def run_eval(step) -> dict:
    result = evaluate(dstate)
    writer.write(step, _eval_line(result), prefix='eval')
    if setup.primary:
      bar.write(f'step {step}: top1 {result["top1"]:.4f} top5 {result["top5"]:.4f}')
    train_log.pause_clock()
    return result

  with _StopSignals() as stop:
    try:
      for step in range(start + 1, end + 1):
        dstate, metrics = setup.p_train(dstate, dp.shard(next(train_iter)), *extra)
        train_log.add(step, metrics)
        final = None
        bar.update(1)
        do_ckpt = _itstime(step, cfg['checkpoint_every'], total)
        do_eval = _itstime(step, cfg['eval_every'], total)
        if do_ckpt or do_eval or _itstime(step, cfg['log_every'], total):
          train_log.flush(step, last_good)
        stopped_early = False
        if do_eval:
          # Before the checkpoint, so that the checkpoint of this step knows this step's eval.
          final = run_eval(step)
          if best is not None:
            params_fn = lambda d=dstate: dp.unreplicate(d.params)  # noqa: E731
            stopped_early = best.update(step, final, params_fn, patience) and step != total
        if stopped_early:
          writer.write(
            step,
            {
              'early_stopping': 'stopped',
              'best_step': best.step,
              'best_top1': best.top1,
              'patience': patience,
            },
          )
          log.warning(
            'Early stopping at step %d of %d: eval top-1 has not improved for %d evaluation(s) since step '
            '%d (%.4f); exporting the params of step %d.',
            step,
            total,
            patience,
            best.step,
            best.top1,
            best.step,
          )
        signum = stop.agreed()
        if signum:
          train_log.flush(step, last_good)
        if do_ckpt or stopped_early or signum:
          _save_checkpoint(setup, dstate, best, step)
          last_good = step
          train_log.pause_clock()
        if signum:
          setup.manager.wait_until_finished()
          writer.write(step, {'preempted': True})
          raise _interrupted(signum, step, setup, saved=True)
        if stopped_early:
          break
      bar.close()
      if best is None and final is None:
        # Nothing was evaluated in this attempt (a finished run rerun): evaluate the final params.
        final = run_eval(step)
      setup.manager.wait_until_finished()
      signum = stop.agreed()
      if signum:  # during the last eval: the checkpoint of `step` exists, the export is redone on resume
        writer.write(step, {'preempted': True})
        raise _interrupted(signum, step, setup, saved=False)
    except KeyboardInterrupt:
      where = (
        f'the last checkpoint is step {last_good} (rerunning the same command resumes from it)'
        if last_good
        else 'no checkpoint was saved yet (rerunning the same command starts over)'
      )
      raise Interrupted(f'interrupted at once at step {step} without saving; {where}.', 130) from None
    finally:
      bar.close()
      writer.close()
      setup.manager.close()

    if best is not None:
      params, result = best.params, best.result
      extra = {'best_step': best.step, 'stopped_early': best.stopped}
    else:
      params, result, extra = dp.unreplicate(dstate.params), final, {}
    if setup.primary:
      _export(setup, params, result, stop, step)
  metrics = {'step': step, **_eval_line(result), **extra}
  if train_log.last_loss is not None:
    metrics['loss'] = train_log.last_loss
  log.info(
    'Finished %s at step %d: top1 %.4f, top5 %.4f.', setup.workdir, step, metrics['top1'], metrics['top5']
  )
  return FitResult(metrics=metrics, params=params, config=cfg)


def _export(setup: _Setup, params, result: dict, stop: _StopSignals, step: int) -> None:
  """model.npz, labels.txt, then the pictures: curves.png and the confusion matrix of `result`.

  A signal here stops before model.npz or before the pictures (model.npz itself is written atomically);
  the checkpoint of the last step exists, so a rerun resumes there and exports again.
  """
  from bit import checkpoints, evaluation, plots

  workdir, info, split = setup.workdir, setup.info, setup.cfg['test_split']

  def check() -> None:
    if stop.signum:
      MetricsWriter(workdir, tensorboard=False).write(step, {'preempted': True})
      raise _interrupted(stop.signum, step, setup, saved=False)

  check()
  checkpoints.save_npz(params, workdir / 'model.npz')
  names = list(info.class_names or [str(i) for i in range(info.num_classes)])
  files.write_text(workdir / 'labels.txt', ''.join(f'{n}\n' for n in names))
  check()
  try:
    evaluation.write_report(dict(result, class_names=names, split=split), workdir, names, split)
    plots.plot_curves(workdir / 'metrics.jsonl', workdir / 'curves.png')
  except Exception as e:  # noqa: BLE001 - a picture that fails to draw must not fail a finished run
    log.warning('Could not write the plots of %s (%s: %s); the model is saved.', workdir, type(e).__name__, e)
