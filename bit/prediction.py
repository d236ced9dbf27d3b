"""Predictions: class probabilities for images in any form (`predict`), the exact eval transform (`preprocess`),
and the top classes of image files by name (`predict_files`, what bit-predict prints).

  probs = bit.predict(model, params, 'photos/')             # (N, C) softmax probabilities, files sorted by name
  probs, idx = bit.predict(model, params, images, top=3)    # the 3 best classes of each image
  x = bit.preprocess(['a.jpg', pil_image], 128)             # float32 (2, 128, 128, 3) in [-1, 1]

What both take (`images=`): a path to an image file or a folder (its image files, sorted; subfolders are not
searched), a PIL image of any mode, an NHWC or HWC array (uint8 0..255 or floats in [-1, 1]), or a list of
those. Image files get the preprocessing of evaluation (`bit.data.eval_iterator`): decoded by the one decoder
of every reader (`bit.images`: EXIF orientation applied, grayscale/palette/CMYK/16-bit to 8-bit RGB, alpha
dropped, the first frame of a GIF), resized straight to `size` x `size` with bilinear interpolation (no
antialiasing, like `tf.image.resize`), values to [-1, 1]. A PIL image is taken as already decoded (its EXIF
orientation applied); arrays are resized the same way when their side is not `size`.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import jax
import numpy as np

from bit import arguments, models, xla
from bit.errors import BitError, DataError
from bit.images import EXTENSIONS, to_unit_range
from bit.types import FloatArray, Images, IntArray, Params, PathLike

log: logging.Logger = logging.getLogger(__name__)

DEFAULT_SIZE = 224
DEFAULT_BATCH_SIZE = 32
PROGRESS_MIN = 128  # inputs of more images than this get a progress bar (progress=None)
IMAGE_SUFFIXES = EXTENSIONS  # the one list, bit.images'


@functools.lru_cache(maxsize=8)
def _probs_fn(model):
  # One compiled function per model (and per batch shape): repeated calls do not retrace. Takes the params
  # prepared by models.Inference (weights standardized once per predict call, not per batch).
  inference = models.Inference(model)
  return xla.jit(lambda prepared, images: jax.nn.softmax(inference(prepared, images), axis=-1))


def _to_model_range(images, what: str = 'images=') -> np.ndarray:
  """uint8 0..255 -> float32 [-1, 1]; floats are checked to already be in [-1, 1]."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return to_unit_range(x.astype(np.float32))
  if not np.issubdtype(x.dtype, np.floating):
    raise DataError(f'{what} must be uint8 (0..255) or floats in [-1, 1], got dtype {x.dtype}.')
  x = x.astype(np.float32)
  lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
  if lo < -1.01 or hi > 1.01:
    raise DataError(
      f"{what} floats must be in [-1, 1] (BiT's input range), got values in [{lo:.3g}, {hi:.3g}]: pass uint8 "
      'pixels (0..255) or scale them with x / 127.5 - 1.'
    )
  return x


def _bucket(n: int, batch_size: int) -> int:
  """The padded batch size for n images: a power of two up to batch_size, so few shapes are ever compiled."""
  size = 1
  while size < min(n, batch_size):
    size *= 2
  return min(size, batch_size)


def _is_pil(x) -> bool:
  return type(x).__module__.startswith('PIL.') and hasattr(x, 'mode') and hasattr(x, 'getexif')


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype') and not _is_pil(x)


class _Inputs:
  """What `images=` holds, as a sequence of items (file paths, PIL images, HWC arrays) or one NHWC array."""

  def __init__(self, images):
    self.array = None  # an NHWC array, kept whole (sliced per batch)
    self.items: list = []
    self.single = False
    if _is_array(images):
      x = np.asarray(images)
      if x.ndim == 3:
        self.single, x = True, x[None]
      if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f'images= must be NHWC with 3 channels (or one HWC image), got shape {x.shape}.')
      self.array = x
      return
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
      self.single = not (isinstance(images, (str, os.PathLike)) and _expand(images).is_dir())
      images = [images]
    elif isinstance(images, (list, tuple)) and not images:
      raise DataError('images= is an empty list: give image files, a folder, PIL images or arrays.')
    elif not isinstance(images, (list, tuple)):
      raise DataError(
        'images= must be an image file or folder path, a PIL image, an NHWC/HWC array, or a list of those; '
        f'got {arguments.describe(images)}.'
      )
    for item in images:
      if isinstance(item, (str, os.PathLike)):
        path = _expand(item)
        if path.is_dir():
          files = image_files(path)
          if not files:
            raise DataError(f'images=: {_no_images(path)}')
          self.items.extend(files)
        else:
          self.items.append(path)
      elif _is_pil(item) or _is_array(item):
        self.items.append(item)
      elif isinstance(item, (list, tuple)):
        self.items.append(np.asarray(item))
      else:
        raise DataError(
          'images= items must be image file or folder paths, PIL images or HWC arrays; got '
          f'{arguments.describe(item)}.'
        )
    missing = [str(p) for p in self.items if isinstance(p, pathlib.Path) and not p.exists()]
    if missing:
      more = f' and {len(missing) - 3} more' if len(missing) > 3 else ''
      raise DataError(f'images=: no such file: {", ".join(missing[:3])}{more}.')

  def __len__(self) -> int:
    return len(self.array) if self.array is not None else len(self.items)

  def default_size(self) -> int | None:
    """Without a size, arrays keep theirs and decoded images get DEFAULT_SIZE."""
    if self.array is not None or (self.items and all(_is_array(i) for i in self.items)):
      return None
    return DEFAULT_SIZE

  def batches(self, size: int | None, batch_size: int) -> Iterator[np.ndarray]:
    """float32 (B, size, size, 3) batches in [-1, 1], decoded lazily (a folder never sits in memory whole)."""
    for start in range(0, len(self), batch_size):
      if self.array is not None:
        chunk = _to_model_range(self.array[start : start + batch_size])
        if size is not None and chunk.shape[1:3] != (size, size):
          chunk = np.stack([resize_bilinear(im, size) for im in chunk])
        yield chunk.astype(np.float32)
        continue
      chunk = [
        _one(item, size, start + i, len(self))
        for i, item in enumerate(self.items[start : start + batch_size])
      ]
      shapes = {c.shape for c in chunk}
      if len(shapes) > 1:
        sides = ' and '.join(sorted(f'{h}x{w}' for h, w, _ in shapes))
        raise DataError(
          f'images= holds arrays of different sizes ({sides}): pass size= to resize them to one.'
        )
      yield np.stack(chunk).astype(np.float32)


def _expand(path) -> pathlib.Path:
  return pathlib.Path(os.path.expanduser(os.fspath(path)))


def _no_images(folder: pathlib.Path) -> str:
  subfolders = sum(1 for p in folder.iterdir() if p.is_dir())
  hint = f' (its {subfolders} subfolders are not searched: give them)' if subfolders else ''
  return f'{folder} holds no image files ({"/".join(IMAGE_SUFFIXES)}) directly in it{hint}.'


def _one(item, size: int | None, index: int, total: int) -> np.ndarray:
  """One item of `images=` as float32 (size, size, 3) in [-1, 1]."""
  if isinstance(item, pathlib.Path):
    try:
      return load_image(item, size or DEFAULT_SIZE)
    except BitError as e:
      raise DataError(
        f'images=: {e} (item {index + 1} of {total}; bit.predict_files and bit-predict skip such files).'
      ) from None
  if _is_pil(item):
    from PIL import ImageOps

    from bit import images

    try:
      rgb = images.to_rgb(ImageOps.exif_transpose(item))
    except Exception as e:  # noqa: BLE001 - a lazily opened image that fails to load, an odd mode
      raise DataError(
        f'images=: the PIL image at item {index + 1} of {total} (mode {item.mode}) cannot be converted to '
        f'RGB ({type(e).__name__}: {e}).'
      ) from None
    x = rgb.astype(np.float32)
    return to_unit_range(resize_bilinear(x, size or DEFAULT_SIZE)).astype(np.float32)
  x = np.asarray(item)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise DataError(
      f'images=: item {index + 1} of {total} must be an HWC array with 3 channels, got shape {x.shape}.'
    )
  x = _to_model_range(x, f'images= item {index + 1} of {total}')
  return resize_bilinear(x, size) if size is not None else x


def preprocess(images: Images, size: int | None = None) -> FloatArray:
  """The exact eval transform: `images` as the float32 NHWC batch in [-1, 1] the model sees.

  `images`: whatever `bit.predict` takes (image file or folder paths, PIL images, arrays, or a list of them;
  see the module docstring). `size`: the side to resize to (the model's `input_size`, or the crop it was
  trained at); without it arrays keep their size and image files and PIL images get 224. Gives the pixels
  `bit.evaluate` and bit-predict feed the model for the same file. A single image gives a batch of one.
  """
  size = arguments.check_size(size, 'size', 'bit.preprocess')
  inputs = _Inputs(images)
  size = size or inputs.default_size()
  if not len(inputs):  # an empty NHWC array
    return _to_model_range(inputs.array)
  return np.concatenate(list(inputs.batches(size, len(inputs))))


def _run(model, params, batches, batch_size: int, bar=None) -> np.ndarray:
  """Softmax probabilities of float32 batches; each padded to a power of two so few shapes compile."""
  fn = _probs_fn(model)
  prepared = models.Inference(model).prepare(params)
  out = []
  for chunk in batches:
    pad = _bucket(len(chunk), batch_size) - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
    out.append(np.asarray(fn(prepared, chunk))[: len(chunk) - pad])
    if bar is not None:
      bar.update(len(chunk) - pad)
  return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


def _top(probs: np.ndarray, top: int):
  k = max(1, min(int(top), probs.shape[-1]))
  idx = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return np.take_along_axis(probs, idx, axis=-1), idx


@overload
def predict(
  model: models.ResNetV2,
  params: Params,
  images: Images,
  *,
  top: None = None,
  size: int | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
  progress: bool | None = None,
) -> FloatArray: ...
@overload
def predict(
  model: models.ResNetV2,
  params: Params,
  images: Images,
  *,
  top: int,
  size: int | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
  progress: bool | None = None,
) -> tuple[FloatArray, IntArray]: ...
def predict(
  model: models.ResNetV2,
  params: Params,
  images: Images,
  *,
  top: int | None = None,
  size: int | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
  progress: bool | None = None,
) -> FloatArray | tuple[FloatArray, IntArray]:
  """Class probabilities for `images`.

  `images`: an image file or a folder (its image files, sorted by name), a PIL image (any mode), an NHWC or
  HWC array (uint8 0..255 or floats in [-1, 1]; other floats are refused), or a list of these. They are
  preprocessed as `bit.preprocess(images, size)` does, at `size` (default: `model.input_size`, the size the
  model was trained at; without one, arrays keep their size and files get 224). Returns float32 softmax
  probabilities of shape (N, C) ((C,) for a single image, file or PIL image). With `top=k`: a tuple
  (probabilities, class indices), each (N, k), best first. `progress`: a tqdm bar on stderr (None: for more
  than 128 images). A file that is not a readable image raises DataError naming it (`predict_files` skips
  such files instead).
  """
  model = arguments.check_model(model, 'bit.predict')
  params = arguments.check_params(model, params, 'bit.predict')
  size = arguments.check_size(size, 'size', 'bit.predict')
  if not isinstance(batch_size, int) or batch_size < 1:
    raise BitError(f'bit.predict: batch_size= must be a positive integer, got {batch_size!r}.')
  inputs = _Inputs(images)
  size = size or model.input_size or inputs.default_size()
  bar = None
  if progress or (progress is None and len(inputs) > PROGRESS_MIN):
    from tqdm.auto import tqdm

    bar = tqdm(total=len(inputs), desc='predict', unit='img')
  try:
    probs = _run(model, params, inputs.batches(size, batch_size), batch_size, bar)
  finally:
    if bar is not None:
      bar.close()
  if top is not None:
    result = _top(probs, top)
    return tuple(r[0] for r in result) if inputs.single else result
  return probs[0] if inputs.single else probs


def load_image(path: PathLike, size: int) -> FloatArray:
  """An image file as float32 (size, size, 3) in [-1, 1], preprocessed as in evaluation (the same decoder,
  `bit.images`: EXIF orientation applied, every mode to 8-bit RGB, the same DCT downscale for `size`).

  Raises BitError naming the file when it is missing or not a readable image.
  """
  from bit import images

  rgb = images.decode(pathlib.Path(path), int(size))
  return to_unit_range(resize_bilinear(rgb.astype(np.float32), size))


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


def image_files(folder: PathLike) -> list[pathlib.Path]:
  """The image files directly in `folder`, sorted by name (subfolders are not searched)."""
  folder = _expand(folder)
  return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def expand_paths(paths: Iterable[PathLike]) -> list[pathlib.Path]:
  """Paths as given, with each folder replaced by the image files directly in it (sorted)."""
  out = []
  for p in paths:
    p = _expand(p)
    if p.is_dir():
      files = image_files(p)
      if not files:
        warnings.warn(_no_images(p), stacklevel=2)
      out.extend(files)
    else:
      out.append(p)
  return out


def predict_files(
  model: models.ResNetV2,
  params: Params,
  paths: PathLike | Iterable[PathLike],
  class_names: Sequence[str] | None = None,
  *,
  top: int = 3,
  size: int | None = None,
  batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[dict[str, Any]]:
  """Predicts the `top` classes of each image file, by name (what bit-predict prints).

  `paths` may include folders (their image files are used). `size` is the side the images are resized to
  (default: `model.input_size`, the size it was trained at, else 224). Returns one dict per file, in order:
  `{'path', 'predictions': [{'label', 'index', 'probability'}, ...]}` best first, or, for a file that is
  missing or not an image, `{'path', 'error'}` (with a warning); the other files are still predicted.
  """
  model = arguments.check_model(model, 'bit.predict_files')
  params = arguments.check_params(model, params, 'bit.predict_files')
  size = arguments.check_size(size, 'size', 'bit.predict_files') or model.input_size or DEFAULT_SIZE
  if class_names is not None and len(class_names) != model.num_classes:
    raise BitError(
      f'{len(class_names)} class names for a model with {model.num_classes} classes: give the labels file of '
      "this model (a workdir's labels.txt)."
    )
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
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
    probs, idx = _top(_run(model, params, [np.stack(images)], batch_size), top)
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


def format_results(results: list[dict[str, Any]]) -> str:
  """Human-readable lines: `path: name (87.3%), name (5.1%), ...` or `path: error: ...`."""
  lines = []
  for r in results:
    if 'error' in r:
      lines.append(f'{r["path"]}: error: {r["error"]}')
    else:
      preds = ', '.join(f'{p["label"]} ({100 * p["probability"]:.1f}%)' for p in r['predictions'])
      lines.append(f'{r["path"]}: {preds}')
  return '\n'.join(lines)


def load_for_prediction(
  *, workdir: PathLike | None = None, model: PathLike | None = None
) -> tuple[models.ResNetV2, dict[str, Any], list[str] | None, int]:
  """(model, params, class_names, size) for `bit-predict`: a training workdir or a checkpoint with its head.

  `workdir`: its model.npz, labels.txt and the crop of its config.json. `model`: a registry name (its head
  kept, its labels file downloaded and cached, its resolution) or a local .npz (labels.txt next to it).
  """
  from bit import checkpoints

  if (workdir is None) == (model is None):
    raise BitError(
      'Give either workdir= (a bit-train run) or model= (e.g. BiT-M-R50x1-ILSVRC2012), not both.'
    )
  if workdir is not None:
    from bit import workdir as workdir_lib

    run = workdir_lib.load(workdir)
    return run.model, run.params, run.class_names, int(run.model.input_size)
  net, params = checkpoints.load(model, keep_head=True)
  names = checkpoints.label_names(model)
  return net, params, names, int(net.input_size or DEFAULT_SIZE)  # a registry checkpoint knows its size
