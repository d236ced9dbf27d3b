"""What the training loop starts from: `setup(config, workdir, objective) -> Setup`.

`setup` checks and resolves the config (`bit.config.check`, `bit.config.resolve`), checks the workdir holds
this run (`bit.workdir.check_same_run`), loads the model (`bit.load`, `config.remat`), masks the frozen
params (`bit.freeze`), builds the compiled train step (`compiled_step`: cached per setup, so a second run
in one process does not compile again) and restores the newest checkpoint (`bit.recovery.resume`). The
loop (`bit.train.fit`) reads the `Setup` and never changes it. `train_iterator(setup)` and
`evaluator(setup)` are the loop's data and test-split evaluation. An `Objective` (`bit.distill` makes one)
trains for another loss in the same loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
from typing import Any, Callable, Hashable

import jax

from bit import config as config_lib
from bit import freeze, layout, models, parallel, recovery
from bit import workdir as workdir_lib
from bit.early_stopping import BestEval
from bit.evaluation import evaluate_test_split
from bit.metrics_log import MetricsWriter, TrainLog
from bit.train_state import (
  TrainState,
  create_state,
  lr_schedule,
  start_state,
  state_to_tree,
  train_step,
  tree_to_state,
)

log: logging.Logger = logging.getLogger(__name__)


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
class Setup:
  """Everything the loop starts from: built once by `_setup`, read (not changed) by the loop."""

  cfg: dict[str, Any]  # the resolved config
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
  counts: dict[str, Any]  # the metrics.jsonl start line
  objective: Objective | None = None  # None: the labels' cross-entropy on the train split

  @property
  def total(self) -> int:
    return self.cfg['schedule'][-1]

  @property
  def primary(self) -> bool:
    return jax.process_index() == 0

  @property
  def patience(self) -> int:
    return int(self.cfg.get('early_stopping_patience') or 0)

  @property
  def what(self) -> str:
    """The trainable-parameter count, for the log."""
    c = self.counts
    return (
      f'{c["trainable_params"]:,} of {c["total_params"]:,} parameters trainable (transfer={c["transfer"]!r})'
    )


def dataset_info(config: Any) -> Any:
  """`data.get_info` of a config's dataset, splits and few-shot subset: what a run (or a distillation) trains on."""
  from bit import data

  return data.get_info(
    config.dataset,
    train_split=config.train_split,
    test_split=config.test_split,
    data_dir=config.data_dir,
    examples_per_class=config.examples_per_class,
    seed=config.seed,
  )


def setup(config: Any, workdir: str | os.PathLike[str], objective: Objective | None = None) -> Setup:
  """Checks and resolves the config (`bit.config`), loads the model, restores the newest checkpoint that
  restores (`bit.recovery.resume`): what the loop starts from."""

  config_lib.check(config)
  dp = parallel.DataParallel(config.parallelism, parallel.select_devices(config.get('num_devices', 0)))
  dp.check_batch(int(config.batch_size), int(config.accum_steps))
  info = dataset_info(config)
  if objective is not None and objective.train_records is not None:
    info = dataclasses.replace(info, train_size=len(objective.train_records))  # what the hyper-rule sizes
  cfg = config_lib.resolve(config, info)
  del config  # from here on, the resolved one
  workdir = pathlib.Path(workdir).expanduser().absolute()
  with workdir_lib.errors(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.check_same_run(workdir, cfg, write=False)  # written below, once the model loads too
  model, params, transfer, counts = load_model(cfg, info, objective)
  state, p_train = compiled_step(
    dp, model, params, cfg['schedule'], cfg['base_lr'], cfg['accum_steps'], transfer, objective
  )
  patience = int(cfg.get('early_stopping_patience') or 0)
  best = BestEval.initial(params, info.num_classes) if patience else None
  if jax.process_index() == 0:
    with workdir_lib.errors(workdir):
      workdir_lib.check_same_run(workdir, cfg, write=True)
  manager, state, best, start = restore(cfg, workdir, state, best)
  return Setup(
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
    restored=start > 0,
    counts=counts,
    objective=objective,
  )


def load_model(cfg: dict[str, Any], info: Any, objective: Objective | None) -> Any:
  """(model, params, transfer settings, the metrics.jsonl start line of trainable-parameter counts)."""
  from bit import checkpoints

  model, params = checkpoints.load(
    cfg['model'], num_classes=info.num_classes, dtype=models.DTYPES[cfg['dtype']], seed=cfg['seed']
  )
  model = with_remat(model, cfg)
  if objective is not None and objective.check_model is not None:
    objective.check_model(model, params)
  transfer = config_lib.transfer_settings(cfg)
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
  counts = {'trainable_params': num_trainable, 'total_params': num_params, 'transfer': transfer['transfer']}
  return model, params, transfer, counts


def restore(cfg: dict[str, Any], workdir: pathlib.Path, state: TrainState, best: BestEval | None) -> Any:
  """(manager, state, best, start): the orbax manager of the workdir and the state of its newest checkpoint
  that restores (`recovery.resume`), or the fresh ones at step 0."""
  template = state_to_tree(state)
  if best is not None:
    template['early_stopping'] = best.to_tree()
  manager = recovery.checkpoint_manager(workdir, int(cfg['keep_checkpoints']))
  try:
    restart, primary = bool(cfg.get('restart')), jax.process_index() == 0
    restored, start = recovery.resume(manager, template, restart=restart, primary=primary)
  except BaseException:
    manager.close()
    raise
  if restored is None:
    return manager, state, best, 0
  if best is not None:
    best = BestEval.from_tree(restored['early_stopping'])
  return manager, tree_to_state(state, restored), best, start


def with_remat(model: Any, cfg: dict[str, Any]) -> Any:
  """The model with `config.remat` (same params): activations recomputed per unit or stage."""
  remat = cfg.get('remat', 'none')
  return model if remat == 'none' else model.clone(remat=remat)


# The static parts of recent runs (apply_fn, optimizer, schedule, wrapped step): a second run of the same
# setup in one process (a notebook, a test, a finished run rerun) reuses the compiled step.
_STEPS_CACHE: dict = {}
_STEPS_CACHE_SIZE = 4


def step_with_extra(state: Any, batch: Any, extra: Any) -> Any:
  """`train_step` with the objective's extra input (a teacher), replicated, never donated."""
  return train_step(state, batch, parallel.DATA_AXIS, extra)


def compiled_step(
  dp: Any,
  model: Any,
  params: Any,
  supports: Any,
  base_lr: float,
  accum_steps: Any,
  transfer: dict[str, Any],
  objective: Any = None,
) -> Any:
  """(host state at step 0, the train step over all devices): the static parts cached per setup."""
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
      step = dp.wrap(step_with_extra, donate=True, extra_inputs=1)
    _STEPS_CACHE[key] = (template, step)
  template, p_train = _STEPS_CACHE[key]
  return start_state(template, params), p_train


def train_iterator(setup: Setup) -> Any:
  """The run's train batches from its `start` step (`data.train_iterator`, or the objective's records)."""
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
    defer_skip_warnings=True,  # named once the progress bar is done (`bit.train`), not in its middle
  )


def evaluator(setup: Setup) -> Any:
  """`evaluate(dstate) -> result`: the student's params on the whole test split."""
  cfg, dp = setup.cfg, setup.dp
  apply_fn = models.Inference(setup.model)  # hashable, one per model: the eval step compiles once

  def evaluate(dstate) -> dict:
    # Single-process shard_map: the replicated params are already where the eval step wants them.
    single = dp.mode == 'shard_map' and jax.process_count() == 1
    params = dstate.params if single else dp.unreplicate(dstate.params)
    return evaluate_test_split(apply_fn, params, cfg, setup.info.num_classes, devices=dp.local_devices)

  return evaluate


# --- the loop's logs (`bit.train._start`) -----------------------------------------------------------------


def start_writer(setup: Setup) -> MetricsWriter:
  """The attempt's metrics.jsonl writer, once it holds the lines of a (re)start: `resumed_from_step` when
  there is a checkpoint or an earlier metrics.jsonl, the example counts when starting at step 0."""
  start, total = setup.start, setup.total
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
  return writer


def progress_bar(setup: Setup, end: int) -> Any:
  """The train progress bar from `setup.start` to `end` (shown by the primary process, after the recipe)."""
  from tqdm.auto import tqdm

  bar = tqdm(
    total=end, initial=setup.start, desc='train', unit='step', disable=not setup.primary, dynamic_ncols=True
  )
  if setup.primary:
    for line in config_lib.recipe(setup.cfg, setup.info, len(setup.dp.devices), setup.what):
      bar.write(line)
  return bar


def train_log(setup: Setup, writer: MetricsWriter, bar: Any) -> TrainLog:
  """The train lines of the loop, written to `writer` and `bar`."""
  return TrainLog(
    writer,
    bar,
    setup.dp,
    batch_size=setup.cfg['batch_size'],
    start=setup.start,
    checkpoint_dir=setup.workdir / layout.CHECKPOINT_DIR,
  )
