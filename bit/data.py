"""The input pipeline: datasets (TFDS names or image folders), few-shot subsets, preprocessing, MixUp, and
host batches for one process of a (possibly multi-host) run.

A dataset spec is a TFDS name (`'cifar10'`, `'oxford_flowers102'`, `'name:1.2.0'`) or a path to an image folder
`ROOT/<split>/<class>/<image>` (class order sorted by name; the formats and the decoding of `bit.images`, the
one decoder of every reader: JPEG/PNG/BMP/GIF/WebP, EXIF orientation applied, every mode to 8-bit RGB;
files that are not images are left out when the split is read; every bad file is named once and counted). A
folder without `test/` is evaluated on its `validation/` (or `val/`) folder; a dataset with neither (tf_flowers,
a folder with only `train/`) is divided by a stratified seeded holdout: 10% of each class is the `holdout`
split, the rest `train` (`data_sources.resolve_test_split`).

Bad files: a file that does not decode in training never shifts the stream: its slot gets a replacement example
drawn from (seed, position) (`_fill_bad`, the one bad-file policy). Evaluation skips it (masked) and counts it.

Determinism: the example at global position p of the training stream (step s holds positions
[s*B, (s+1)*B) of the global batch B) is a pure function of (seed, p): epoch e = p // N reads a seeded
permutation of the N examples (`tf.random.experimental.index_shuffle`, so no shuffle buffer and a resume skips
for free), and the crop and flip of p come from stateless ops seeded by (seed, p). The MixUp lambda of step s
comes from (seed, s). So the stream is the same on 1 device or 8, and after a resume from any step. Each of
several processes computes only its own slice [i*B_local, (i+1)*B_local) of every global batch and never
decodes the others' images.

Memory: a split is kept in memory encoded (TFDS bytes, folder paths). When its decoded pixels at the stored size
fit `data_sources.DECODED_CACHE_GB` (`$BIT_DECODED_CACHE_GB`, or `decoded_cache_gb=`; 0 = off), it is decoded
once and kept as uint8, so a small PNG/JPEG is not decoded at every step; the batches are the same either way
(a JPEG that the pipeline would have downscaled while decoding is not served from the cache).

Streaming: a TFDS split whose encoded size is above `data_sources.MAX_MEMORY_GB` (`$BIT_MAX_MEMORY_GB`, or
`max_memory_gb=`), e.g. imagenet2012, is read with TFDS's tf.data reader instead: a deterministic seeded file
order and a seeded shuffle buffer (`SHUFFLE_BUFFER` records), both reshuffled per epoch, give the order;
everything per position (crop, flip, MixUp) is as above, so the batch of step s is still a function of
(seed, s) alone, but the order is not the in-memory path's (each epoch holds the same examples). A resume reads
and skips the records before `start_step` without decoding them. Few-shot on a streamed split reads its labels
once (decoding only the labels), then keeps the chosen examples in memory.

TensorFlow is imported lazily (so `import bit` stays light) and kept off the GPUs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import numpy as np

from bit import data_sources
from bit.errors import ConfigError, DataError
from bit.images import to_unit_range

log: logging.Logger = logging.getLogger(__name__)

# Independent random streams derived from the one seed of a run.
_SHUFFLE, _CROP, _FLIP, _MIX_A, _MIX_B, _FEW_SHOT, _FILES, _BUFFER, _REPLACE = range(1, 10)
# Draws of a replacement for an example whose file does not decode, before the run stops with a DataError.
MAX_REPLACEMENTS = 8
# Records in the shuffle buffer of a streamed split (encoded: ~110 KB each for imagenet2012, so ~1 GB).
SHUFFLE_BUFFER = 10_000
# Training resizes only the window it crops (`_resized_window`, the same values) when the crop is at most this
# share of the resized side; above it, resizing the whole image is cheaper (docs/input-pipeline.md).
WINDOW_SHARE = 0.7


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the hyper-rule and the model need to know about a dataset.

  `train_size` counts the examples actually trained on (k x classes in a few-shot run); `image_size` is the
  typical (h, w) of the training images (the median over the split or a sample of it). `holdout` is True when
  train and test are the seeded 90/10 holdout of a dataset that has no test split.
  """

  name: str
  num_classes: int
  class_names: tuple[str, ...]
  train_size: int
  test_size: int
  image_size: tuple[int, int]
  holdout: bool = False
  test_split: str = 'test'  # the split evaluated: a folder's name or 'holdout' (resolve_test_split)


def few_shot_indices(
  labels: Any, examples_per_class: int, seed: int = 0, num_classes: int | None = None
) -> Any:
  """Returns sorted indices of `examples_per_class` examples of every class, drawn without replacement.

  Drawn from the whole split (not from its first images), seeded by `seed`. DataError when a class has
  fewer examples than asked for.
  """
  labels = np.asarray(labels)
  k = int(examples_per_class)
  if k <= 0:
    raise ConfigError(f'examples_per_class must be a positive integer, got {examples_per_class!r}')
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  rng = np.random.default_rng([_seed(seed), _FEW_SHOT])
  chosen = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < k:
      raise DataError(
        f'class {c} has only {len(idx)} training examples, fewer than examples_per_class={k}; '
        'lower examples_per_class'
      )
    chosen.append(rng.choice(idx, size=k, replace=False))
  return np.sort(np.concatenate(chosen))


def _train_records(dataset, split, data_dir, examples_per_class, seed, max_memory_gb=None):
  records = data_sources.load_split(dataset, split, data_dir, max_memory_gb=max_memory_gb)
  if examples_per_class is not None:
    num_classes = len(records.class_names)
    if records.streaming:  # one label-only pass, then the k x classes chosen examples are held in memory
      labels = data_sources.streamed_labels(records)
      return data_sources.gather_streamed(
        records, few_shot_indices(labels, examples_per_class, seed, num_classes)
      )
    records = records.subset(few_shot_indices(records.labels, examples_per_class, seed, num_classes))
  return records


def get_info(
  dataset: Any,
  *,
  train_split: str = 'train',
  test_split: str = 'test',
  data_dir: str | os.PathLike[str] | None = None,
  examples_per_class: Any = None,
  seed: int = 0,
  max_memory_gb: float | None = None,
) -> DatasetInfo:
  """Returns the DatasetInfo of `dataset` (a TFDS name or an image folder path).

  Sizes come from the data itself (the split as read, after the holdout and the few-shot draw), so the
  hyper-rule works for any dataset. A streamed split (above the memory budget) is not read: its size comes
  from the TFDS metadata, its image size from a small sample, and a few-shot size is k x classes.

  `test_split` is resolved (`data_sources.resolve_test_split`: 'test' of a folder without test/ is its
  validation/ or val/ folder, else the 'holdout'), logged and kept in `test_split`; an image folder's layout is
  checked first (`data_sources.check_folder_splits`).
  """
  test_split = data_sources.resolve_test_split(dataset, test_split, data_dir)
  if data_sources.is_folder(dataset):
    data_sources.check_folder_splits(dataset, train_split, test_split)
  log.info('%s: evaluating on split %r', dataset, test_split)
  train = data_sources.load_split(dataset, train_split, data_dir, max_memory_gb=max_memory_gb)
  if train.streaming and examples_per_class is not None:
    k = int(examples_per_class)
    if k <= 0 or k != examples_per_class:
      raise ConfigError(f'examples_per_class must be a positive integer, got {examples_per_class!r}')
    train_size = k * len(train.class_names)  # checked against the labels when training starts
  else:
    train_size = len(_train_records(dataset, train_split, data_dir, examples_per_class, seed, max_memory_gb))
  test = data_sources.load_split(dataset, test_split, data_dir, max_memory_gb=max_memory_gb)
  return DatasetInfo(
    name=str(dataset),
    num_classes=len(train.class_names),
    class_names=train.class_names,
    train_size=train_size,
    test_size=len(test),
    image_size=train.image_size,
    holdout=train.holdout or test.holdout,
    test_split=test_split,
  )


# ---------------------------------------------------------------------------------------------- pipeline


def _seed(seed) -> int:
  if int(seed) != seed or seed < 0:
    raise ConfigError(f'seed must be a non-negative integer, got {seed!r}')
  return int(seed)


def _stream_key(seed: int, stream: int) -> int:
  """A 63-bit key for one random stream of a run: the first half of every stateless seed pair."""
  return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _local_batch(global_batch_size, process_index, process_count) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(f'process_index={process_index} must be in [0, process_count={process_count})')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(
      f'global_batch_size={global_batch_size} must be a positive multiple of the number of '
      f'processes ({process_count})'
    )
  return global_batch_size // process_count


def _decode(tf, raw, min_side: int, plan=None):
  """Decodes an encoded image to uint8 RGB (h, w, 3) with the one decoder of every reader (`bit.images`):
  EXIF orientation applied; big JPEGs downscaled in the DCT, never below `min_side`, the size the image is
  resized to next."""
  from bit import images

  return images.decode_op(tf, raw, min_side, plan)


def _decode_checked(tf, raw, min_side: int, plan=None):
  """`_decode` that does not raise: (uint8 (h, w, 3), ok). A file that does not decode gives a (0, 0, 3) image
  and ok False, for the bad-file policy (`_fill_bad`).

  A JPEG that ends with its EOI marker, or a PNG that ends with its IEND chunk, goes through `_decode` (the
  native kernels: a graph op cannot return "not ok", so only files that look whole take it); anything else,
  a truncated file among them, through Pillow in Python, which reports failure instead of raising. A whole-
  looking file corrupt inside still raises, and the pipeline's `ignore_errors` skips it (that one shifts the
  stream; a truncated or non-image file never does)."""
  from bit import images

  def run(data):
    try:
      return images.decode(images.encoded_bytes(data), min_side), np.bool_(True)
    except images.ImageDecodeError:
      return np.zeros((0, 0, 3), np.uint8), np.bool_(False)

  def checked():
    image, ok = tf.numpy_function(run, [raw], [tf.uint8, tf.bool], stateful=False)
    return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(ok, [])

  def native():
    return tf.ensure_shape(_decode(tf, raw, min_side, plan), [None, None, 3]), tf.constant(True)

  def last(k):  # the last k bytes (fewer in a shorter file: a negative position is an error in Substr)
    return tf.strings.substr(raw, tf.maximum(tf.strings.length(raw) - k, 0), k)

  whole_jpeg = tf.logical_and(tf.strings.substr(raw, 0, 3) == b'\xff\xd8\xff', last(2) == b'\xff\xd9')
  whole_png = tf.logical_and(
    tf.strings.substr(raw, 0, 8) == b'\x89PNG\r\n\x1a\n', last(8) == b'IEND\xaeB`\x82'
  )
  image, ok = tf.cond(tf.logical_or(whole_jpeg, whole_png), native, checked)
  image.set_shape([None, None, 3])
  ok.set_shape([])
  return image, ok


def _fill_bad(tf, load, index, p, n: int, key: int):
  """The bad-file policy of training: the example at stream position p reads `index`; when its file does not
  decode (`load(index) -> (image, ok)`, ok False), the slot is filled by a replacement example drawn from
  (seed, p, try), retried up to MAX_REPLACEMENTS times. So a bad file never shifts the stream: the batch of
  step s is the same whether the run started at 0 or resumed, on any number of devices.

  Returns (image, the index used, the bad indices met: int64 (MAX_REPLACEMENTS,), -1 padded).
  """
  image, ok = load(index)
  index = tf.cast(index, tf.int64)
  none = tf.fill([MAX_REPLACEMENTS], tf.constant(-1, tf.int64))
  key = tf.constant(key, tf.int64)

  def cond(k, index, image, ok, bad):
    return tf.logical_and(tf.logical_not(ok), k < MAX_REPLACEMENTS)

  def body(k, index, image, ok, bad):
    bad = tf.tensor_scatter_nd_update(bad, tf.reshape(k, [1, 1]), tf.reshape(index, [1]))
    seed = tf.stack([key, p * MAX_REPLACEMENTS + k])
    index = tf.random.stateless_uniform([], seed=seed, minval=0, maxval=n, dtype=tf.int64)
    image, ok = load(index)
    return k + 1, index, image, ok, bad

  def replaced():  # only when the file did not decode: the loop costs every example that enters it
    invariants = (tf.TensorShape([]), tf.TensorShape([]), tf.TensorShape([None, None, 3]), tf.TensorShape([]))
    _, new_index, new_image, new_ok, bad = tf.while_loop(
      cond,
      body,
      (tf.constant(0, tf.int64), index, image, ok, none),
      shape_invariants=(*invariants, tf.TensorShape([MAX_REPLACEMENTS])),
    )
    message = f'{MAX_REPLACEMENTS + 1} files in a row could not be decoded: too many bad images in the split'
    with tf.control_dependencies([tf.debugging.Assert(new_ok, [message])]):
      return tf.identity(new_image), new_index, bad

  image, index, bad = tf.cond(ok, lambda: (image, index, none), replaced)
  image.set_shape([None, None, 3])
  return image, index, bad


def _check_labels(records, num_classes):
  top = len(records.class_names) - 1 if records.streaming else (records.labels.max() if len(records) else -1)
  if top >= num_classes:
    raise DataError(
      f'{records.name!r} split {records.split!r} has label {top} but num_classes={num_classes}; '
      "pass the dataset's number of classes (get_info(...).num_classes)"
    )


@dataclasses.dataclass(frozen=True)
class _Decoded:
  """Every image of a split decoded at its stored size, end to end in one uint8 buffer."""

  flat: np.ndarray  # uint8, all pixels
  offsets: np.ndarray  # int64 (N,): where image i starts in flat
  shapes: np.ndarray  # int64 (N, 2): (h, w); (0, 0) for an image that does not decode
  jpeg_short_side: int  # the largest short side of a JPEG (0 if none): decides if the cache is exact


def _decoded(tf, records, decoded_cache_gb) -> _Decoded | None:
  """The split decoded once (memoized), or None when its pixels do not fit the decoded-cache budget."""
  budget = data_sources.decoded_cache_bytes(decoded_cache_gb)
  if budget <= 0 or records.streaming or not len(records):
    return None
  if records.sizes is not None:
    estimate = int((records.sizes[:, 0] * records.sizes[:, 1]).sum()) * 3
  else:
    estimate = len(records) * records.image_size[0] * records.image_size[1] * 3
  if estimate > budget:
    return None

  def build():
    payload, is_path = tf.constant(records.payload), records.is_path
    never = 1 << 30  # a min_side that large: never downscaled
    plans = _plans(tf, records, never)

    def decode(i):
      raw = tf.gather(payload, i)
      raw = tf.io.read_file(raw) if is_path else raw
      return i, _decode(tf, raw, never, _plan_of(tf, plans, i)), tf.io.is_jpeg(raw)

    ds = tf.data.Dataset.range(len(records))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
    images, total, jpeg_short = [None] * len(records), 0, 0
    for i, image, is_jpeg in ds.prefetch(64).as_numpy_iterator():
      images[i] = image
      total += image.nbytes
      if total > 1.25 * budget:  # the estimate (median size x N) was far off: stay encoded
        log.info('%s split %s: decoded pixels exceed the decoded-cache budget', records.name, records.split)
        return records, None
      if is_jpeg:
        jpeg_short = max(jpeg_short, min(image.shape[:2]))
    shapes = np.array([im.shape[:2] if im is not None else (0, 0) for im in images], np.int64)
    sizes = shapes[:, 0] * shapes[:, 1] * 3
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = np.concatenate([im.reshape(-1) for im in images if im is not None] or [np.zeros(0, np.uint8)])
    log.info(
      'decoded %s split %s once: %d images, %.1f MB of pixels',
      records.name,
      records.split,
      len(records),
      flat.nbytes / 1e6,
    )
    return records, _Decoded(flat, offsets, shapes, jpeg_short)

  return data_sources.memoized(('decoded', id(records), budget), build)


def _plans(tf, records, min_side):
  """The decode plan of every image of the split when their headers were read with it (folders), else None."""
  if records.headers is None:
    return None
  from bit import images

  return tf.constant(images.decode_plans(records.sizes, records.headers, min_side))


def _plan_of(tf, plans, index):
  return None if plans is None else tf.gather(plans, index)


def _image_loader(tf, records, min_side, decoded_cache_gb, checked: bool = False):
  """Returns `load(index) -> uint8 (h, w, 3)` for an in-memory split; with `checked`, `load(index) -> (image,
  ok)` that does not raise for a file that does not decode (ok False), for `_fill_bad`.

  From the decoded cache when the split fits its budget and the cache gives the very same pixels: a JPEG that
  `_decode` would downscale in the DCT for this `min_side` makes the loader decode from the encoded data.
  """
  cache = _decoded(tf, records, decoded_cache_gb)
  if cache is not None and cache.jpeg_short_side // 2 < min_side:
    flat, offsets, shapes = (tf.constant(a) for a in (cache.flat, cache.offsets, cache.shapes))

    def load(index):
      h, w = shapes[index, 0], shapes[index, 1]
      size = h * w * 3
      if checked:  # the cache knows which files did not decode: (0, 0)
        offset = offsets[index]
        return tf.reshape(flat[offset : offset + size], tf.stack([h, w, 3])), size > 0
      # An image that did not decode fails here too, and tf.data's ignore_errors skips it, as without cache.
      check = tf.debugging.assert_positive(size, message='image could not be decoded')
      with tf.control_dependencies([check]):
        offset = offsets[index]
        return tf.reshape(flat[offset : offset + size], tf.stack([h, w, 3]))

    return load
  payload, is_path = tf.constant(records.payload), records.is_path
  plans = _plans(tf, records, min_side)

  def load(index):  # noqa: F811 - the uncached loader
    raw = tf.gather(payload, index)
    raw = tf.io.read_file(raw) if is_path else raw
    return (_decode_checked if checked else _decode)(tf, raw, min_side, _plan_of(tf, plans, index))

  return load


def _train_augment(tf, image, p, resize, crop, crop_key, flip_key):
  """Resize to `resize` x `resize` (bilinear), random crop, random flip (both seeded by the stream position p),
  values to [-1, 1]."""
  crop_seed = tf.stack([tf.constant(crop_key, tf.int64), p])
  if crop <= WINDOW_SHARE * resize:
    image = _resized_window(tf, image, resize, crop, crop_seed)
  else:
    image = tf.image.resize(image, [resize, resize], method='bilinear')
    image = tf.image.stateless_random_crop(image, [crop, crop, 3], seed=crop_seed)
  image = tf.image.stateless_random_flip_left_right(
    image, seed=tf.stack([tf.constant(flip_key, tf.int64), p])
  )
  return to_unit_range(image)


def _resized_window(tf, image, resize, crop, seed):
  """`stateless_random_crop(tf.image.resize(image, [resize, resize]), [crop, crop, 3], seed)`, the very same
  float32 values, computing only the crop.

  The crop's offset is drawn as `stateless_random_crop` draws it. TensorFlow's bilinear kernel (half-pixel
  centres) blends each output pixel from two source rows, each first blended along the width: `top + (bottom -
  top) * lerp`. So the source rows the crop needs are resized along the width by the kernel itself (a height
  that does not change is copied exactly), and blended down the height here with the kernel's own float32
  arithmetic. tests/test_data.py holds the equality on many sizes, up- and downscaled.
  """
  limit = tf.constant([resize - crop + 1, resize - crop + 1, 1], tf.int32)
  offset = tf.random.stateless_uniform([3], seed=seed, minval=0, maxval=tf.int32.max, dtype=tf.int32) % limit
  h = tf.shape(image)[0]
  # The kernel's source row of output row y: (y + 0.5) * (h / resize) - 0.5, its floor and ceiling in the image.
  source = (tf.cast(offset[0] + tf.range(crop), tf.float32) + 0.5) * (tf.cast(h, tf.float32) / resize) - 0.5
  floor = tf.floor(source)
  top = tf.maximum(tf.cast(floor, tf.int32), 0)
  bottom = tf.minimum(tf.cast(tf.math.ceil(source), tf.int32), h - 1)
  first, end = top[0], bottom[-1] + 1
  rows = tf.image.resize(image[first:end], [end - first, resize], method='bilinear')
  rows = rows[:, offset[1] : offset[1] + crop]
  upper, lower = tf.gather(rows, top - first), tf.gather(rows, bottom - first)
  window = upper + (lower - upper) * (source - floor)[:, None, None]
  window.set_shape([crop, crop, 3])
  return window


def _own_slice(tf, g, b, process_index):
  """A tf.data filter on (p, ...) keeping this process's positions of every global batch."""
  return lambda p, *_: tf.equal((p % g) // b, process_index)


def _global_position(q, g, b, process_index):
  """p, the position in the global stream of this process's q-th example (ints or tensors).

  Every global batch of g positions holds the processes' slices of b in process order.
  """
  return (q // b) * g + process_index * b + q % b


def _local_counter(p, g, b, process_index):
  """q, the number of this process's positions before position p (the inverse of _global_position)."""
  return (p // g) * b + p % g - process_index * b


def _streamed_train_records(tf, records, *, g, b, process_index, seed, start_step):
  """(p, (encoded image, label)) of this process's positions of the endless, epoch-shuffled stream."""
  import tensorflow_datasets as tfds

  read_config = tfds.ReadConfig(
    shuffle_seed=_stream_key(seed, _FILES), shuffle_reshuffle_each_iteration=True, try_autocache=False
  )
  ds = data_sources.as_encoded_dataset(
    records.builder, records.name, records.split, shuffle_files=True, read_config=read_config
  )
  # Shuffled before repeat: every epoch holds each example once; both shuffles draw a new, seeded order per
  # epoch (reshuffle_each_iteration with a fixed seed is deterministic across runs).
  ds = ds.shuffle(SHUFFLE_BUFFER, seed=_stream_key(seed, _BUFFER), reshuffle_each_iteration=True).repeat()
  # The skipped records of a resume are read but never decoded: the decode comes later.
  ds = ds.enumerate().skip(int(start_step) * g)
  return ds.filter(_own_slice(tf, g, b, process_index))


def train_iterator(
  dataset: Any,
  *,
  split: str,
  global_batch_size: int,
  resize: int,
  crop: int,
  num_classes: int,
  mixup_alpha: float = 0.0,
  seed: int = 0,
  start_step: int = 0,
  examples_per_class: Any = None,
  data_dir: str | os.PathLike[str] | None = None,
  process_index: int = 0,
  process_count: int = 1,
  per_example_mixup: bool = False,
  max_memory_gb: float | None = None,
  decoded_cache_gb: float | None = None,
  records: Any = None,
  defer_skip_warnings: bool = False,
) -> Any:
  """Returns an infinite iterator of this process's training batches, starting at step `start_step`.

  Each batch is `{'image': float32 (B_local, crop, crop, 3) in [-1, 1], 'label': float32 (B_local,
  num_classes)}` with B_local = global_batch_size // process_count. Per example: decode, resize to
  `resize` x `resize` (bilinear), random crop `crop`, random horizontal flip, values to [-1, 1]. With
  `mixup_alpha` > 0, one lambda ~ Beta(alpha, alpha) per batch (per example with `per_example_mixup`) mixes
  each image and label with the batch reversed (the official MixUp; with several processes the pairs are
  formed within each process's slice). The batch of step s is the same whatever `start_step` was.

  A TFDS split above the memory budget (`max_memory_gb`, see `data_sources.max_memory_bytes`) is streamed:
  resuming at `start_step` then reads (but does not decode) the start_step x global_batch_size records
  before it. A split whose decoded pixels fit `decoded_cache_gb` is decoded once and kept (same batches).
  `records` (a `data_sources.Records`) is read instead of `dataset`/`split` when given; a label of -1 is an
  unlabeled example, whose one-hot label is all zeros (`bit.distill` adds such examples).

  A file that does not decode never shifts the stream: its slot gets a replacement example drawn from (seed,
  position) (`_fill_bad`). The iterator's `skipped` (a `Skipped`) counts such files once each; they are logged
  by path when first met, or with `defer_skip_warnings` only by `skipped.report()` (after a progress bar).
  """
  seed = _seed(seed)
  b_local = _local_batch(global_batch_size, process_index, process_count)
  resize, crop = int(resize), int(crop)
  _check_train_sizes(resize, crop, start_step)
  if records is None:
    records = _train_records(dataset, split, data_dir, examples_per_class, seed, max_memory_gb)
  _check_labels(records, num_classes)
  tf = data_sources.tf_hidden()
  g, b = int(global_batch_size), b_local
  augment = _TrainAugment(tf, seed, resize, crop, g, b, process_index)
  if records.streaming:
    ds, example, where = _streamed_train_source(tf, records, augment, seed=seed, start_step=start_step)
  else:
    ds, example, where = _in_memory_train_source(tf, records, augment, seed, decoded_cache_gb, start_step)
  mix_a, mix_b = _stream_key(seed, _MIX_A), _stream_key(seed, _MIX_B)

  def finish(step, batch):
    image, label, q, bad = batch
    label = tf.one_hot(label, num_classes, dtype=tf.float32)
    if mixup_alpha > 0:
      image, label = _mixup(
        tf, image, label, step, (mix_a, mix_b), mixup_alpha, [b] if per_example_mixup else []
      )
    return {'image': image, 'label': label, 'q': q, 'bad': bad}

  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if records.streaming:
    # A streamed record that does not decode cannot be replaced by index: it is skipped (logged, counted);
    # the in-memory splits (every image folder) fill its slot instead (`_fill_bad`), so nothing shifts.
    ds = ds.ignore_errors(log_warning=True).map(
      lambda image, label, q: (image, label, q, tf.fill([MAX_REPLACEMENTS], tf.constant(-1, tf.int64)))
    )
  ds = ds.batch(b, drop_remainder=True).enumerate(start=int(start_step))
  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
  skipped = Skipped(records, deferred=defer_skip_warnings)
  return TrainBatches(_replaced(_reported(_numpy(ds), int(start_step) * b, where, skipped), skipped), skipped)


def _check_train_sizes(resize, crop, start_step):
  if crop > resize:
    raise ConfigError(
      f'crop={crop} is larger than resize={resize}; the random crop must fit in the resized image'
    )
  if start_step < 0:
    raise ConfigError(f'start_step must be >= 0, got {start_step}')


class _TrainAugment:
  """The per-example training view: global stream position, then resize/crop/flip keyed by (seed, position)."""

  def __init__(self, tf, seed, resize, crop, g, b, process_index):
    self.tf, self.resize, self.crop = tf, resize, crop
    self.g, self.b, self.process_index = g, b, process_index
    self.crop_key, self.flip_key = _stream_key(seed, _CROP), _stream_key(seed, _FLIP)

  def position(self, q):
    # q counts this process's examples; p is the example's position in the global stream.
    return _global_position(self.tf.cast(q, self.tf.int64), self.g, self.b, self.process_index)

  def __call__(self, image, p):
    return _train_augment(self.tf, image, p, self.resize, self.crop, self.crop_key, self.flip_key)


def _streamed_train_source(tf, records, augment, *, seed, start_step):
  """A streamed split: its records from `start_step` on, the per-record map, and how to name a skipped one."""
  g, b, process_index = augment.g, augment.b, augment.process_index

  def example(p, record):
    raw, label = record
    image = augment(_decode(tf, raw, augment.resize), p)
    return image, label, _local_counter(p, g, b, process_index)

  ds = _streamed_train_records(
    tf, records, g=g, b=b, process_index=process_index, seed=seed, start_step=start_step
  )
  where = lambda q: int(augment.position(q))  # noqa: E731 - a skipped record is named by its stream position
  return ds, example, where


def _in_memory_train_source(tf, records, augment, seed, decoded_cache_gb, start_step):
  """An in-memory split: a counter from `start_step`, the per-example map (shuffled index, bad files filled)."""
  n = len(records)
  labels = tf.constant(records.labels)
  load = _image_loader(tf, records, augment.resize, decoded_cache_gb, checked=True)
  shuffle_key, replace_key = _stream_key(seed, _SHUFFLE), _stream_key(seed, _REPLACE)

  def index_of(p):
    return tf.random.experimental.index_shuffle(
      p % n,
      seed=tf.stack([tf.constant(shuffle_key, tf.int64), p // n]),
      max_index=tf.constant(n - 1, tf.int64),
    )

  def example(q):
    p = augment.position(q)
    image, index, bad = _fill_bad(tf, load, index_of(p), p, n, replace_key)
    image = augment(image, p)
    return image, tf.gather(labels, index), q, bad

  ds = tf.data.Dataset.counter(start=int(start_step) * augment.b, dtype=tf.int64)
  where = lambda q: int(index_of(augment.position(q)))  # noqa: E731 - (never skips: a bad file's slot is filled)
  return ds, example, where


def _mixup(tf, image, label, step, mix_keys, alpha, shape):
  """The official MixUp of one batch with itself reversed; one lambda (shape []) or one per example ([b])."""
  mix_a, mix_b = mix_keys
  g1 = tf.random.stateless_gamma(
    shape, seed=tf.stack([tf.constant(mix_a, tf.int64), step]), alpha=float(alpha), dtype=tf.float64
  )
  g2 = tf.random.stateless_gamma(
    shape, seed=tf.stack([tf.constant(mix_b, tf.int64), step]), alpha=float(alpha), dtype=tf.float64
  )
  # Beta(a, a) = G1 / (G1 + G2); float64 so tiny alphas do not underflow both gammas to zero.
  lam = tf.cast(tf.where(g1 + g2 > 0, g1 / (g1 + g2), 0.5), tf.float32)
  lam_image = tf.reshape(lam, [-1, 1, 1, 1]) if shape else lam
  lam_label = tf.reshape(lam, [-1, 1]) if shape else lam
  image = lam_image * image + (1.0 - lam_image) * tf.reverse(image, [0])
  label = lam_label * label + (1.0 - lam_label) * tf.reverse(label, [0])
  return image, label


def eval_iterator(
  dataset: Any,
  *,
  split: str,
  global_batch_size: int,
  crop: int,
  resize: int | None = None,
  data_dir: str | os.PathLike[str] | None = None,
  process_index: int = 0,
  process_count: int = 1,
  center_crop: bool = False,
  max_memory_gb: float | None = None,
  decoded_cache_gb: float | None = None,
) -> Any:
  """Returns a finite iterator over every example of `split` exactly once (over all processes).

  Batches are `{'image': float32 (B_local, crop, crop, 3) in [-1, 1], 'label': int32 (B_local,),
  'mask': bool (B_local,)}`; the last global batch is padded with zero images and mask False, so every
  process yields the same number of same-shaped batches. Images are resized straight to `crop` (official);
  with `center_crop=True` they are resized to `resize` and the central `crop` is taken. A streamed split
  (above `max_memory_gb`) is read once in file order, with the same contract.
  """
  b = _local_batch(global_batch_size, process_index, process_count)
  crop = int(crop)
  resize = _eval_resize(resize, crop, center_crop)
  records = data_sources.load_split(dataset, split, data_dir, max_memory_gb=max_memory_gb)
  tf = data_sources.tf_hidden()
  n, g = len(records), int(global_batch_size)
  num_batches = math.ceil(n / g)
  size = resize if center_crop else crop

  def preprocess(image):
    image = tf.image.resize(image, [size, size], method='bilinear')
    if center_crop:
      top = (resize - crop) // 2
      image = image[top : top + crop, top : top + crop]
    return to_unit_range(image)

  def row(q, mask, label, load):
    # Padding rows are never decoded: zero images (the middle of the value range) with mask False.
    image = tf.cond(mask, lambda: preprocess(load()), lambda: tf.zeros([crop, crop, 3], tf.float32))
    image.set_shape([crop, crop, 3])
    label = tf.cast(tf.where(mask, label, 0), tf.int32)
    return {'image': image, 'label': label, 'mask': mask, 'q': q}

  if records.streaming:
    ds, example, where = _streamed_eval_source(tf, records, row, g, b, process_index, size)
  else:
    _check_labels(records, len(records.class_names))
    labels = tf.constant(records.labels)
    load = _image_loader(tf, records, size, decoded_cache_gb)

    def example(q):
      p = _global_position(q, g, b, process_index)
      index = tf.minimum(p, n - 1)
      return row(q, p < n, tf.gather(labels, index), lambda: load(index))

    def where(q):
      return min(_global_position(q, g, b, process_index), n - 1)

    ds = tf.data.Dataset.range(num_batches * b)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors(
    log_warning=True
  )
  ds = ds.batch(b).prefetch(tf.data.AUTOTUNE)
  skipped = Skipped(records)
  return _padded(_reported(_numpy(ds), 0, where, skipped, num_batches * b), num_batches, b, crop)


def _eval_resize(resize, crop, center_crop):
  """`resize` as an int when `center_crop` takes the central `crop` of it (checked to fit), else unchanged."""
  if center_crop:
    if resize is None or int(resize) < crop:
      raise ConfigError(f'center_crop needs resize >= crop, got resize={resize} crop={crop}')
    resize = int(resize)
  return resize


def _streamed_eval_source(tf, records, row, g, b, process_index, size):
  """A streamed eval split read once in file order, padded to whole global batches; this process's slice."""
  n = len(records)
  num_batches = math.ceil(n / g)
  real = data_sources.as_encoded_dataset(records.builder, records.name, records.split).take(n)
  real = real.map(lambda raw, label: (raw, label, True))
  pad = tf.data.Dataset.range(num_batches * g - n).map(
    lambda _: (tf.constant(b''), tf.constant(0, tf.int64), False)
  )
  ds = real.concatenate(pad).enumerate().filter(_own_slice(tf, g, b, process_index))

  def example(p, record):
    raw, label, mask = record
    return row(_local_counter(p, g, b, process_index), mask, label, lambda: _decode(tf, raw, size))

  def where(q):
    return _global_position(q, g, b, process_index)

  return ds, example, where


def _numpy(ds):
  tf = data_sources.tf_hidden()
  try:
    yield from ds.as_numpy_iterator()
  except tf.errors.InvalidArgumentError as e:
    if 'could not be decoded' not in str(e):
      raise
    raise DataError(
      f'{MAX_REPLACEMENTS + 1} images in a row could not be decoded (a replacement is drawn for each bad file): '
      'the split has too many bad files; remove them (each is named in the log)'
    ) from None


# (dataset, file) pairs already warned about in this process: a bad file is named once, not at every epoch.
_WARNED: set = set()


def _where(records, index) -> str:
  if records.streaming:
    return f'stream position {index} of split {records.split!r}'
  return str(records.payload[index]) if records.is_path else f'record {index} of split {records.split!r}'


class Skipped:
  """The files of one split that did not decode, each counted once however many epochs meet it.

  Files that failed the header check when the split was read (`Records.unreadable`) count too. Unless
  `deferred`, each is logged by path the first time this process meets it; a deferred one (training: not in
  the middle of the progress bar) is left for `report()` once the bar is done.
  """

  records: Any
  deferred: bool
  files: dict[str, None]
  reported: int

  def __init__(self, records: Any, deferred: bool = False) -> None:
    self.records, self.deferred = records, deferred
    self.files = dict.fromkeys(getattr(records, 'unreadable', ()) or ())
    self.reported = len(self.files)

  def add(self, index: int) -> None:
    """Counts the file of example `index` (once), logging it unless deferred."""
    where = _where(self.records, index)
    if where in self.files:
      return
    self.files[where] = None
    key = (self.records.name, where)
    if not self.deferred and key not in _WARNED:
      _WARNED.add(key)
      log.warning('an image could not be decoded: %s (%s)', where, self.records.name)

  def __len__(self) -> int:
    return len(self.files)

  def report(self) -> str | None:
    """One line naming the files met since the last report (None when there are none), also logged."""
    new = list(self.files)[self.reported :]
    self.reported = len(self.files)
    _WARNED.update((self.records.name, f) for f in new)
    if not new:
      return None
    shown = ', '.join(new[:5]) + (f' and {len(new) - 5} more' if len(new) > 5 else '')
    line = (
      f'{len(new)} image(s) of {self.records.name} split {self.records.split!r} could not be decoded; training '
      f'used a seeded replacement example in their place (the stream is unchanged): {shown}'
    )
    log.warning(line)
    return line


class TrainBatches:
  """The iterator `train_iterator` returns: its batches, and `skipped` (a `Skipped`), the files that did not
  decode so far."""

  skipped: Skipped

  def __init__(self, batches: Any, skipped: Skipped) -> None:
    self._batches, self.skipped = batches, skipped

  def __iter__(self) -> TrainBatches:
    return self

  def __next__(self) -> dict[str, Any]:
    return next(self._batches)


def _replaced(batches, skipped: Skipped):
  """Drops the bookkeeping field 'bad' (the indices of files met that did not decode) into `skipped`."""
  for batch in batches:
    bad = batch.pop('bad')
    for index in np.unique(bad[bad >= 0]):
      skipped.add(int(index))
    yield batch


def _reported(batches, first, position_index, skipped: Skipped, end=None):
  """Drops the bookkeeping field 'q' and counts (logs) by path every example the pipeline skipped.

  tf.data's ignore_errors drops an image that passed the header check but does not decode (a truncated
  file) without saying which; the gap in the running example counter q tells.
  """
  expected = first
  for batch in batches:
    q = batch.pop('q')
    for missing in np.setdiff1d(np.arange(expected, q[-1] + 1), q):
      skipped.add(position_index(int(missing)))
    expected = int(q[-1]) + 1
    yield batch
  for missing in range(expected, expected if end is None else end):
    skipped.add(position_index(missing))


def _padded(batches, num_batches, b, crop):
  """Yields exactly `num_batches` batches of `b` rows: short ones (a skipped corrupt file) are padded."""
  count = 0
  for batch in batches:
    rows = len(batch['mask'])
    if rows < b:
      batch = {
        'image': np.concatenate([batch['image'], np.zeros((b - rows, crop, crop, 3), np.float32)]),
        'label': np.concatenate([batch['label'], np.zeros(b - rows, np.int32)]),
        'mask': np.concatenate([batch['mask'], np.zeros(b - rows, bool)]),
      }
    count += 1
    yield batch
  for _ in range(num_batches - count):
    yield {
      'image': np.zeros((b, crop, crop, 3), np.float32),
      'label': np.zeros(b, np.int32),
      'mask': np.zeros(b, bool),
    }
