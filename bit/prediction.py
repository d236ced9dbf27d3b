"""Predictions: class probabilities for image arrays (`predict`) and for image files by name (`predict_files`).

  probs = bit.predict(model, params, images)              # (N, C) softmax probabilities
  probs, idx = bit.predict(model, params, images, top=3)  # the 3 best classes of each image

Image files get the preprocessing of evaluation (`bit.data.eval_iterator`): decoded by the one decoder of
every reader (`bit.images`: EXIF orientation applied, grayscale/palette/CMYK/16-bit to 8-bit RGB, alpha
dropped, the first frame of a GIF), resized straight to `size` x `size` with bilinear interpolation (no
antialiasing, like `tf.image.resize`), values to [-1, 1].
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import warnings
from typing import Any

import jax
import numpy as np

from bit import models, xla
from bit.errors import BitError

log = logging.getLogger(__name__)

DEFAULT_SIZE = 224
DEFAULT_BATCH_SIZE = 32
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')  # bit.images.EXTENSIONS


@functools.lru_cache(maxsize=8)
def _probs_fn(model):
  # One compiled function per model (and per batch shape): repeated calls do not retrace. Takes the params
  # prepared by models.Inference (weights standardized once per predict call, not per batch).
  inference = models.Inference(model)
  return xla.jit(lambda prepared, images: jax.nn.softmax(inference(prepared, images), axis=-1))


def _to_model_range(images) -> np.ndarray:
  """uint8 0..255 -> float32 [-1, 1]; floats are checked to already be in [-1, 1]."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(x.dtype, np.floating):
    raise BitError(f'Images must be uint8 (0..255) or floats in [-1, 1], got dtype {x.dtype}.')
  x = x.astype(np.float32)
  lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
  if lo < -1.01 or hi > 1.01:
    raise BitError(
      f"Float images must be in [-1, 1] (BiT's input range), got values in [{lo:.3g}, {hi:.3g}]: pass uint8 "
      'pixels (0..255) or scale them with x / 127.5 - 1.'
    )
  return x


def _bucket(n: int, batch_size: int) -> int:
  """The padded batch size for n images: a power of two up to batch_size, so few shapes are ever compiled."""
  size = 1
  while size < min(n, batch_size):
    size *= 2
  return min(size, batch_size)


def predict(model, params, images, *, top: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
  """Class probabilities for `images`.

  `images`: NHWC RGB, either uint8 pixels 0..255 or float32 in [-1, 1] (BiT's input range; other floats are
  refused), at least 32x32; a single HWC image is accepted too. Returns float32 softmax probabilities of
  shape (N, C) ((C,) for a single image). With `top=k`: a tuple (probabilities, class indices), each (N, k),
  best first.
  """
  x = _to_model_range(images)
  single = x.ndim == 3
  if single:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != 3:
    raise BitError(f'Images must be NHWC with 3 channels (or one HWC image), got shape {x.shape}.')
  if int(batch_size) < 1:
    raise BitError(f'batch_size must be a positive integer, got {batch_size!r}.')
  fn = _probs_fn(model)
  prepared = models.Inference(model).prepare(params)
  out = []
  for start in range(0, len(x), batch_size):
    chunk = x[start : start + batch_size]
    pad = _bucket(len(chunk), batch_size) - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
    out.append(np.asarray(fn(prepared, chunk))[: len(chunk) - pad])
  probs = np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)
  if top is not None:
    k = max(1, min(int(top), probs.shape[-1]))
    idx = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
    result = (np.take_along_axis(probs, idx, axis=-1), idx)
    return tuple(r[0] for r in result) if single else result
  return probs[0] if single else probs


def load_image(path, size: int) -> np.ndarray:
  """An image file as float32 (size, size, 3) in [-1, 1], preprocessed as in evaluation (the same decoder,
  `bit.images`: EXIF orientation applied, every mode to 8-bit RGB, the same DCT downscale for `size`).

  Raises BitError naming the file when it is missing or not a readable image.
  """
  from bit import images

  rgb = images.decode(pathlib.Path(path), int(size))
  return resize_bilinear(rgb.astype(np.float32), size) / 127.5 - 1.0


def _axis_weights(n_in: int, n_out: int):
  # Half-pixel centres, edge-clamped: the sampling of tf.image.resize(method='bilinear', antialias=False).
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0.0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes an (h, w, c) float image to (size, size, c) as the evaluation pipeline does (no antialiasing)."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  y0, y1, wy = _axis_weights(h, size)
  x0, x1, wx = _axis_weights(w, size)
  rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
  return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def expand_paths(paths) -> list[pathlib.Path]:
  """Paths as given, with each folder replaced by the image files directly in it (sorted)."""
  out = []
  for p in paths:
    p = pathlib.Path(os.path.expanduser(str(p)))
    if p.is_dir():
      files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
      if not files:
        warnings.warn(f'{p}: a folder with no image files ({", ".join(IMAGE_SUFFIXES)}).', stacklevel=2)
      out.extend(files)
    else:
      out.append(p)
  return out


def predict_files(
  model,
  params,
  paths,
  class_names=None,
  *,
  top: int = 3,
  size: int | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[dict]:
  """Predicts the `top` classes of each image file, by name.

  `paths` may include folders (their image files are used). `size` is the side the images are resized to:
  use the model's evaluation resolution (a workdir's `crop`; default 224). Returns one dict per file, in
  order: `{'path', 'predictions': [{'label', 'index', 'probability'}, ...]}` best first, or, for a file that
  is missing or not an image, `{'path', 'error'}` (with a warning); the other files are still predicted.
  """
  size = int(size or DEFAULT_SIZE)
  if size < 32:
    raise BitError(f'size must be at least 32 pixels, got {size}.')
  if class_names is not None and len(class_names) != model.num_classes:
    raise BitError(
      f'{len(class_names)} class names for a model with {model.num_classes} classes: give the labels file of '
      "this model (a workdir's labels.txt)."
    )
  files = expand_paths(paths)
  results: list[dict] = []
  for start in range(0, len(files), batch_size):
    chunk = files[start : start + batch_size]
    images, slots = [], []
    for path in chunk:
      try:
        images.append(load_image(path, size))
        slots.append(len(results))
        results.append({'path': str(path)})
      except BitError as e:
        warnings.warn(f'{e} Skipped; the other files are still predicted.', stacklevel=2)
        results.append({'path': str(path), 'error': str(e)})
    if not images:
      continue
    probs, idx = predict(model, params, np.stack(images), top=top, batch_size=batch_size)
    for slot, p_row, i_row in zip(slots, probs, idx, strict=True):
      results[slot]['predictions'] = [
        {
          'label': class_names[i] if class_names is not None else str(int(i)),
          'index': int(i),
          'probability': float(p),
        }
        for p, i in zip(p_row, i_row, strict=True)
      ]
  return results


def format_results(results: list[dict]) -> str:
  """Human-readable lines: `path: name (87.3%), name (5.1%), ...` or `path: error: ...`."""
  lines = []
  for r in results:
    if 'error' in r:
      lines.append(f'{r["path"]}: error: {r["error"]}')
    else:
      preds = ', '.join(f'{p["label"]} ({100 * p["probability"]:.1f}%)' for p in r['predictions'])
      lines.append(f'{r["path"]}: {preds}')
  return '\n'.join(lines)


def load_for_prediction(*, workdir=None, model=None) -> tuple[Any, Any, list[str] | None, int]:
  """(model, params, class_names, size) for `bit-predict`: a training workdir or a checkpoint with its head.

  `workdir`: its model.npz, labels.txt and the crop of its config.json. `model`: a registry name (its head
  kept, its labels file downloaded and cached, its resolution) or a local .npz (labels.txt next to it).
  """
  from bit import checkpoints

  if (workdir is None) == (model is None):
    raise BitError(
      'Give either --workdir (a bit-train run) or --model (e.g. BiT-M-R50x1-ILSVRC2012), not both.'
    )
  if workdir is not None:
    from bit import evaluation

    config, net, params, names = evaluation.read_workdir(workdir)
    return net, params, names, int(config.get('crop') or DEFAULT_SIZE)
  net, params = checkpoints.load(model, keep_head=True)
  names = checkpoints.label_names(model)
  try:  # a registry checkpoint knows the resolution it was trained at
    size = checkpoints.get_pretrained_cfg(str(model)).resolution or DEFAULT_SIZE
  except BitError:
    size = DEFAULT_SIZE
  return net, params, names, int(size)
