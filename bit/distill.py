"""Knowledge distillation: a small student learns a big fine-tuned teacher's function, in the training loop of
every run (`bit.train.fit` with an `Objective`), as in Beyer et al. 2022, "Knowledge distillation: A good
teacher is patient and consistent".

  bit-distill --config configs/distill.py --workdir W --config.teacher=TEACHER_WORKDIR \
      --config.student=R50x1 --config.dataset=DATASET [--config.unlabeled=FOLDER]

The recipe ("function matching"):
- Consistent: the teacher sees exactly the student's augmented view of every example (the same crop, flip and
  MixUp), because it runs inside the same jitted step on the same batch; its outputs are never precomputed.
- The loss is the KL divergence from the teacher's softmax to the student's, both at `config.temperature` T,
  multiplied by T**2 (Hinton et al. 2015: the gradients then keep their size as T changes; at the default
  T = 1 the factor is 1). `config.label_weight` w mixes in the labels' cross-entropy:
  (1 - w) * KL * T**2 + w * CE, the CE over the labeled examples of the batch only.
- Patient: long schedules (configs/distill.py gives the paper's lengths), MixUp on.

The teacher (`config.teacher`: a workdir holding `model.npz`, an official-layout .npz, or a registry name)
keeps its head, which must have the dataset's classes; it runs forward only, with its weights standardized
once (`models.standardize_kernels`), optionally in bfloat16 (`config.teacher_dtype`), and its params never
change: they are a replicated, never donated input of the step. The student (`config.student`) is a registry
name or .npz (a new zero head, as a fine-tune) or a bare architecture such as 'R50x1' (from scratch).

`config.unlabeled` adds examples without labels, for distillation only (the teacher gives their targets): a
folder holding image files at any depth (read with `bit.images`; unreadable files are logged, skipped and
counted), or a TFDS dataset name whose split `config.unlabeled_split` is read without its labels. The labeled
train split is trained on as well unless `config.include_labeled=False`. Either way the examples form one
fixed list, so the stream stays a pure function of (seed, step) and a resume is exact.

Everything else is `bit-train`'s: resume, preemption, checkpoints, evaluation of the student, metrics.jsonl,
curves, confusion matrix, and `model.npz` in the official layout. The teacher is evaluated once on the test
split (`teacher.json`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bit import arguments, files, layout, models
from bit.errors import ConfigError, DataError

log: logging.Logger = logging.getLogger(__name__)

TEACHER_FILE = 'teacher.json'
TEACHER_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
UNLABELED = -1  # the label of an unlabeled example: its one-hot label is all zeros
# Keys of a distillation config beyond bit/config.py's (whose `model` is `student` here).
KEYS = (
  'student',
  'teacher',
  'teacher_dtype',
  'temperature',
  'label_weight',
  'unlabeled',
  'unlabeled_split',
  'include_labeled',
  'epochs',
)


# --- the loss -------------------------------------------------------------------------------------------------


def kl_divergence(student_logits: Any, teacher_logits: Any, temperature: float = 1.0) -> jax.Array:
  """Mean over the batch of KL(softmax(teacher / T) || softmax(student / T)) * T**2, in float32."""
  t = float(temperature)
  teacher = teacher_logits.astype(jnp.float32) / t
  student = student_logits.astype(jnp.float32) / t
  log_p = jax.nn.log_softmax(teacher, axis=-1)
  log_q = jax.nn.log_softmax(student, axis=-1)
  return t * t * jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def labeled_cross_entropy(logits: Any, labels: Any) -> jax.Array:
  """Cross-entropy against (MixUp-mixed) one-hot labels, averaged over the label mass of the batch: unlabeled
  rows (all-zero labels) count for nothing; a batch without any label gives 0."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = labels.astype(jnp.float32)
  return -jnp.sum(labels * logp) / jnp.maximum(jnp.sum(labels), 1e-6)


@dataclasses.dataclass(frozen=True)
class DistillLoss:
  """The step's loss hook (`train_state.TrainState.loss_fn`): `(logits, labels, images, teacher_params)`.

  The teacher (an `Inference` over its standardized weights) runs on `images`, the very array the student just
  ran on, under `stop_gradient`: forward only.
  """

  teacher: models.ResNetV2
  temperature: float = 1.0
  label_weight: float = 0.0

  def teacher_logits(self, teacher_params: Any, images: Any) -> jax.Array:
    return jax.lax.stop_gradient(models.Inference(self.teacher)(teacher_params, images))

  def __call__(self, logits: Any, labels: Any, images: Any, teacher_params: Any) -> jax.Array:
    kl = kl_divergence(logits, self.teacher_logits(teacher_params, images), self.temperature)
    w = float(self.label_weight)
    if not w:
      return kl
    return (1.0 - w) * kl + w * labeled_cross_entropy(logits, labels)

  @property
  def key(self) -> Any:
    return ('distill', repr(self.teacher), float(self.temperature), float(self.label_weight))


# --- the teacher ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Teacher:
  """A loaded teacher: its model (compute dtype set), its params and those params with their kernels standardized, for inference."""

  source: str  # the file it was read from, or the registry name
  model: models.ResNetV2
  params: dict[str, Any]
  standardized: dict[str, Any]


def teacher_path(spec: Any) -> str:
  """A workdir (a folder with model.npz) -> its model.npz; anything else as it is (.npz path, registry name)."""
  spec = str(spec)
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    if not (path / layout.MODEL_FILE).is_file():
      raise ConfigError(
        f'config.teacher={spec!r} is a folder without model.npz: give a finished bit-train workdir, an '
        'official-layout .npz or a registry name (bit.list_models()).'
      )
    return str(path / layout.MODEL_FILE)
  return spec


def load_teacher(spec: Any, num_classes: int, class_names: Any = None, dtype: str = 'float32') -> Teacher:
  """The teacher of `spec`, its own head kept; ConfigError unless it has the dataset's `num_classes`."""
  from bit import checkpoints

  if not spec:
    raise ConfigError(
      'config.teacher is not set: pass config.teacher=WORKDIR (a finished bit-train run), a path to an '
      'official-layout .npz, or a registry name such as BiT-M-R152x2-ILSVRC2012 whose classes are the '
      "dataset's."
    )
  if dtype not in TEACHER_DTYPES:
    raise ConfigError(f'config.teacher_dtype={dtype!r} is not one of {sorted(TEACHER_DTYPES)}.')
  source = teacher_path(spec)
  if checkpoints._resolve(source)[0] == 'arch':
    raise ConfigError(
      f'config.teacher={spec!r} is a bare architecture: a teacher must be trained. Give a finished bit-train '
      'workdir, an official-layout .npz or a registry name.'
    )
  model, params = checkpoints.load(source, keep_head=True, dtype=TEACHER_DTYPES[dtype])
  params = arguments.check_params(model, params, f'config.teacher={spec!r}')
  if model.num_classes != int(num_classes):
    raise ConfigError(
      f'config.teacher={spec!r} ({source}) has a {model.num_classes}-class head but the dataset has '
      f'{num_classes} classes: the teacher must be fine-tuned on the same classes (bit-train on this dataset '
      'first, then distill its workdir).'
    )
  names = checkpoints.label_names(source)
  if names is not None and class_names is not None and list(names) != list(class_names):
    log.warning(
      'The teacher %s names its classes %s, the dataset %s: check that class i means the same in both.',
      source,
      _short(names),
      _short(class_names),
    )
  params = jax.tree.map(np.asarray, params)
  standardized = jax.tree.map(np.asarray, jax.device_get(models.standardize_kernels(params)))
  return Teacher(source=str(source), model=model, params=params, standardized=standardized)


def _short(names) -> str:
  names = list(names)
  return repr(names[:4] + ['...'] if len(names) > 4 else names)


def warn_if_bigger(student: Any, teacher: models.ResNetV2) -> bool:
  """Warns (and returns True) when the student is deeper or wider than the teacher: allowed, rarely meant."""
  if not isinstance(student, models.ResNetV2):
    return False
  if student.depth > teacher.depth or student.width > teacher.width:
    log.warning(
      'The student %s is %s than the teacher %s: distillation usually compresses a big model into a '
      'smaller one. Going on as asked.',
      student.architecture,
      'deeper' if student.depth > teacher.depth else 'wider',
      teacher.architecture,
    )
    return True
  return False


# --- the examples ---------------------------------------------------------------------------------------------


def _probe(path):
  from bit import images

  try:
    return images.read_header(path)
  except images.ImageDecodeError as e:
    return str(e).removeprefix(f'{path}: ')


def unlabeled_folder(root: str | os.PathLike[str]) -> Any:
  """A `data_sources.Records` of every image file below `root` (any layout), all labeled UNLABELED.

  Files are found by extension (`bit.images.EXTENSIONS`) and sorted by path; each header is read once, and a
  file that is not a readable image is logged by path, skipped and counted (as the labeled readers do).
  """
  from bit import data_sources, images

  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise DataError(
      f'config.unlabeled={str(root)!r} is not a folder; give a folder of images or a TFDS name.'
    )
  paths = sorted(
    str(p)
    for p in root.rglob('*')
    if p.suffix.lower() in images.EXTENSIONS
    and not any(part.startswith('.') for part in p.parts)
    and p.is_file()
  )
  if not paths:
    raise DataError(
      f'config.unlabeled={str(root)!r} holds no image files ({"/".join(images.EXTENSIONS)}) at any depth; '
      'point it at a folder of images.'
    )
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    probes = list(pool.map(_probe, paths))
  keep = [i for i, p in enumerate(probes) if not isinstance(p, str)]
  for i, p in enumerate(probes):
    if isinstance(p, str):
      log.warning('skipping unreadable image %s (%s)', paths[i], p)
  if not keep:
    raise DataError(f'config.unlabeled={str(root)!r}: none of its {len(paths)} image files is readable.')
  if len(keep) < len(paths):
    log.warning('%d unreadable file(s) skipped in %s', len(paths) - len(keep), root)
  sizes = np.array([probes[i][:2] for i in keep], np.int64)
  return data_sources.Records(
    name=str(root),
    split='unlabeled',
    labels=np.full(len(keep), UNLABELED, np.int64),
    payload=np.array(paths, dtype=object)[keep],
    is_path=True,
    class_names=(),
    image_size=(int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1]))),
    sizes=sizes,
    headers=np.array([probes[i][2:] for i in keep], np.int32),
  )


def unlabeled_records(spec: Any, split: str = 'train', data_dir: str | os.PathLike[str] | None = None) -> Any:
  """The unlabeled examples of `config.unlabeled`: a folder of images, or a TFDS split read without labels."""
  from bit import data_sources

  spec = str(spec)
  if os.path.isdir(os.path.expanduser(spec)) or spec.startswith(('/', './', '../', '~')):
    return unlabeled_folder(spec)
  records = data_sources.load_split(spec, split, data_dir)
  if records.streaming:
    raise ConfigError(
      f'config.unlabeled={spec!r} split {split!r} is larger than the memory budget and would be streamed; '
      'distillation reads unlabeled examples by index: give a slice (e.g. config.unlabeled_split='
      '"train[:10%]") or raise BIT_MAX_MEMORY_GB.'
    )
  return dataclasses.replace(records, labels=np.full(len(records), UNLABELED, np.int64), class_names=())


def _as_bytes(records):
  """A folder's Records with the files read into memory (to sit in one list with a TFDS split's bytes)."""
  payload = np.empty(len(records), dtype=object)
  payload[:] = [pathlib.Path(p).read_bytes() for p in records.payload]
  return dataclasses.replace(records, payload=payload, is_path=False)


def combine(labeled: Any, unlabeled: Any) -> Any:
  """One Records of the labeled examples (may be None) followed by the unlabeled ones (may be None)."""
  parts = [r for r in (labeled, unlabeled) if r is not None]
  if len(parts) == 1:
    return parts[0]
  if labeled.is_path != unlabeled.is_path:
    labeled, unlabeled = (r if not r.is_path else _as_bytes(r) for r in (labeled, unlabeled))
  sizes = headers = None
  if labeled.sizes is not None and unlabeled.sizes is not None:
    sizes = np.concatenate([labeled.sizes, unlabeled.sizes])
  if labeled.headers is not None and unlabeled.headers is not None:
    headers = np.concatenate([labeled.headers, unlabeled.headers])
  payload = np.empty(len(labeled) + len(unlabeled), dtype=object)
  payload[: len(labeled)] = list(labeled.payload)
  payload[len(labeled) :] = list(unlabeled.payload)
  return dataclasses.replace(
    labeled,
    name=f'{labeled.name} + {unlabeled.name}',
    split=f'{labeled.split} + unlabeled',
    labels=np.concatenate([labeled.labels, unlabeled.labels]),
    payload=payload,
    sizes=sizes,
    headers=headers,
  )


# --- the run --------------------------------------------------------------------------------------------------


def epochs_schedule(epochs: float, num_examples: int, batch_size: int) -> tuple[int, ...]:
  """[warmup, decay1, decay2, decay3, total] for `epochs` passes over `num_examples`: the hyper-rule's shape
  (warmup 1/5 of the first decay, decays at 30/60/90%) stretched to the length."""
  total = max(10, math.ceil(float(epochs) * int(num_examples) / int(batch_size)))
  d1, d2, d3 = (round(total * f) for f in (0.3, 0.6, 0.9))
  return (max(1, d1 // 5), d1, d2, d3, total)


def check_config(config: Any) -> None:
  """The distillation keys, before any data or model is touched."""
  missing = [k for k in KEYS if k not in config]
  if missing:
    raise ConfigError(
      f'this config has no {", ".join("config." + k for k in missing)}: run bit-distill with '
      'configs/distill.py (or a config built on it).'
    )
  if not config.teacher:
    load_teacher(None, 0)  # the error that names the key
  t = config.temperature
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
    raise ConfigError(f"config.temperature must be a positive number (1 is the paper's default), got {t!r}.")
  w = config.label_weight
  if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
    raise ConfigError(f'config.label_weight must be a number in [0, 1] (0: the teacher alone), got {w!r}.')
  if config.teacher_dtype not in TEACHER_DTYPES:
    raise ConfigError(
      f'config.teacher_dtype={config.teacher_dtype!r} is not one of {sorted(TEACHER_DTYPES)}.'
    )
  if not config.include_labeled and not config.unlabeled:
    raise ConfigError(
      'config.include_labeled=False needs examples to distill on: set config.unlabeled=FOLDER (or a TFDS '
      'name), or drop include_labeled=False.'
    )
  if config.schedule is None and not (config.epochs and float(config.epochs) > 0):
    raise ConfigError(f'set config.schedule or a positive config.epochs, got epochs={config.epochs!r}.')


def train_config(config: Any, schedule: Any) -> Any:
  """The training config (bit/config.py's keys) that `train.fit` runs: `model` is the student."""
  import ml_collections

  d = config.to_dict()
  d['model'] = d['student']
  d['schedule'] = tuple(schedule)
  return ml_collections.ConfigDict(d)


def distill(config: Any, workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Distills `config.teacher` into `config.student` on `config.dataset` (+ `config.unlabeled`) in `workdir`.

  Returns the student's final metrics (those of `train.train_and_evaluate`) plus `teacher_top1`, the teacher's
  top-1 on the same test split. See the module docstring; configs/distill.py for the keys.
  """
  from bit import data, train, train_setup

  check_config(config)
  info = train_setup.dataset_info(config)
  teacher = load_teacher(config.teacher, info.num_classes, info.class_names, config.teacher_dtype)
  labeled = None
  if config.include_labeled:
    labeled = data._train_records(
      config.dataset, config.train_split, config.data_dir, config.examples_per_class, config.seed
    )
    if labeled.streaming:
      raise ConfigError(
        f'config.dataset={config.dataset!r} split {config.train_split!r} is streamed (above the memory '
        'budget); distillation reads its examples by index: raise BIT_MAX_MEMORY_GB or train on a slice.'
      )
  unlabeled = None
  if config.unlabeled:
    unlabeled = unlabeled_records(config.unlabeled, config.unlabeled_split, config.data_dir)
  records = combine(labeled, unlabeled)
  log.info(
    'distilling %s into %s on %d examples (%d labeled, %d unlabeled)',
    teacher.source,
    config.student,
    len(records),
    0 if labeled is None else len(labeled),
    0 if unlabeled is None else len(unlabeled),
  )
  schedule = config.schedule
  if schedule is None:
    schedule = epochs_schedule(config.epochs, len(records), config.batch_size)
  loss = DistillLoss(teacher.model, float(config.temperature), float(config.label_weight))
  objective = train.Objective(
    loss_fn=loss,
    extra=teacher.standardized,
    key=loss.key,
    train_records=records,
    check_model=lambda model, params: warn_if_bigger(model, teacher.model),
  )
  result = train.fit(train_config(config, schedule), workdir, objective)
  teacher_eval = evaluate_teacher(teacher, result.config, workdir, info)
  return {**result.metrics, 'teacher_top1': teacher_eval['top1']}


def evaluate_teacher(
  teacher: Teacher, cfg: dict[str, Any], workdir: str | os.PathLike[str], info: Any
) -> dict[str, Any]:
  """The teacher on the run's test split, as the student is evaluated; kept in WORKDIR/teacher.json (a rerun
  with the same teacher file reads it back)."""
  from bit import evaluation

  path = pathlib.Path(workdir).expanduser() / TEACHER_FILE
  if path.is_file():
    try:
      old = json.loads(path.read_text())
      if old.get('source') == teacher.source and old.get('split') == cfg['test_split']:
        return old
    except (OSError, ValueError):
      pass
  apply_fn = models.Inference(teacher.model.clone(dtype=jnp.float32))
  result = evaluation.evaluate_test_split(apply_fn, teacher.params, cfg, info.num_classes)
  out = {
    'source': teacher.source,
    'split': cfg['test_split'],
    'architecture': teacher.model.architecture,
    'top1': float(result['top1']),
    'top5': float(result['top5']),
    'num_examples': int(result['count']),
  }
  if jax.process_index() == 0:
    files.write_json(path, out, sort_keys=True)
  return out
