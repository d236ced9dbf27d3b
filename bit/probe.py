"""Linear probes on frozen features: what the pretrained representation is worth before any fine-tuning.

  x_tr, y_tr = probe.extract_features(model, params, 'cifar10', 'train', workdir=W, crop=128)
  x_te, y_te = probe.extract_features(model, params, 'cifar10', 'test', workdir=W, crop=128)
  clf, acc = probe.fit_linear_probe(x_tr, y_tr, 10, method='ridge', test_x=x_te, test_y=y_te)

Features are the pre-logits (the pooled output of the final GroupNorm+ReLU), extracted once per split and
cached in the workdir (`features/*.npz`, keyed by dataset, split, resolution and a fingerprint of the
backbone), so fitting probes or running the few-shot protocol afterwards takes seconds.

Two classifiers:
- 'ridge': closed-form L2-regularized least squares onto {-1, 1} one-hot targets, on standardized features
  with a large constant bias feature - the few-shot evaluator of big_vision (`fewshot_lsr.py`), solved
  through an eigendecomposition of X^T X (or X X^T when there are fewer points than features).
- 'logreg': softmax regression trained with optax (AdamW, cosine decay) on the same standardized features.

The few-shot protocol (`few_shot_accuracies`, `few_shot_report`) draws k examples per class with the same
sampler as few-shot training (`bit.data.few_shot_indices`) for several seeds and reports
min <- median -> max, as the official BiT README does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bit import files, models, xla
from bit.errors import ConfigError, DataError

log: logging.Logger = logging.getLogger(__name__)

METHODS = ('ridge', 'logreg')
# big_vision's few-shot defaults: the L2 strength and the constant of the bias feature.
DEFAULT_L2_REG = 2.0**10
BIAS_CONSTANT = 100.0
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3
DEFAULT_BATCH_SIZE = 64
FEATURES_DIR = 'features'
RESULT_FILE = 'probe.json'
_CACHE_VERSION = 1


# --- features --------------------------------------------------------------------------------------------


def _fingerprint(params) -> str:
  """A short hash of the backbone params (the head does not change pre-logits); cheap even for big models."""
  h = hashlib.blake2b(digest_size=8)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if "'head'" in name:
      continue
    a = np.asarray(leaf)
    h.update(name.encode() + str(a.shape).encode())
    # Large kernels: a strided sample is plenty to tell two checkpoints apart.
    h.update(np.ascontiguousarray(a.ravel()[:: max(1, a.size // 100_000)]).tobytes())
  return h.hexdigest()


def _tag(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', str(text)).strip('_')[-40:] or 'x'


def extract_features(
  model: Any,
  params: Any,
  dataset: Any,
  split: str,
  *,
  workdir: str | os.PathLike[str] | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
  crop: int | None = None,
  data_dir: str | os.PathLike[str] | None = None,
  progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Pre-logits features (N, num_features) float32 and labels (N,) int64 of every example of `split`.

  Images are preprocessed as in evaluation (resized to `crop`, default from the hyper-rule for the split's
  image size). With `workdir`, the result is cached in `workdir/features/` and reused by the next call with
  the same dataset, split, crop and backbone.
  """
  from bit import arguments, data, data_sources, hyperrule

  model = arguments.check_model(model, 'bit.extract_features')
  params = arguments.check_params(model, params, 'bit.extract_features')  # before any data is read
  records = data_sources.load_split(dataset, split, data_dir)
  if crop is None:
    _, crop = hyperrule.train_resolution(records.image_size)
  crop = int(crop)
  key = _feature_key(model, params, dataset, split, crop, data_dir, len(records))
  path = None
  if workdir is not None:
    path = _feature_path(workdir, dataset, split, crop, key)
    cached = _cached_features(path, key)
    if cached is not None:
      return cached

  batches = data.eval_iterator(
    dataset, split=split, global_batch_size=int(batch_size), crop=crop, data_dir=data_dir
  )
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=math.ceil(len(records) / int(batch_size)), desc=f'features {split}', unit='batch')
  features, labels = _pre_logits(model, params, batches, bar)
  if len(labels) != len(records):  # the policy of every reader: logged by path above, skipped, counted
    log.warning(
      '%d of the %d images of %r split %r could not be decoded and were skipped (named above).',
      len(records) - len(labels),
      len(records),
      str(dataset),
      split,
    )
  if path is not None:
    files.save_npz(path, features=features, labels=labels, key=np.array(json.dumps(key, sort_keys=True)))
  return features, labels


def _feature_key(model, params, dataset, split, crop, data_dir, size):
  """What a cached features file must match: dataset, split, crop, backbone and split size."""
  return {
    'version': _CACHE_VERSION,
    'dataset': str(dataset),
    'split': split,
    'crop': crop,
    'data_dir': None if data_dir is None else str(data_dir),
    'architecture': getattr(model, 'architecture', ''),
    'params': _fingerprint(params),
    'size': size,
  }


def _feature_path(workdir, dataset, split, crop, key):
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  name = f'{_tag(pathlib.Path(str(dataset)).name)}_{_tag(split)}_{crop}px_{digest}.npz'
  return pathlib.Path(workdir).expanduser() / FEATURES_DIR / name


def _cached_features(path, key):
  """(features, labels) from `path` when it holds features for `key`; None when absent, stale or unreadable."""
  if not path.is_file():
    return None
  try:
    with np.load(path) as z:
      if json.loads(str(z['key'])) == key:
        log.info('Using cached features %s', path)
        return z['features'], z['labels']
  except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
    # stacklevel 3: the warning points at extract_features' caller, as before this helper existed.
    warnings.warn(f'{path} is unreadable ({e}); extracting the features again.', stacklevel=3)
  return None


def _pre_logits(model, params, batches, bar):
  """Pre-logits features float32 and labels int64 of the real (masked) rows of every batch; closes `bar`."""
  inference = models.Inference(model)  # weights standardized once, not per batch
  fn = xla.jit(lambda p, x: inference(p, x, pre_logits=True))
  device_params = inference.prepare(jax.device_put(params, jax.local_devices()[0]))
  feats, labels = [], []
  try:
    for batch in batches:
      mask = np.asarray(batch['mask'], bool)
      out = np.asarray(fn(device_params, batch['image']))
      feats.append(out[mask])
      labels.append(np.asarray(batch['label'])[mask])
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  features = (
    np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, model.num_features), np.float32)
  )
  labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros((0,), np.int64)
  return features, labels


# --- classifiers -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LinearProbe:
  """A linear classifier on standardized features: logits = ((x - mean) / std) @ weights + bias."""

  weights: np.ndarray  # (D, C)
  bias: np.ndarray  # (C,)
  mean: np.ndarray  # (D,)
  std: np.ndarray  # (D,)
  method: str

  def logits(self, x: Any) -> np.ndarray:
    x = (np.asarray(x, np.float32) - self.mean) / self.std
    return x @ self.weights + self.bias

  def predict(self, x: Any) -> np.ndarray:
    """Class indices (N,)."""
    return np.argmax(self.logits(x), axis=-1)

  def accuracy(self, x: Any, y: Any) -> float:
    y = np.asarray(y)
    if len(y) == 0:
      return float('nan')
    return float(np.mean(self.predict(x) == y))


def _check_xy(x, y, num_classes, what):
  x = np.asarray(x, np.float32)
  y = np.asarray(y)
  if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
    raise DataError(f'{what}: expected features (N, D) and labels (N,), got shapes {x.shape} and {y.shape}.')
  if len(y) and (y.min() < 0 or y.max() >= num_classes):
    raise DataError(f'{what}: labels must be in [0, {num_classes}), got values in [{y.min()}, {y.max()}].')
  if not np.all(np.isfinite(x)):
    raise DataError(f'{what}: the features contain NaN or infinite values.')
  return x, y.astype(np.int64)


def _ridge(x, y, num_classes, l2_reg):
  """big_vision's closed-form least squares, in float64 on the host."""
  x = x.astype(np.float64)
  mean = x.mean(axis=0)
  std = x.std(axis=0) + 1e-5
  z = (x - mean) / std
  # A large constant feature carries the bias, so it is barely regularized.
  z = np.pad(z, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
  t = 2.0 * np.eye(num_classes)[y] - 1.0
  n, d = z.shape
  # (Z^T Z + l2 I)^-1 Z^T T, or Z^T (Z Z^T + l2 I)^-1 T with fewer points than features; both through an
  # eigendecomposition q diag(e) q^T so the inverse is q diag(1 / (e + l2)) q^T.
  if n >= d:
    eigs, q = np.linalg.eigh(z.T @ z)
    lhs, rhs = q, q.T @ (z.T @ t)
  else:
    eigs, q = np.linalg.eigh(z @ z.T)
    lhs, rhs = z.T @ q, q.T @ t
  w = (lhs / (eigs + l2_reg)[None, :]) @ rhs
  return LinearProbe(
    weights=w[:-1].astype(np.float32),
    bias=(BIAS_CONSTANT * w[-1]).astype(np.float32),
    mean=mean.astype(np.float32),
    std=std.astype(np.float32),
    method='ridge',
  )


def _logreg(x, y, num_classes, *, steps, learning_rate, weight_decay, batch_size, seed):
  """Softmax regression with AdamW on minibatches of standardized features (full batch for small sets)."""
  import optax

  mean = x.mean(axis=0)
  std = x.std(axis=0) + 1e-5
  z = jnp.asarray((x - mean) / std, jnp.float32)
  labels = jnp.asarray(y, jnp.int32)
  n, d = z.shape
  b = min(n, int(batch_size))
  rng = np.random.default_rng(seed)
  # Epoch-wise permutations, laid out as (steps, b) indices up front so the whole fit is one jitted scan.
  order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * b / n) + 1)])[: steps * b]
  index = jnp.asarray(order.reshape(steps, b))
  schedule = optax.cosine_decay_schedule(learning_rate, steps)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  params = {'w': jnp.zeros((d, num_classes), jnp.float32), 'b': jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(p, xb, yb):
    logits = xb @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def fit(params, index):
    def step(carry, idx):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p, z[idx], labels[idx])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (p, _), losses = jax.lax.scan(step, (params, tx.init(params)), index)
    return p, losses

  p, _ = fit(params, index)
  return LinearProbe(
    weights=np.asarray(p['w']),
    bias=np.asarray(p['b']),
    mean=mean.astype(np.float32),
    std=std.astype(np.float32),
    method='logreg',
  )


def fit_linear_probe(
  train_x: Any,
  train_y: Any,
  num_classes: int,
  *,
  method: str = 'ridge',
  l2_reg: float = DEFAULT_L2_REG,
  test_x: Any = None,
  test_y: Any = None,
  steps: int = 1000,
  learning_rate: float = 0.01,
  weight_decay: float = 1e-4,
  batch_size: int = 1024,
  seed: int = 0,
) -> tuple[LinearProbe, float | None]:
  """Fits a linear classifier on frozen features; returns (probe, accuracy on the test features or None).

  `method='ridge'` (default): closed-form least squares with L2 strength `l2_reg` (big_vision's 2**10).
  `method='logreg'`: softmax regression, `steps` AdamW steps (cosine-decayed `learning_rate`,
  `weight_decay`) on minibatches of `batch_size`, seeded by `seed`.
  """
  if method not in METHODS:
    raise ConfigError(f'Unknown probe method {method!r}: use one of {", ".join(METHODS)}.')
  num_classes = int(num_classes)
  x, y = _check_xy(train_x, train_y, num_classes, 'train features')
  if len(y) == 0:
    raise DataError('No training features to fit a probe on.')
  if method == 'ridge':
    if not l2_reg > 0:
      raise ConfigError(f'l2_reg must be positive, got {l2_reg!r}.')
    probe = _ridge(x, y, num_classes, float(l2_reg))
  else:
    if int(steps) < 1:
      raise ConfigError(f'steps must be a positive integer, got {steps!r}.')
    probe = _logreg(
      x,
      y,
      num_classes,
      steps=int(steps),
      learning_rate=float(learning_rate),
      weight_decay=float(weight_decay),
      batch_size=batch_size,
      seed=seed,
    )
  accuracy = None
  if test_x is not None and test_y is not None:
    tx_, ty_ = _check_xy(test_x, test_y, num_classes, 'test features')
    accuracy = probe.accuracy(tx_, ty_)
  return probe, accuracy


# --- few-shot protocol ---------------------------------------------------------------------------------------


def few_shot_accuracies(
  train_x: Any,
  train_y: Any,
  test_x: Any,
  test_y: Any,
  num_classes: int,
  *,
  shots: Any = DEFAULT_SHOTS,
  seeds: Any = DEFAULT_SEEDS,
  l2_reg: float = DEFAULT_L2_REG,
) -> dict[int, list[float]]:
  """{k: [test accuracy of a ridge probe on k examples per class, one per seed]}.

  `seeds` is a count (seeds 0..n-1) or a list. The k examples of each class are drawn by
  `bit.data.few_shot_indices`, the sampler of few-shot training. A k that some class cannot supply is skipped
  with a warning.
  """
  from bit import data

  seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
  train_y = np.asarray(train_y)
  out = {}
  for k in shots:
    accs = []
    try:
      for seed in seed_list:
        idx = data.few_shot_indices(train_y, int(k), seed, num_classes)
        _, acc = fit_linear_probe(
          train_x[idx], train_y[idx], num_classes, method='ridge', l2_reg=l2_reg, test_x=test_x, test_y=test_y
        )
        accs.append(acc)
    except DataError as e:
      warnings.warn(f'{k}-shot skipped: {e}', stacklevel=2)
      continue
    out[int(k)] = accs
  return out


def few_shot_summary(accuracies_by_k_and_seed: Any) -> list[dict[str, Any]]:
  """[{'k', 'min', 'median', 'max', 'n'}] (accuracies in [0, 1]) from {k: [accs] or {seed: acc}}."""
  rows = []
  for k in sorted(accuracies_by_k_and_seed, key=lambda v: (isinstance(v, str), v)):
    values = accuracies_by_k_and_seed[k]
    values = list(values.values()) if isinstance(values, dict) else list(values)
    if not values:
      continue
    a = np.asarray(values, np.float64)
    rows.append(
      {'k': k, 'min': float(a.min()), 'median': float(np.median(a)), 'max': float(a.max()), 'n': len(a)}
    )
  return rows


def few_shot_report(accuracies_by_k_and_seed: Any, *, ascii_arrows: bool = False) -> list[str]:
  """Rows like `  5-shot: 80.2 ← 85.8 → 88.6  (3 seeds)`: min ← median → max in percent, as the official
  README reports few-shot results. `ascii_arrows=True` writes `<-` and `->`."""
  left, right = ('<-', '->') if ascii_arrows else ('←', '→')
  rows = []
  for r in few_shot_summary(accuracies_by_k_and_seed):
    label = f'{r["k"]}-shot' if isinstance(r['k'], int) else str(r['k'])
    seeds = f'{r["n"]} seed{"s" if r["n"] != 1 else ""}'
    rows.append(
      f'{label:>8}: {100 * r["min"]:.1f} {left} {100 * r["median"]:.1f} {right} '
      f'{100 * r["max"]:.1f}  ({seeds})'
    )
  return rows


# --- the command -------------------------------------------------------------------------------------------


def _get(config, key, default=None):
  try:
    value = config.get(key, default)
  except AttributeError:
    value = getattr(config, key, default)
  return default if value is None else value


def _check_probe_config(model_name, dataset, method):
  if not model_name:
    raise ConfigError(
      'No model: set config.model (a registry name, an .npz path, or R50x1 for random features).'
    )
  if not dataset:
    raise ConfigError(
      'No dataset: set config.dataset (a TFDS name or an image folder ROOT/<split>/<class>/).'
    )
  if method not in METHODS:
    raise ConfigError(f'Unknown probe method {method!r}: use one of {", ".join(METHODS)}.')


def _num_skipped(dataset, data_dir, splits_labels):
  """How many examples of the (split, labels) pairs could not be decoded (the split's size minus the labels)."""
  from bit import data_sources

  return sum(len(data_sources.load_split(dataset, s, data_dir)) - len(y) for s, y in splits_labels)


def run_probe(
  config: Any,
  workdir: str | os.PathLike[str],
  *,
  method: str = 'ridge',
  l2_reg: float = DEFAULT_L2_REG,
  shots: Sequence[int] | None = None,
  seeds: int = DEFAULT_SEEDS,
  batch_size: int = DEFAULT_BATCH_SIZE,
  progress: bool = False,
) -> dict[str, Any]:
  """Linear probe of `config.model` on `config.dataset`; writes `workdir/probe.json` and returns the results.

  Reads the training config keys `model`, `dataset`, `train_split`, `test_split`, `data_dir`, `crop`,
  `examples_per_class` and `seed` (a ConfigDict or a dict; missing keys take their defaults). Features of
  both splits are cached in `workdir/features/`. With `shots` (e.g. [1, 5, 10, 25]) the few-shot protocol
  also runs over `seeds` seeds. The result has `top1` (probe accuracy on the test split), `method`,
  `train_size`, `test_size`, `num_features`, `crop`, and with shots `few_shot` {k: [accs]} and
  `few_shot_report` (printable rows).
  """
  from bit import checkpoints, data, data_sources, hyperrule

  model_name = _get(config, 'model')
  dataset = _get(config, 'dataset')
  _check_probe_config(model_name, dataset, method)
  train_split = _get(config, 'train_split', 'train')
  test_split = _get(config, 'test_split', 'test')
  data_dir = _get(config, 'data_dir')
  seed = int(_get(config, 'seed', 0))
  k_train = _get(config, 'examples_per_class')
  workdir = pathlib.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)

  train_records = data_sources.load_split(dataset, train_split, data_dir)
  num_classes = len(train_records.class_names)
  crop = _get(config, 'crop') or hyperrule.train_resolution(train_records.image_size)[1]
  model, params = checkpoints.load(model_name, num_classes=num_classes, seed=seed)
  common = dict(workdir=workdir, batch_size=batch_size, crop=int(crop), data_dir=data_dir, progress=progress)
  train_x, train_y = extract_features(model, params, dataset, train_split, **common)
  test_x, test_y = extract_features(model, params, dataset, test_split, **common)
  fit_x, fit_y = train_x, train_y
  if k_train:
    idx = data.few_shot_indices(train_y, int(k_train), seed, num_classes)
    fit_x, fit_y = train_x[idx], train_y[idx]
  _, acc = fit_linear_probe(
    fit_x, fit_y, num_classes, method=method, l2_reg=l2_reg, test_x=test_x, test_y=test_y, seed=seed
  )
  skipped = _num_skipped(dataset, data_dir, ((train_split, train_y), (test_split, test_y)))
  result = {
    'model': str(model_name),
    'dataset': str(dataset),
    'method': method,
    'top1': acc,
    'train_size': int(len(fit_y)),
    'test_size': int(len(test_y)),
    'num_features': int(train_x.shape[1]),
    'num_classes': num_classes,
    'crop': int(crop),
    'skipped': int(skipped),
  }
  if method == 'ridge':
    result['l2_reg'] = float(l2_reg)
  if shots:
    accs = few_shot_accuracies(
      train_x, train_y, test_x, test_y, num_classes, shots=shots, seeds=seeds, l2_reg=l2_reg
    )
    result['few_shot'] = {str(k): v for k, v in accs.items()}
    result['few_shot_report'] = few_shot_report(accs)
  files.write_json(workdir / RESULT_FILE, result, ensure_ascii=False)
  return result
