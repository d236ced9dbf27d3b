"""Long runs: orbax checkpoints that recover, and the signals that stop a run cleanly.

Where a checkpoint is restored: `resume(manager, template, restart=, primary=)` at the start of every run
(`bit.train` calls it once, in its setup): with `config.restart` it first moves every checkpoint aside
(`set_all_aside`), then `restore_latest` restores the newest checkpoint that reads and fits the template,
moving newer unreadable ones aside (`set_aside`, never deleted); none restoring is a CheckpointRestoreError.
Where one is written: `save_checkpoint(manager, state, best, step)`, which the loop calls when
`config.checkpoint_every` says, when early stopping stops it, and when a stop signal arrives.

`StopSignals`: SIGTERM and the first Ctrl-C ask the loop to stop after the step in flight (all processes
at the same step, `agreed()`); `interrupted(...)` is the `bit.errors.Interrupted` (exit code 143/130) then
raised.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from bit import files, layout
from bit.errors import BitError, Interrupted
from bit.train_state import state_to_tree

log: logging.Logger = logging.getLogger(__name__)


class CheckpointRestoreError(BitError):
  """Checkpoints exist but none of them restores; nothing was deleted or moved."""


def checkpoint_manager(workdir: pathlib.Path, keep: int, *, asynchronous: bool = True) -> Any:
  """The orbax CheckpointManager of `workdir/checkpoints/`, keeping the newest `keep` (0: all)."""
  import orbax.checkpoint as ocp

  # cleanup_tmp_directories stays False (orbax's default): a save cut short leaves a
  # `<step>.orbax-checkpoint-tmp-*` folder that orbax does not list as a step, and nothing here deletes it.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep or None, create=True, enable_async_checkpointing=asynchronous
  )
  return ocp.CheckpointManager(workdir / layout.CHECKPOINT_DIR, options=options)


def _reason(e: BaseException) -> str:
  """One line for a failed restore: the exception's type and the first line of its message."""
  text = str(e).splitlines()[0][:300] if str(e) else ''
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def free_name(directory: pathlib.Path, name: str) -> pathlib.Path:
  """`directory/name`, or `name-2`, `name-3`... when it (or its `.txt` note) exists."""
  path, n = directory / name, 1
  while path.exists() or path.with_name(path.name + '.txt').exists():
    n += 1
    path = directory / f'{name}-{n}'
  return path


def set_aside(directory: pathlib.Path, step: int, reason: str, primary: bool) -> pathlib.Path | None:
  """Moves checkpoint `step` to `unreadable-<step>/` with the reason in `unreadable-<step>.txt` beside it."""
  if not primary:
    return None
  directory = pathlib.Path(directory)
  dest = free_name(directory, f'unreadable-{step}')
  os.replace(directory / str(step), dest)
  files.write_text(
    dest.with_name(dest.name + '.txt'),
    f'Checkpoint step {step} did not restore and was moved here from {directory / str(step)}.\n'
    f'Reason: {reason}\n'
    'bit never reads or deletes this folder: delete it yourself once you no longer need it.\n',
  )
  return dest


def set_all_aside(manager: Any, primary: bool) -> pathlib.Path | None:
  """`config.restart`: moves every checkpoint to `restart-<UTC time>/<step>/` (kept, never read again)."""
  steps = list(manager.all_steps())
  if not steps or not primary:
    return None
  directory = pathlib.Path(manager.directory)
  dest = free_name(directory, 'restart-' + time.strftime('%Y%m%dT%H%M%SZ', time.gmtime()))
  dest.mkdir()
  for step in steps:
    os.replace(directory / str(step), dest / str(step))
  return dest


def sync(name: str) -> None:
  """Waits for every process (after process 0 moved checkpoints, before anyone lists them again)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def check_like(tree: Any, template: Any) -> None:
  """ValueError unless `tree` has the structure and shapes of `template` (orbax restores numpy leaves as
  saved, whatever the template says)."""
  if jax.tree.structure(tree) != jax.tree.structure(template):
    raise ValueError('its tree of arrays is not the one this run trains (a different model or optimizer?)')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(template), strict=True):
    if np.shape(a) != np.shape(b):
      raise ValueError(f'{jax.tree_util.keystr(path)} has shape {np.shape(a)}, this run needs {np.shape(b)}')


def restore_latest(manager: Any, template: Any, *, primary: bool = True) -> Any:
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
      check_like(tree, template)
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
      dest = set_aside(manager.directory, bad, reason, primary)
      if dest is not None:
        log.warning('Moved checkpoint %d aside to %s (the reason is in %s.txt).', bad, dest, dest)
    if failed:
      sync('bit-set-aside')
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


def resume(manager: Any, template: Any, *, restart: bool = False, primary: bool = True) -> Any:
  """(tree, step) to start from: the newest checkpoint that restores (`restore_latest`), or (None, 0).

  `restart` (config.restart) first moves every checkpoint aside (`set_all_aside`): the run starts over.
  """
  if restart:
    moved = set_all_aside(manager, primary)
    sync('bit-restart')
    manager.reload()
    if moved is not None:
      log.warning('config.restart=True: starting over; the old checkpoints are kept in %s.', moved)
  return restore_latest(manager, template, primary=primary)


def save_checkpoint(manager: Any, state: Any, best: Any, step: int) -> None:
  """An asynchronous orbax save of {step, params, opt_state} of the host `state` (+ the early-stopping state
  `best`, when there is one) at `step`."""
  import orbax.checkpoint as ocp

  tree = state_to_tree(state)
  if best is not None:
    tree['early_stopping'] = best.to_tree()
  manager.save(step, args=ocp.args.StandardSave(tree))


# --- stop signals -------------------------------------------------------------------------------------------


# Steps between a signal and the step every process of a multi-process run stops after (StopSignals.agreed):
# the host runs up to this many steps ahead of the devices.
STOP_LAG = 2


class StopSignals:
  """SIGTERM and the first SIGINT ask the loop to stop after the step in flight; a second SIGINT raises
  KeyboardInterrupt at once. Installed only in the main thread (signals are delivered there)."""

  NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT'}

  def __init__(self) -> None:
    self.signum: int = 0
    self._previous = {}
    self._agreement = None  # parallel.LaggedMax, in a multi-process run

  def __enter__(self) -> Any:
    if threading.current_thread() is threading.main_thread():
      for s in self.NAMES:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
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

  def agreed(self, wait: bool = False) -> int:
    """The signal every process stops for (0: none), the same at the same step in every process.

    One process: its own signal. Several: each call (once per step, at the same steps everywhere) issues the
    reduction of this step's signals over the processes and reads the one issued `STOP_LAG` calls earlier
    (`parallel.LaggedMax`), so the host is never held until the step in flight ends, as a blocking
    allgather per step did: a signal stops every process `STOP_LAG` steps later. `wait=True` (where the loop
    waits for the devices anyway: an eval, a checkpoint, the end) reads every reduction issued so far.
    """
    if jax.process_count() == 1:
      return self.signum
    if self._agreement is None:
      from bit import parallel

      self._agreement = parallel.LaggedMax(STOP_LAG)
    got = self._agreement.push(self.signum)
    return max(got, self._agreement.drain()) if wait else got


def interrupted(signum: int, step: int, total: int, workdir: pathlib.Path, saved: bool) -> Interrupted:
  """The Interrupted of a stop by `signum` after `step` (exit code 128 + signum: 143 SIGTERM, 130 SIGINT)."""
  name = StopSignals.NAMES.get(signum, f'signal {signum}')
  where = workdir / layout.CHECKPOINT_DIR / str(step)
  return Interrupted(
    f'stopped by {name} after step {step} of {total}; '
    + (f'its checkpoint is {where}' if saved else 'nothing new to save')
    + ': rerun the same command to resume.',
    exit_code=128 + int(signum),
  )
