"""Fine-tuning: `train_and_evaluate(config, workdir)`, the loop around the per-device step.

The loop loads the model (`bit.load`), resolves the unset hyper-rule keys from the data, trains for the
schedule's total steps on all devices, evaluates on the whole test split, checkpoints with orbax and
exports `model.npz` + `labels.txt`. Rerunning it on the same workdir resumes from the latest good
checkpoint and gives the same final params as an uninterrupted run, because every random draw (crop, flip,
MixUp, init) is a function of the seed and the step, made on the host.

Transfer learning is a mask on the one optimizer (`config.transfer`: 'full', 'head' or 'partial', see
`bit.freeze`); training from scratch is `config.model='R50x1'`. With `config.early_stopping_patience=N` the
run stops once N evaluations in a row have not improved the best eval top-1, and exports the best eval's
params (`bit.early_stopping`).

How it reads: `fit` = `train_setup.setup` (check and resolve the config, `bit.config`; load the model;
restore the newest checkpoint, `bit.recovery.resume`), then `_train`: one loop whose step is followed by its
periodic actions, one helper each, each fed what the one before decided: `_log`, `_evaluate`, `_early_stop`,
`_signal`, `_checkpoint` (the only place the loop decides to save: `config.checkpoint_every`, the last step,
an early stop, a stop signal), then the raise on a signal; then `_export` (`bit.workdir`). The workdir's
files are listed in `bit.layout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import pathlib
import typing
from collections.abc import Mapping
from typing import Any, Callable

import jax

from bit import lock, parallel, recovery, train_setup
from bit import workdir as workdir_lib
from bit.config import OPERATIONAL_KEYS, as_config
from bit.config import resolve as resolve_config
from bit.errors import ConfigError, Interrupted, NonFiniteLossError
from bit.evaluation import eval_line, evaluate_test_split
from bit.metrics_log import MetricsWriter, TrainLog
from bit.recovery import CheckpointRestoreError
from bit.train_setup import Objective
from bit.types import TrainResult

if typing.TYPE_CHECKING:
  import ml_collections

log: logging.Logger = logging.getLogger(__name__)

# Re-exported: named by the README, docs/ARCHITECTURE.md and callers of `bit.train`.
__all__ = [
  'CheckpointRestoreError',
  'FitResult',
  'NonFiniteLossError',
  'OPERATIONAL_KEYS',
  'Objective',
  'as_config',
  'evaluate_test_split',
  'fit',
  'resolve_config',
  'train_and_evaluate',
]


@dataclasses.dataclass
class FitResult:
  """What `fit` leaves behind: the final metrics and the final params (host numpy tree)."""

  metrics: TrainResult
  params: dict[str, Any]
  config: dict[str, Any]


def train_and_evaluate(
  config: ml_collections.ConfigDict | Mapping[str, Any], workdir: str | os.PathLike[str]
) -> TrainResult:
  """Fine-tunes `config.model` on `config.dataset` in `workdir`; returns the final metrics.

  `config`: a ConfigDict (`bit.config.get_config()`; bit/config.py lists every key) or a plain dict of those keys,
  put onto the defaults, e.g. `{'model': 'BiT-M-R50x1', 'dataset': 'cifar10'}`.

  The dict has `step` (the last trained step), `top1`, `top5`, `eval_loss`, `mean_per_class_accuracy` and
  `num_examples` (on the whole test split) and `loss` (the last train loss). With early stopping the eval
  numbers are the best eval's (the exported model), `best_step` is its step and `stopped_early` says whether
  the run stopped before the schedule's end. SIGTERM or Ctrl-C stops after the step in flight with a
  checkpoint of it and raises `bit.errors.Interrupted` (exit_code 143 or 130). See `bit.layout` for the
  workdir's files; `bit/config.py` for the keys.
  """
  return fit(config, workdir).metrics


def fit(config: Any, workdir: str | os.PathLike[str], objective: Objective | None = None) -> FitResult:
  """`train_and_evaluate`, also returning the exported params (host numpy) and the resolved config.

  `objective` trains for another loss (and on other examples) in this same loop: see `Objective`.
  """
  config = as_config(config)
  if not isinstance(workdir, (str, os.PathLike)) or not str(os.fspath(workdir)).strip():
    raise ConfigError(f'workdir= must be a folder path (str or pathlib.Path), got {workdir!r}.')
  with contextlib.ExitStack() as held:
    path = pathlib.Path(workdir).expanduser().absolute()
    with workdir_lib.errors(path):  # one run per workdir: a second one is refused here, before anything
      held.enter_context(lock.workdir_lock(path, hold=jax.process_index() == 0))
    return _fit(config, workdir, objective)


def _fit(config, workdir, objective: Objective | None) -> FitResult:
  setup = train_setup.setup(config, workdir, objective)
  with recovery.StopSignals() as stop:
    run = _start(setup, stop)
    try:
      _train(run)
      _after_training(run)
    except KeyboardInterrupt:
      raise _interrupted_at_once(run) from None
    finally:
      run.close()
    params, result, extra = _outcome(run)
    if setup.primary:
      _export(run, params, result)
  metrics = {'step': run.step, **eval_line(result), **extra}
  if run.train_log.last_loss is not None:
    metrics['loss'] = run.train_log.last_loss
  log.info(
    'Finished %s at step %d: top1 %.4f, top5 %.4f.', setup.workdir, run.step, metrics['top1'], metrics['top5']
  )
  return FitResult(metrics=metrics, params=params, config=setup.cfg)


def _start(setup: train_setup.Setup, stop: recovery.StopSignals) -> _Run:
  """The metrics.jsonl lines of a (re)start, the replicated state, the data, the bar: the loop at `start`."""
  start, total = setup.start, setup.total
  writer = train_setup.start_writer(setup)
  dstate = setup.dp.replicate(setup.state)
  extra = () if setup.objective is None else (setup.dp.replicate(setup.objective.extra),)
  evaluate, batches = train_setup.evaluator(setup), train_setup.train_iterator(setup)
  # The files that did not decode (the prefetch below hides the iterator; a test's own iterator has none).
  skipped = getattr(batches, 'skipped', None)
  batches = parallel.prefetch_to_device(batches, setup.dp.shard)  # on the devices 2 steps ahead, same order
  # A run that stopped early before it was interrupted (or finished) has nothing left to train.
  end = start if setup.best is not None and setup.best.stopped else total
  bar = train_setup.progress_bar(setup, end)
  return _Run(
    setup=setup,
    stop=stop,
    writer=writer,
    bar=bar,
    train_log=train_setup.train_log(setup, writer, bar),
    evaluate=evaluate,
    batches=batches,
    skipped=skipped,
    dstate=dstate,
    extra=extra,
    end=end,
    step=start,
    last_good=start if setup.restored else None,
  )


def _train(run: _Run) -> None:
  """The loop: a train step, then that step's periodic actions, each fed what the one before decided."""
  setup = run.setup
  for step in range(setup.start + 1, run.end + 1):
    run.dstate, metrics = setup.p_train(run.dstate, next(run.batches), *run.extra)
    run.step, run.final = step, None
    run.train_log.add(step, metrics)
    run.bar.update(1)
    _log(run, step)
    result = _evaluate(run, step)  # None unless config.eval_every (or the last step) says so
    stopped = _early_stop(run, step, result)
    signum = _signal(run, step)
    _checkpoint(run, step, stopped, signum)
    if signum:
      raise _preempted(run, signum, saved=True)
    if stopped:
      return


def _log(run: _Run, step: int) -> None:
  """A train line when it is time to log, evaluate or checkpoint (fetching the device metrics of the steps
  since the last one; NonFiniteLossError on a non-finite loss)."""
  cfg, total = run.setup.cfg, run.setup.total
  if any(_itstime(step, cfg[k], total) for k in ('checkpoint_every', 'eval_every', 'log_every')):
    run.train_log.flush(step, run.last_good)


def _evaluate(run: _Run, step: int) -> dict | None:
  """The eval result of `step` when config.eval_every (or the last step) says so, else None."""
  if not _itstime(step, run.setup.cfg['eval_every'], run.setup.total):
    return None
  run.final = _eval(run, step)
  return run.final


def _eval(run: _Run, step: int) -> dict:
  result = run.evaluate(run.dstate)
  run.writer.write(step, eval_line(result), prefix='eval')
  if run.setup.primary:
    run.bar.write(f'step {step}: top1 {result["top1"]:.4f} top5 {result["top5"]:.4f}')
  run.train_log.pause_clock()
  return result


def _early_stop(run: _Run, step: int, result: dict | None) -> bool:
  """Records the eval `result` of `step` in the early-stopping state; True when the run stops here."""
  setup, best = run.setup, run.setup.best
  if best is None or result is None:
    return False
  params_fn = functools.partial(setup.dp.unreplicate, run.dstate.params)  # called only for a new best
  if not (best.update(step, result, params_fn, setup.patience) and step != setup.total):
    return False
  line = {
    'early_stopping': 'stopped',
    'best_step': best.step,
    'best_top1': best.top1,
    'patience': setup.patience,
  }
  run.writer.write(step, line)
  log.warning(
    'Early stopping at step %d of %d: eval top-1 has not improved for %d evaluation(s) since step '
    '%d (%.4f); exporting the params of step %d.',
    step,
    setup.total,
    setup.patience,
    best.step,
    best.top1,
    best.step,
  )
  return True


def _signal(run: _Run, step: int) -> int:
  """The stop signal all processes agree on (0: none); with one, the train line of the steps so far. With
  several processes a signal is acted on `recovery.STOP_LAG` steps after it came, or at the next eval or
  checkpoint step, where the host waits for the devices anyway: the same step in every process."""
  cfg, total = run.setup.cfg, run.setup.total
  waits = any(
    _itstime(step, cfg[k], total) for k in ('checkpoint_every', 'eval_every')
  )  # the host waits anyway
  signum = run.stop.agreed(wait=waits)
  if signum:
    run.train_log.flush(step, run.last_good)
  return signum


def _checkpoint(run: _Run, step: int, stopped: bool, signum: int) -> None:
  """Saves `step` when config.checkpoint_every (or the last step) says so, when the run stopped early, or
  when a signal stops it: after this step's eval, so the checkpoint holds the early-stopping state of it."""
  setup = run.setup
  if not (_itstime(step, setup.cfg['checkpoint_every'], setup.total) or stopped or signum):
    return
  recovery.save_checkpoint(setup.manager, setup.dp.unreplicate(run.dstate), setup.best, step)
  run.last_good = step
  run.train_log.pause_clock()


def _preempted(run: _Run, signum: int, saved: bool) -> Interrupted:
  """The `preempted` line, once the checkpoint of `run.step` (if `saved`) is on disk; the error to raise."""
  if saved:
    run.setup.manager.wait_until_finished()
  run.writer.write(run.step, {'preempted': True})
  return recovery.interrupted(signum, run.step, run.setup.total, run.setup.workdir, saved)


def _after_training(run: _Run) -> None:
  """Evaluates the final params when nothing was evaluated in this attempt (a finished run rerun) and waits
  for the last checkpoint; a signal during that eval stops here (the export is redone on resume)."""
  run.bar.close()
  if run.setup.best is None and run.final is None:
    run.final = _eval(run, run.step)
  run.setup.manager.wait_until_finished()
  signum = run.stop.agreed(wait=True)
  if signum:
    raise _preempted(run, signum, saved=False)


def _interrupted_at_once(run: _Run) -> Interrupted:
  """A second Ctrl-C: exit code 130, nothing saved."""
  where = (
    f'the last checkpoint is step {run.last_good} (rerunning the same command resumes from it)'
    if run.last_good
    else 'no checkpoint was saved yet (rerunning the same command starts over)'
  )
  return Interrupted(f'interrupted at once at step {run.step} without saving; {where}.', 130)


def _outcome(run: _Run) -> tuple[dict, dict, dict]:
  """(params, eval result, extra metrics) to export: the best eval's with early stopping, else the last."""
  best = run.setup.best
  if best is not None:
    return best.params, best.result, {'best_step': best.step, 'stopped_early': best.stopped}
  return run.setup.dp.unreplicate(run.dstate.params), run.final, {}


def _export(run: _Run, params, result: dict) -> None:
  """model.npz, labels.txt, then the pictures: curves.png and the confusion matrix of `result`.

  A signal here stops before model.npz or before the pictures (model.npz itself is written atomically);
  the checkpoint of the last step exists, so a rerun resumes there and exports again.
  """
  setup, info = run.setup, run.setup.info
  names = list(info.class_names or [str(i) for i in range(info.num_classes)])
  _stop_if_signalled(run)
  workdir_lib.export(setup.workdir, params, names)
  _stop_if_signalled(run)
  workdir_lib.write_report(setup.workdir, result, names, setup.cfg['test_split'])


def _stop_if_signalled(run: _Run) -> None:
  signum = run.stop.signum
  if signum:
    MetricsWriter(run.setup.workdir, tensorboard=False).write(run.step, {'preempted': True})
    raise recovery.interrupted(signum, run.step, run.setup.total, run.setup.workdir, saved=False)


def _itstime(step: int, every: int, total: int) -> bool:
  """Whether an every-`every`-steps action (0 = only at the end) runs at `step`; always at the last step."""
  return step == total or bool(every and step % every == 0)


# --- the loop's state --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
  """The loop's state: `dstate`, `step`, `last_good` and `final` change as it runs; the rest does not."""

  setup: train_setup.Setup
  stop: recovery.StopSignals
  writer: MetricsWriter
  bar: Any  # tqdm
  train_log: TrainLog
  evaluate: Callable  # evaluate(dstate) -> result, on the whole test split
  batches: Any  # the train batches on the devices, from `start`
  skipped: Any  # data.Skipped (or None): the train files that did not decode, reported after the bar
  dstate: Any  # the train state on the devices
  extra: tuple  # the objective's extra input on the devices (a teacher), or ()
  end: int  # the last step to train (`start` for a run that already stopped early)
  step: int  # the last trained step
  last_good: int | None  # the newest checkpoint: restored or saved by this attempt
  final: dict | None = None  # the eval result of the params at `step`, once there is one

  def close(self) -> None:
    self.bar.close()
    if self.skipped is not None:
      self.skipped.report()  # the files that did not decode, named once each, after the progress bar
    self.writer.close()
    self.setup.manager.close()
