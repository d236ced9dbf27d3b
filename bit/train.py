"""Fine-tuning: `train_and_evaluate(config, workdir)`, the loop around the per-device step.

The loop loads the model (`bit.load`), resolves the unset hyper-rule keys from the data, trains for the
schedule's total steps on all devices, evaluates on the whole test split, checkpoints with orbax and
exports `model.npz` + `labels.txt`. Rerunning it on the same workdir resumes from the latest good
checkpoint and gives the same final params as an uninterrupted run, because every random draw (crop, flip,
MixUp, init) is a function of the seed and the step, made on the host.

Workdir:
  config.json       the resolved config (a rerun with a different one is refused)
  metrics.jsonl     one JSON object per line: train lines (loss, lr, images_per_sec), eval lines (top1, top5)
  events.out.*      TensorBoard
  checkpoints/<step>/  orbax checkpoints of {step, params, opt_state}
  model.npz, labels.txt  the fine-tuned model in the official layout and its class names
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from bit import hyperrule, parallel
from bit.errors import BitError, ConfigError
from bit.metrics_log import MetricsWriter
from bit.train_state import (  # noqa: F401  (re-exported: the documented home of the step functions)
  TrainState,
  create_state,
  eval_step,
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
    s = [int(x) for x in schedule]
    ok = len(s) == 5 and s == [float(x) for x in schedule] and 0 <= s[0] <= s[1] < s[2] < s[3] < s[4]
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(
      f'config.schedule={schedule!r} is not [warmup, decay1, decay2, decay3, total] in steps with '
      'warmup <= decay1 < decay2 < decay3 < total, e.g. --config.schedule=[100,200,300,400,500].'
    )
  return s


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


def _check_workdir_config(workdir: pathlib.Path, resolved: dict, write: bool) -> None:
  """Writes config.json, or checks that the one there describes the same run."""
  path = workdir / CONFIG_FILE
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f'{path} is not readable JSON ({e}): delete it or use another --workdir.') from e
    new = json.loads(json.dumps(resolved))
    diff = sorted(k for k in set(old) | set(new) if k not in OPERATIONAL_KEYS and old.get(k) != new.get(k))
    if diff:
      details = ', '.join(f'{k}: {old.get(k)!r} there vs {new.get(k)!r} now' for k in diff[:4])
      raise ConfigError(
        f'{workdir} holds a different run ({details}): use a new --workdir, or delete {workdir} to start over.'
      )
  if write:
    _atomic_write(path, json.dumps(resolved, indent=2, sort_keys=True) + '\n')


def _atomic_write(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


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


# --- the loop -----------------------------------------------------------------------------------------------

# The static parts of recent runs (apply_fn, optimizer, schedule, wrapped steps): a second run of the same
# setup in one process (a notebook, a test, a finished run rerun) reuses the compiled steps.
_STEPS_CACHE: dict = {}
_STEPS_CACHE_SIZE = 4


def _compiled(dp, model, params, supports, base_lr, accum_steps):
  key = (
    repr(model),
    tuple(supports),
    float(base_lr),
    int(accum_steps),
    dp.mode,
    tuple(d.id for d in dp.devices),
  )
  if key not in _STEPS_CACHE:
    if len(_STEPS_CACHE) >= _STEPS_CACHE_SIZE:
      _STEPS_CACHE.pop(next(iter(_STEPS_CACHE)))
    template = create_state(model, params, lr_schedule(supports, base_lr), accum_steps=accum_steps)
    template = template.replace(params=None, opt_state=None)  # keep the static fields, not the arrays
    _STEPS_CACHE[key] = (template, dp.wrap(train_step, donate=True), dp.wrap(eval_step))
  template, p_train, p_eval = _STEPS_CACHE[key]
  state = template.replace(step=0, params=params, opt_state=template.tx.init(params))
  return state, p_train, p_eval


def train_and_evaluate(config, workdir) -> dict:
  """Fine-tunes `config.model` on `config.dataset` in `workdir`; returns the final metrics.

  The dict has `step`, `top1`, `top5`, `eval_loss` (on the whole test split) and `loss` (the last train
  loss). See the module docstring for the workdir layout; `configs/common.py` for the keys.
  """
  return fit(config, workdir).metrics


def fit(config, workdir) -> FitResult:
  """`train_and_evaluate`, also returning the final params (host numpy) and the resolved config."""
  from bit import checkpoints, data

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
  workdir.mkdir(parents=True, exist_ok=True)
  _check_workdir_config(workdir, c, write=primary)

  model, params = checkpoints.load(
    c['model'], num_classes=info.num_classes, dtype=DTYPES[c['dtype']], seed=c['seed']
  )
  supports = c['schedule']
  total = supports[-1]
  state, p_train, p_eval = _compiled(dp, model, params, supports, c['base_lr'], c['accum_steps'])
  template = state_to_tree(state)
  manager = _checkpoint_manager(workdir, int(c['keep_checkpoints']))
  restored, start = _restore_latest(manager, template)
  if restored is not None:
    state = tree_to_state(state, restored)
  last_good = start if restored is not None else None

  writer = MetricsWriter(workdir, enabled=primary)
  if start or writer.path.exists():
    # Marks where this attempt starts: lines after it supersede earlier lines for the same steps.
    if start:
      log.warning('Resuming %s from its checkpoint at step %d of %d.', workdir, start, total)
    writer.write(start, {'resumed_from_step': start})
  dstate = dp.replicate(state)
  del state, params, restored

  def evaluate(dstate):
    counts = {'correct1': 0.0, 'correct5': 0.0, 'count': 0.0, 'loss_sum': 0.0}
    it = data.eval_iterator(
      c['dataset'],
      split=c['test_split'],
      global_batch_size=c['batch_size'] // c['accum_steps'],
      crop=c['crop'],
      data_dir=c['data_dir'],
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    for batch in it:
      out = dp.unreplicate(p_eval(dstate, dp.shard(batch)))
      for k in counts:
        counts[k] += float(out[k])
    n = max(counts['count'], 1.0)
    return {
      'top1': counts['correct1'] / n,
      'top5': counts['correct5'] / n,
      'eval_loss': counts['loss_sum'] / n,
      'num_examples': int(counts['count']),
    }

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

  bar = tqdm(total=total, initial=start, desc='train', unit='step', disable=not primary, dynamic_ncols=True)
  pending = []  # (step, device metrics) not yet fetched: fetching every step would stall the devices
  last_loss = None
  tick, tick_step = time.perf_counter(), start
  eval_metrics = None

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

  try:
    for step in range(start + 1, total + 1):
      batch = next(train_iter)
      dstate, metrics = p_train(dstate, dp.shard(batch))
      pending.append((step, metrics))
      bar.update(1)
      is_last = step == total
      do_ckpt = is_last or (c['checkpoint_every'] and step % c['checkpoint_every'] == 0)
      do_eval = is_last or (c['eval_every'] and step % c['eval_every'] == 0)
      if is_last or do_ckpt or do_eval or (c['log_every'] and step % c['log_every'] == 0):
        last_loss = flush(step)
      if do_ckpt:
        import orbax.checkpoint as ocp

        manager.save(step, args=ocp.args.StandardSave(state_to_tree(dp.unreplicate(dstate))))
        last_good = step
      if do_eval and not is_last:
        eval_metrics = evaluate(dstate)
        writer.write(step, eval_metrics, prefix='eval')
        bar.write(f'step {step}: top1 {eval_metrics["top1"]:.4f} top5 {eval_metrics["top5"]:.4f}')
        tick = time.perf_counter()  # evaluation time is not training throughput
    bar.close()
    # The final evaluation also runs when a finished run is rerun (nothing left to train).
    eval_metrics = evaluate(dstate)
    writer.write(total, eval_metrics, prefix='eval')
    manager.wait_until_finished()
  finally:
    bar.close()
    writer.close()
    manager.close()

  params = dp.unreplicate(dstate.params)
  if primary:
    checkpoints.save_npz(params, workdir / 'model.npz')
    names = info.class_names or [str(i) for i in range(info.num_classes)]
    _atomic_write(workdir / 'labels.txt', ''.join(f'{n}\n' for n in names))
  metrics = {'step': total, **eval_metrics}
  if last_loss is not None:
    metrics['loss'] = last_loss
  log.info('Finished %s at step %d: top1 %.4f, top5 %.4f.', workdir, total, metrics['top1'], metrics['top5'])
  return FitResult(metrics=metrics, params=params, config=c)
