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
import time

import jax
import jax.numpy as jnp
import numpy as np

from bit import files, freeze, hyperrule, parallel
from bit.errors import BitError, ConfigError
from bit.metrics_log import MetricsWriter
from bit.train_state import (  # noqa: F401  (re-exported: the documented home of the step functions)
  TrainState,
  create_state,
  lr_schedule,
  make_optimizer,
  state_to_tree,
  train_step,
  tree_to_state,
)

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
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
  }
)
# Keys added after the first workdirs were written: a config.json without them ran with these values.
LATER_KEY_DEFAULTS = {
  'transfer': 'full',
  'unfreeze_stages': 0,
  'unfreeze_units': 0,
  'backbone_lr_scale': 1.0,
  'early_stopping_patience': 0,
}


class NonFiniteLossError(BitError):
  """The loss or the gradients stopped being finite numbers."""


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
      'warmup <= decay1 < decay2 < decay3 < total, e.g. --config.schedule=[100,200,300,400,500].'
    ) from None


def _check_config(config) -> None:
  """Cheap checks before any data or model is touched."""
  if not config.get('dataset'):
    raise ConfigError(
      'config.dataset is not set: pass --config.dataset=NAME (a TFDS name such as cifar10) '
      'or --config.dataset=/path/to/folder (ROOT/<split>/<class>/<image>).'
    )
  if not config.get('model'):
    raise ConfigError(
      'config.model is not set: pass --config.model=BiT-M-R50x1 (see bit.list_models()), '
      'a path to an official-layout .npz, or an architecture such as R50x1 to train from scratch.'
    )
  if config.dtype not in DTYPES:
    raise ConfigError(f'config.dtype={config.dtype!r} is not one of {sorted(DTYPES)}.')
  for key in ('batch_size', 'accum_steps'):
    if int(config[key]) < 1:
      raise ConfigError(f'config.{key} must be a positive integer, got {config[key]}.')
  for key in ('eval_every', 'checkpoint_every', 'log_every', 'keep_checkpoints'):
    if int(config[key]) < 0:
      raise ConfigError(f'config.{key} must be >= 0, got {config[key]}.')
  if not float(config.base_lr) > 0:
    raise ConfigError(f'config.base_lr must be a positive number, got {config.base_lr}.')
  _check_transfer_config(config)


def _transfer_settings(c) -> dict:
  """The transfer-learning keys of a config (ConfigDict or resolved dict), defaults filled in."""
  keys = ('transfer', 'unfreeze_stages', 'unfreeze_units', 'backbone_lr_scale')
  t = {k: c.get(k, LATER_KEY_DEFAULTS[k]) for k in keys}
  t['backbone_lr_scale'] = float(t['backbone_lr_scale'])
  return t


def _check_transfer_config(config) -> None:
  t = _transfer_settings(config)
  if t['transfer'] not in freeze.MODES:
    raise ConfigError(
      f'config.transfer={t["transfer"]!r} is not one of {", ".join(freeze.MODES)}: "full" fine-tunes '
      'everything, "head" trains only the new head, "partial" the head plus the top stages/units.'
    )
  patience = config.get('early_stopping_patience', 0)
  for key, value in (
    ('unfreeze_stages', t['unfreeze_stages']),
    ('unfreeze_units', t['unfreeze_units']),
    ('early_stopping_patience', patience),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f'config.{key} must be an integer >= 0, got {value!r}.')
  if t['transfer'] != 'partial' and (t['unfreeze_stages'] or t['unfreeze_units']):
    raise ConfigError(
      f'config.unfreeze_stages/unfreeze_units only apply to --config.transfer=partial, not '
      f'{t["transfer"]!r}: set --config.transfer=partial or drop them.'
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
      '--config.eval_every=STEPS as well (early stopping counts evaluations, not steps).'
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
      raise ConfigError(f'{path} is not readable JSON ({e}): delete it or use another --workdir.') from e
    new = json.loads(json.dumps(resolved))
    old = {**{k: v for k, v in LATER_KEY_DEFAULTS.items() if k in new}, **old}
    operational = OPERATIONAL_KEYS
    if new.get('early_stopping_patience'):
      operational = operational - {'eval_every'}  # it decides when an early-stopped run stops
    diff = sorted(
      k for k in set(old) | set(new) if k not in operational and not _same_value(k, old.get(k), new.get(k))
    )
    if diff:
      details = ', '.join(f'{k}: {old.get(k)!r} there vs {new.get(k)!r} now' for k in diff[:4])
      raise ConfigError(
        f'{workdir} holds a different run ({details}): use a new --workdir, or delete {workdir} to start over.'
      )
  if write:
    files.write_json(path, resolved, sort_keys=True)


# --- checkpoints --------------------------------------------------------------------------------------------


def _checkpoint_manager(workdir: pathlib.Path, keep: int):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True)
  return ocp.CheckpointManager(workdir / CHECKPOINT_DIR, options=options)


def _restore_latest(manager, template):
  """(tree, step) of the newest checkpoint that restores, or (None, 0). Damaged ones are set aside."""
  import orbax.checkpoint as ocp

  for step in sorted(manager.all_steps(), reverse=True):
    try:
      tree = manager.restore(step, args=ocp.args.StandardRestore(template))
      if int(tree['step']) != step:
        raise ValueError(f'it holds step {int(tree["step"])}')
      return tree, step
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
      log.warning(
        'Checkpoint %s/%d is damaged (%s: %s); deleting it and falling back to the one before.',
        manager.directory,
        step,
        type(e).__name__,
        str(e).splitlines()[0][:200] if str(e) else '',
      )
      try:
        manager.delete(step)
      except Exception:  # noqa: BLE001
        pass
      manager.reload()
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


def _compiled(dp, model, params, supports, base_lr, accum_steps, transfer: dict):
  key = (
    repr(model),
    tuple(supports),
    float(base_lr),
    int(accum_steps),
    tuple(sorted(transfer.items())),
    dp.mode,
    tuple(d.id for d in dp.devices),
  )
  if key not in _STEPS_CACHE:
    if len(_STEPS_CACHE) >= _STEPS_CACHE_SIZE:
      _STEPS_CACHE.pop(next(iter(_STEPS_CACHE)))
    template = create_state(
      model, params, lr_schedule(supports, base_lr), accum_steps=accum_steps, **transfer
    )
    template = template.replace(params=None, opt_state=None)  # keep the static fields, not the arrays
    _STEPS_CACHE[key] = (template, dp.wrap(train_step, donate=True))
  template, p_train = _STEPS_CACHE[key]
  state = template.replace(step=0, params=params, opt_state=template.tx.init(params))
  return state, p_train


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

  The dict has `step` (the last trained step), `top1`, `top5`, `eval_loss`, `mean_per_class_accuracy` and
  `num_examples` (on the whole test split) and `loss` (the last train loss). With early stopping the eval
  numbers are the best eval's (the exported model), `best_step` is its step and `stopped_early` says whether
  the run stopped before the schedule's end. See the module docstring for the workdir layout;
  `configs/common.py` for the keys.
  """
  return fit(config, workdir).metrics


def fit(config, workdir) -> FitResult:
  """`train_and_evaluate`, also returning the exported params (host numpy) and the resolved config."""
  from bit import checkpoints, data, evaluation

  _check_config(config)
  dp = parallel.DataParallel(config.parallelism, parallel.select_devices(config.get('num_devices', 0)))
  dp.check_batch(int(config.batch_size), int(config.accum_steps))
  primary = jax.process_index() == 0
  info = data.get_info(
    config.dataset,
    train_split=config.train_split,
    test_split=config.test_split,
    data_dir=config.data_dir,
    examples_per_class=config.examples_per_class,
    seed=config.seed,
  )
  c = resolve_config(config, info)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  with _workdir_errors(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir_config(workdir, c, write=False)  # written below, once the model loads too

  model, params = checkpoints.load(
    c['model'], num_classes=info.num_classes, dtype=DTYPES[c['dtype']], seed=c['seed']
  )
  transfer = _transfer_settings(c)
  mask = freeze.trainable_mask(
    params,
    transfer['transfer'],
    unfreeze_stages=transfer['unfreeze_stages'] or None,
    unfreeze_units=transfer['unfreeze_units'] or None,
  )
  num_trainable, num_params = freeze.count_trainable(params, mask)
  scratch = bool(re.fullmatch(r'R\d+x\d+', str(c['model'])))
  if scratch and transfer['transfer'] != 'full':
    log.warning(
      'config.model=%r is a randomly initialized architecture and config.transfer=%r freezes part of it: '
      'the frozen layers stay random. Use config.transfer=full to train from scratch.',
      c['model'],
      transfer['transfer'],
    )
  patience = int(c.get('early_stopping_patience') or 0)
  supports = c['schedule']
  total = supports[-1]
  state, p_train = _compiled(dp, model, params, supports, c['base_lr'], c['accum_steps'], transfer)
  best = BestEval.initial(params, info.num_classes) if patience else None
  template = state_to_tree(state)
  if best is not None:
    template['early_stopping'] = best.to_tree()
  if primary:
    with _workdir_errors(workdir):
      _check_workdir_config(workdir, c, write=True)
  manager = _checkpoint_manager(workdir, int(c['keep_checkpoints']))
  restored, start = _restore_latest(manager, template)
  if restored is not None:
    state = tree_to_state(state, restored)
    if best is not None:
      best = BestEval.from_tree(restored['early_stopping'])
  last_good = start if restored is not None else None

  writer = MetricsWriter(workdir, enabled=primary)
  if start or writer.path.exists():
    # Marks where this attempt starts: lines after it supersede earlier lines for the same steps.
    if start:
      log.warning('Resuming %s from its checkpoint at step %d of %d.', workdir, start, total)
    writer.write(start, {'resumed_from_step': start})
  what = f'{num_trainable:,} of {num_params:,} parameters trainable (transfer={transfer["transfer"]!r})'
  log.info('%s: %s.', workdir, what)
  if not start:
    writer.write(
      0, {'trainable_params': num_trainable, 'total_params': num_params, 'transfer': transfer['transfer']}
    )
  dstate = dp.replicate(state)
  del state, params, restored

  apply_fn = evaluation.apply_fn(model)  # one function per model: the eval step compiles once

  def evaluate(dstate) -> dict:
    """The whole test split through `evaluation.evaluate_batches`, the same per-batch step as bit-eval."""
    batches = data.eval_iterator(
      c['dataset'],
      split=c['test_split'],
      global_batch_size=c['batch_size'] // c['accum_steps'],
      crop=c['crop'],
      data_dir=c['data_dir'],
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    # Single-process shard_map: the replicated params are already where the eval step wants them.
    single = dp.mode == 'shard_map' and jax.process_count() == 1
    params = dstate.params if single else dp.unreplicate(dstate.params)
    result = evaluation.evaluate_batches(
      apply_fn, params, batches, info.num_classes, devices=dp.local_devices
    )
    return _sum_over_processes(result) if jax.process_count() > 1 else result

  train_iter = data.train_iterator(
    c['dataset'],
    split=c['train_split'],
    global_batch_size=c['batch_size'],
    resize=c['resize'],
    crop=c['crop'],
    num_classes=info.num_classes,
    mixup_alpha=c['mixup_alpha'],
    seed=c['seed'],
    start_step=start,
    examples_per_class=c['examples_per_class'],
    data_dir=c['data_dir'],
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  from tqdm.auto import tqdm

  # A run that stopped early before it was interrupted (or finished) has nothing left to train.
  end = start if best is not None and best.stopped else total
  bar = tqdm(total=end, initial=start, desc='train', unit='step', disable=not primary, dynamic_ncols=True)
  if primary:
    bar.write(what)
  pending = []  # (step, device metrics) not yet fetched: fetching every step would stall the devices
  last_loss = None
  tick, tick_step = time.perf_counter(), start
  final = None  # the eval result of the params at `step`, once there is one
  step = start

  def flush(step):
    """Fetches pending metrics, stops on a non-finite loss, writes a train line; returns the mean loss."""
    nonlocal pending, tick, tick_step
    if not pending:
      return last_loss
    fetched = [(s, jax.device_get(dp.unreplicate(m))) for s, m in pending]
    pending = []
    for s, m in fetched:
      if not (math.isfinite(float(m['loss'])) and math.isfinite(float(m['grad_norm']))):
        where = (
          f'step {last_good} in {workdir / CHECKPOINT_DIR} (rerunning the same command resumes from it)'
          if last_good
          else 'none: no checkpoint was saved yet'
        )
        raise NonFiniteLossError(
          f'The training loss became {float(m["loss"])} (gradient norm {float(m["grad_norm"])}) at step {s}; '
          f'the last good checkpoint is {where}. Lower --config.base_lr or use --config.dtype=float32.'
        )
    now = time.perf_counter()
    loss = float(np.mean([float(m['loss']) for _, m in fetched]))
    ips = (step - tick_step) * c['batch_size'] / max(now - tick, 1e-9)
    tick, tick_step = now, step
    line = {
      'loss': loss,
      'lr': float(fetched[-1][1]['lr']),
      'grad_norm': float(fetched[-1][1]['grad_norm']),
      'images_per_sec': ips,
    }
    writer.write(step, line, prefix='train')
    bar.set_postfix(loss=f'{loss:.4f}', lr=f'{line["lr"]:.2e}', img_s=f'{ips:.1f}', refresh=False)
    return loss

  def run_eval(step) -> dict:
    nonlocal tick
    result = evaluate(dstate)
    writer.write(step, _eval_line(result), prefix='eval')
    if primary:
      bar.write(f'step {step}: top1 {result["top1"]:.4f} top5 {result["top5"]:.4f}')
    tick = time.perf_counter()  # evaluation time is not training throughput
    return result

  try:
    for step in range(start + 1, end + 1):
      batch = next(train_iter)
      dstate, metrics = p_train(dstate, dp.shard(batch))
      pending.append((step, metrics))
      final = None
      bar.update(1)
      is_last = step == total
      do_ckpt = is_last or (c['checkpoint_every'] and step % c['checkpoint_every'] == 0)
      do_eval = is_last or (c['eval_every'] and step % c['eval_every'] == 0)
      if is_last or do_ckpt or do_eval or (c['log_every'] and step % c['log_every'] == 0):
        last_loss = flush(step)
      stop = False
      if do_eval:
        # Before the checkpoint, so that the checkpoint of this step knows this step's eval.
        final = run_eval(step)
        if best is not None:
          stop = best.update(step, final, lambda d=dstate: dp.unreplicate(d.params), patience) and not is_last
      if stop:
        writer.write(
          step,
          {'early_stopping': 'stopped', 'best_step': best.step, 'best_top1': best.top1, 'patience': patience},
        )
        log.warning(
          'Early stopping at step %d of %d: eval top-1 has not improved for %d evaluation(s) since step %d '
          '(%.4f); exporting the params of step %d.',
          step,
          total,
          patience,
          best.step,
          best.top1,
          best.step,
        )
      if do_ckpt or stop:
        import orbax.checkpoint as ocp

        tree = state_to_tree(dp.unreplicate(dstate))
        if best is not None:
          tree['early_stopping'] = best.to_tree()
        manager.save(step, args=ocp.args.StandardSave(tree))
        last_good = step
      if stop:
        break
    bar.close()
    if best is None and final is None:
      # Nothing was evaluated in this attempt (a finished run rerun): evaluate the final params.
      final = run_eval(step)
    manager.wait_until_finished()
  finally:
    bar.close()
    writer.close()
    manager.close()

  if best is not None:
    params, result = best.params, best.result
    extra = {'best_step': best.step, 'stopped_early': best.stopped}
  else:
    params, result, extra = dp.unreplicate(dstate.params), final, {}
  if primary:
    _export(workdir, params, result, info, c['test_split'])
  metrics = {'step': step, **_eval_line(result), **extra}
  if last_loss is not None:
    metrics['loss'] = last_loss
  log.info('Finished %s at step %d: top1 %.4f, top5 %.4f.', workdir, step, metrics['top1'], metrics['top5'])
  return FitResult(metrics=metrics, params=params, config=c)


def _export(workdir: pathlib.Path, params, result: dict, info, split: str) -> None:
  """model.npz, labels.txt, then the pictures: curves.png and the confusion matrix of `result`."""
  from bit import checkpoints, evaluation, plots

  checkpoints.save_npz(params, workdir / 'model.npz')
  names = list(info.class_names or [str(i) for i in range(info.num_classes)])
  files.write_text(workdir / 'labels.txt', ''.join(f'{n}\n' for n in names))
  try:
    evaluation.write_report(dict(result, class_names=names, split=split), workdir, names, split)
    plots.plot_curves(workdir / 'metrics.jsonl', workdir / 'curves.png')
  except Exception as e:  # noqa: BLE001 - a picture that fails to draw must not fail a finished run
    log.warning('Could not write the plots of %s (%s: %s); the model is saved.', workdir, type(e).__name__, e)
