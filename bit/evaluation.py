"""Evaluation over a whole split: top-1, top-5, per-class accuracy and the confusion matrix.

  result = bit.evaluate(model, params, 'cifar10', split='test', crop=128)
  result['top1'], result['top5'], result['per_class_accuracy'], result['confusion']

Every example of the split counts exactly once: `bit.data.eval_iterator` pads the last batch and marks the
padding with mask False, and the batch shape never changes, so the jitted step compiles once.
`evaluate_batches` is the same computation over any iterable of batches (the training loop can reuse it);
`write_report` writes the confusion matrix as CSV and PNG into a workdir.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bit import files, layout, models, parallel, xla
from bit.errors import BitError, DataError
from bit.types import EvalResult, Params, PathLike

log: logging.Logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64


@functools.lru_cache(maxsize=8)
def _step(apply_fn: Callable, k: int):
  """The jitted per-batch computation for one apply function (cached so repeated evals do not retrace)."""

  @xla.jit
  def step(params, images, labels):
    logits = apply_fn(params, images).astype(jnp.float32)
    _, top = jax.lax.top_k(logits, k)
    hit = jnp.any(top == labels[:, None], axis=-1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return top[:, 0], hit, nll

  return step


def _pad(batch: dict, size: int) -> dict:
  """Pads a short batch to `size` rows with zero images and mask False, so the step keeps one shape."""
  rows = len(batch['label'])
  if rows == size:
    return batch
  if rows > size:
    raise DataError(
      f'An eval batch has {rows} rows, more than the first batch ({size}): batches must not grow.'
    )
  pad = size - rows
  return {
    'image': np.concatenate(
      [batch['image'], np.zeros((pad,) + batch['image'].shape[1:], batch['image'].dtype)]
    ),
    'label': np.concatenate([batch['label'], np.zeros(pad, batch['label'].dtype)]),
    'mask': np.concatenate([batch['mask'], np.zeros(pad, bool)]),
  }


def _placer(devices, batch_size: int):
  """Returns (put_params, put_batch): shard batches over `devices` when they divide the batch, else one device."""
  devices = list(devices) if devices is not None else jax.local_devices()
  if len(devices) > 1 and batch_size % len(devices) == 0:
    mesh = parallel.data_mesh(devices)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA_AXIS))
    return (lambda p: jax.device_put(p, replicated)), (lambda x: jax.device_put(x, split))
  one = devices[0]
  return (lambda p: jax.device_put(p, one)), (lambda x: jax.device_put(x, one))


def evaluate_batches(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  params: Any,
  batches: Iterable[dict[str, Any]],
  num_classes: int,
  *,
  devices: Any = None,
  progress: Any = None,
) -> dict[str, Any]:
  """Evaluates `apply_fn(params, images) -> logits` over `batches` and returns the metrics of `evaluate`.

  `apply_fn` is a plain function or a `models.Inference`, whose `prepare` (the weights standardized) then
  runs once per evaluation instead of at every batch; a hashable one (as `Inference` is) compiles once.

  Each batch is `{'image': (B, H, W, 3), 'label': int (B,), 'mask': bool (B,)}` ('mask' optional: all
  valid). Rows with mask False are ignored; a batch shorter than the first is padded to its size so the
  step never recompiles. Batches are split over `devices` (default: all local devices) when their number
  divides the batch size. `progress` may be a tqdm-like object with `update(n)`.
  """
  k = min(5, int(num_classes))
  step = _step(apply_fn, k)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  hits5 = 0
  loss_sum = 0.0
  size = None
  put_params = put = None
  device_params = None
  for batch in batches:
    batch = dict(batch)
    labels = np.asarray(batch['label'])
    if labels.ndim != 1:
      raise DataError(
        f'Eval labels must be class indices of shape (B,), got shape {labels.shape} (one-hot?).'
      )
    batch['label'] = labels.astype(np.int32)
    batch['mask'] = np.asarray(batch.get('mask', np.ones(len(labels), bool)), bool)
    if size is None:
      size = len(labels)
      put_params, put = _placer(devices, size)
      device_params = put_params(params)
      if isinstance(apply_fn, models.Inference):
        device_params = apply_fn.prepare(device_params)
    batch = _pad(batch, size)
    mask = batch['mask']
    if mask.any() and batch['label'][mask].max() >= num_classes:
      raise DataError(
        f"An eval label ({batch['label'][mask].max()}) is outside the model's {num_classes} classes: "
        'evaluate a model trained on this dataset, or pass the right num_classes.'
      )
    pred, hit, nll = jax.device_get(step(device_params, put(np.asarray(batch['image'])), put(batch['label'])))
    np.add.at(confusion, (batch['label'][mask], pred[mask]), 1)
    hits5 += int(hit[mask].sum())
    loss_sum += float(nll[mask].astype(np.float64).sum())
    if progress is not None:
      progress.update(1)
  return metrics_from_counts(confusion, hits5, loss_sum)


# The keys of an evaluation result (`metrics_from_counts`): its scalars, then its per-class arrays. Early
# stopping checkpoints these; `summary` keeps the scalars (and the split and crop a report adds).
SCALAR_KEYS = ('top1', 'top5', 'loss', 'count', 'mean_per_class_accuracy')
ARRAY_KEYS = ('per_class_accuracy', 'class_counts', 'confusion')
RESULT_KEYS = SCALAR_KEYS + ARRAY_KEYS


def empty_result(num_classes: int) -> dict[str, Any]:
  """Zeros in the shapes and dtypes of a result: what a checkpointed result is restored into."""
  return {
    **{k: np.float64(0) for k in SCALAR_KEYS},
    'count': np.int64(0),
    'per_class_accuracy': np.zeros(num_classes, np.float64),
    'class_counts': np.zeros(num_classes, np.int64),
    'confusion': np.zeros((num_classes, num_classes), np.int64),
  }


def eval_line(result: Mapping[str, Any]) -> dict[str, Any]:
  """The metrics.jsonl eval line of a result (`loss` as `eval_loss`, `count` as `num_examples`)."""
  return {
    'top1': float(result['top1']),
    'top5': float(result['top5']),
    'eval_loss': float(result['loss']),
    'mean_per_class_accuracy': float(result['mean_per_class_accuracy']),
    'num_examples': int(result['count']),
  }


def metrics_from_counts(confusion: np.ndarray, hits5: int, loss_sum: float) -> dict[str, Any]:
  """top1, top5, loss, count, per-class and mean per-class accuracy from a confusion matrix and counts."""
  count = int(confusion.sum())
  class_counts = confusion.sum(axis=1)
  correct = np.diag(confusion)
  with np.errstate(invalid='ignore', divide='ignore'):
    per_class = np.where(class_counts > 0, correct / np.maximum(class_counts, 1), np.nan)
  present = class_counts > 0
  return {
    'top1': float(correct.sum() / count) if count else float('nan'),
    'top5': float(hits5 / count) if count else float('nan'),
    'loss': float(loss_sum / count) if count else float('nan'),
    'count': count,
    # The mean over the classes present: the headline metric of unbalanced sets such as pets or flowers.
    'mean_per_class_accuracy': float(per_class[present].mean()) if present.any() else float('nan'),
    'per_class_accuracy': per_class,
    'class_counts': class_counts,
    'confusion': confusion,
  }


def sum_over_processes(result: dict[str, Any]) -> dict[str, Any]:
  """Combines the per-process results of a multi-process evaluation (each process saw its own examples)."""
  from jax.experimental import multihost_utils

  count = int(result['count'])
  local = {
    'confusion': np.asarray(result['confusion'], np.int32),
    'hits5': np.int32(round(float(result['top5']) * count) if count else 0),
    'loss_sum': np.float32(float(result['loss']) * count if count else 0.0),
  }
  gathered = multihost_utils.process_allgather(local)
  confusion = np.asarray(gathered['confusion']).sum(axis=0).astype(np.int64)
  hits5, loss_sum = int(np.sum(gathered['hits5'])), float(np.sum(gathered['loss_sum'], dtype=np.float64))
  return metrics_from_counts(confusion, hits5, loss_sum)  # the same metrics as one process


def evaluate_test_split(
  apply_fn: Any, params: Any, cfg: dict[str, Any], num_classes: int, *, devices: Any = None
) -> dict[str, Any]:
  """The whole test split of a resolved config through `evaluate_batches` (the same per-batch step
  as bit-eval), each process its slice, the counts summed over processes."""
  from bit import data

  batches = data.eval_iterator(
    cfg['dataset'],
    split=cfg['test_split'],
    global_batch_size=cfg['batch_size'] // cfg['accum_steps'],
    crop=cfg['crop'],
    data_dir=cfg['data_dir'],
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  result = evaluate_batches(apply_fn, params, batches, num_classes, devices=devices)
  result = sum_over_processes(result) if jax.process_count() > 1 else result
  # Every eval_<split>.json says how many files did not decode (0 when none), as bit-eval's does.
  result['skipped'] = _skipped(cfg['dataset'], cfg['test_split'], cfg['data_dir'], result['count'])
  return result


def _skipped(dataset, split, data_dir, count) -> int:
  """The files of a split that were not evaluated: those that did not decode and those not images at all."""
  from bit import data_sources

  records = data_sources.load_split(dataset, split, data_dir)
  return int(len(records) - count + len(records.unreadable))


def evaluate(
  model: models.ResNetV2,
  params: Params,
  dataset: PathLike,
  *,
  split: str = 'test',
  batch_size: int = DEFAULT_BATCH_SIZE,
  crop: int | None = None,
  resize: int | None = None,
  center_crop: bool = False,
  num_classes: int | None = None,
  data_dir: PathLike | None = None,
  devices: Sequence[Any] | None = None,
  progress: bool = False,
) -> EvalResult:
  """Evaluates `model` with `params` on every example of `split` of `dataset` (TFDS name or image folder).

  Images are resized to `crop` x `crop` (BiT's evaluation; with `center_crop=True`, to `resize` then the
  central crop). `crop` defaults to the size the model was trained at (`model.input_size`, which `bit.load`
  sets from the registry or the run's config.json), else to the project's training crop for the split's
  image size (`hyperrule.train_resolution`). `num_classes` defaults to the model's.

  Returns a dict: `top1`, `top5`, `loss` (mean cross-entropy), `count` (the examples evaluated), `skipped`
  (files that did not decode: logged by path and left out, as in training),
  `mean_per_class_accuracy`, `per_class_accuracy` (float array, NaN for a class with no examples),
  `class_counts`, `confusion` (int array [true, predicted]), `class_names`, `split`, `crop`.
  """
  from bit import arguments, data, data_sources, hyperrule

  model = arguments.check_model(model, 'bit.evaluate')
  params = arguments.check_params(model, params, 'bit.evaluate')
  dataset = arguments.check_dataset(dataset, 'bit.evaluate')
  crop = arguments.check_size(crop, 'crop', 'bit.evaluate')
  if not isinstance(split, str):
    raise DataError(f"bit.evaluate: split= must be a split name such as 'test', got {split!r}.")
  num_classes = int(num_classes if num_classes is not None else model.num_classes)
  records = data_sources.load_split(dataset, split, data_dir)
  if len(records.class_names) > num_classes:
    raise DataError(
      f'{dataset!r} has {len(records.class_names)} classes but the model has {num_classes} outputs: '
      'evaluate a model fine-tuned on this dataset (e.g. WORKDIR/model.npz).'
    )
  if crop is None:
    crop = model.input_size or hyperrule.train_resolution(records.image_size)[1]
  if int(batch_size) < 1:
    raise BitError(f'batch_size must be a positive integer, got {batch_size!r}.')
  batches = data.eval_iterator(
    dataset,
    split=split,
    global_batch_size=int(batch_size),
    crop=int(crop),
    resize=resize,
    data_dir=data_dir,
    center_crop=center_crop,
  )
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=math.ceil(len(records) / int(batch_size)), desc=f'eval {split}', unit='batch')
  try:
    result = evaluate_batches(
      models.Inference(model), params, batches, num_classes, devices=devices, progress=bar
    )
  finally:
    if bar is not None:
      bar.close()
  skipped = len(records) - result['count'] + len(records.unreadable)  # also the files that are not images
  if skipped:  # the policy of every reader (training too): logged by path above, skipped, counted
    log.warning(
      '%d of the %d images of %r split %r could not be decoded and were skipped (named above).',
      skipped,
      len(records) + len(records.unreadable),
      str(dataset),
      split,
    )
  names = list(records.class_names) + [str(i) for i in range(len(records.class_names), num_classes)]
  result.update(class_names=names, split=split, crop=int(crop), skipped=int(skipped))
  return result


def confusion_csv(result: Mapping[str, Any], class_names: Any) -> str:
  """The CSV text: one row per true class with its name, example count, accuracy and predicted counts."""
  m = np.asarray(result['confusion'])
  names = list(class_names) if class_names is not None else [str(i) for i in range(len(m))]
  if len(names) != len(m):
    raise BitError(
      f'{len(names)} class names for a {len(m)}-class confusion matrix: pass one name per class.'
    )
  out = io.StringIO()
  w = csv.writer(out, lineterminator='\n')
  w.writerow(['index', 'class', 'examples', 'accuracy'] + [f'pred:{n}' for n in names])
  for i, row in enumerate(m):
    acc = result['per_class_accuracy'][i]
    w.writerow([i, names[i], int(row.sum()), '' if np.isnan(acc) else f'{acc:.6f}'] + [int(x) for x in row])
  return out.getvalue()


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
  """The JSON-friendly scalars of a result (no arrays)."""
  keep = (*SCALAR_KEYS, 'skipped', 'split', 'crop')
  return {k: result[k] for k in keep if k in result}


def write_report(
  result: Mapping[str, Any],
  workdir: str | os.PathLike[str],
  class_names: Any = None,
  split: str | None = None,
) -> dict[str, pathlib.Path]:
  """Writes `confusion_<split>.csv`, `confusion_<split>.png` and `eval_<split>.json` into `workdir`, atomically.

  Returns {'csv': path, 'png': path, 'json': path}.
  """
  from bit import plots

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  split = split or result.get('split', 'test')
  names = list(class_names) if class_names is not None else result.get('class_names')
  paths = layout.report_files(workdir, split)
  files.write_text(paths['csv'], confusion_csv(result, names))
  title = f'Confusion matrix, split {split!r} ({result["count"]} examples, top-1 {100 * result["top1"]:.1f}%)'
  plots.plot_confusion(result['confusion'], names, paths['png'], title=title)
  per_class = {
    (names[i] if names else str(i)): (None if np.isnan(a) else float(a))
    for i, a in enumerate(result['per_class_accuracy'])
  }
  files.write_text(
    paths['json'], json.dumps({**summary(result), 'per_class_accuracy': per_class}, indent=2) + '\n'
  )
  return paths


def format_result(result: Mapping[str, Any], *, max_classes: int = 100) -> str:
  """A readable summary: top-1, top-5 and the per-class accuracy table (the worst classes when there are many)."""
  lines = [
    f'split {result.get("split", "?")!r}: {result["count"]} examples',
    f'top-1 {100 * result["top1"]:.2f}%   top-5 {100 * result["top5"]:.2f}%   '
    f'mean per-class {100 * result["mean_per_class_accuracy"]:.2f}%   loss {result["loss"]:.4f}',
  ]
  if result.get('skipped'):
    lines.insert(1, f'{result["skipped"]} image(s) skipped: they could not be decoded (named in the log)')
  names = result.get('class_names') or [str(i) for i in range(len(result['per_class_accuracy']))]
  order = list(range(len(names)))
  if len(order) > max_classes:
    order = sorted(order, key=lambda i: np.nan_to_num(result['per_class_accuracy'][i], nan=2.0))[:max_classes]
    lines.append(f'per-class accuracy (the {max_classes} worst of {len(names)} classes):')
  else:
    lines.append('per-class accuracy:')
  width = min(max(len(names[i]) for i in order), 40) if order else 0
  for i in order:
    acc = result['per_class_accuracy'][i]
    shown = '   n/a' if np.isnan(acc) else f'{100 * acc:5.1f}%'
    lines.append(f'  {names[i][:40]:<{width}}  {shown}  ({int(result["class_counts"][i])} examples)')
  return '\n'.join(lines)
