"""Where examples come from: TFDS datasets and image folders, as index-addressable or streamed splits.

A split that fits in memory is read once per process into a `Records`: the labels and, per example, either
the encoded image bytes (TFDS) or the file path (image folders). The input pipeline in `bit.data` then reads
any example by index, which makes the stream a pure function of (seed, position) and a resume skip free.

A TFDS split whose encoded size (TFDS metadata) is above the memory budget (`MAX_MEMORY_GB`, the environment
variable `BIT_MAX_MEMORY_GB`, or a `max_memory_gb` argument; 0 streams every TFDS split) is not read: its
`Records` is `streaming`, holds only the metadata (size, class names, the typical image size from a small
sample) and the TFDS builder, and `bit.data` reads it with TFDS's own tf.data reader. Image folders hold only
paths, so they are always index-addressable.

The evaluation split: `test` when the dataset has one. An image folder without `test/` is evaluated on its
`validation/` (or `val/`) folder; a dataset with neither (tf_flowers, a folder with only `train/`) is divided
by a stratified, seeded holdout: `HOLDOUT_FRACTION` of each class becomes the `holdout` split, the rest
`train`. The holdout seed is a constant so every run sees the same test set. `resolve_test_split` says which
(asking for 'test' reads it). The classes of an image folder are its `train/` class folders (sorted by name);
a class folder of another split that train lacks is an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import threading
from typing import Any

import numpy as np

from bit import images
from bit.errors import ConfigError, DataError

_TF_READY = False  # tf_hidden() has hidden the GPUs from TensorFlow

log: logging.Logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
HOLDOUT = 'holdout'  # the split name of the held-out side of train
# The folders of an image folder that are splits; without test/, the first of the others is evaluated.
FOLDER_SPLITS = ('train', 'test', 'validation', 'val')
# The formats of the one decoder of every reader (bit.images).
IMAGE_EXTENSIONS = images.EXTENSIONS
DECODABLE_FORMATS = images.FORMATS
# Images whose header gives the typical size of a dataset with images of varying size.
SIZE_SAMPLE = 256
# A TFDS split with more encoded bytes than this is streamed from its files instead of read into memory.
MAX_MEMORY_GB = 8.0
# A split whose decoded uint8 pixels (at the stored size) fit in this many GB is decoded once and kept.
DECODED_CACHE_GB = 1.0


def _budget_bytes(value, env: str, default: float) -> float:
  if value is None:
    value = os.environ.get(env, '').strip() or default
  try:
    gb = float(value)
  except ValueError:
    gb = -1.0
  if not gb >= 0:  # also catches NaN
    raise ConfigError(f'{env} (or the matching argument) must be a number of GB >= 0, got {value!r}')
  return gb * 1e9


def max_memory_bytes(max_memory_gb: float | None = None) -> float:
  """The encoded-size budget above which a TFDS split is streamed: the argument, else `$BIT_MAX_MEMORY_GB`,
  else `MAX_MEMORY_GB`. 0 streams every TFDS split."""
  return _budget_bytes(max_memory_gb, 'BIT_MAX_MEMORY_GB', MAX_MEMORY_GB)


def decoded_cache_bytes(decoded_cache_gb: float | None = None) -> float:
  """The decoded-pixels budget under which a split is decoded once and kept as uint8: the argument, else
  `$BIT_DECODED_CACHE_GB`, else `DECODED_CACHE_GB`. 0 turns the decoded cache off."""
  return _budget_bytes(decoded_cache_gb, 'BIT_DECODED_CACHE_GB', DECODED_CACHE_GB)


@dataclasses.dataclass(frozen=True, eq=False)
class Records:
  """One split: addressable by index, or (`streaming`) only metadata and the TFDS builder to read it with."""

  name: str
  split: str
  labels: np.ndarray | None  # int64 (N,); None when streaming
  payload: np.ndarray | None  # object (N,): encoded bytes (TFDS) or str paths (folders); None when streaming
  is_path: bool
  class_names: tuple[str, ...]
  image_size: tuple[int, int]  # typical (h, w): the median over the split or a sample of it
  holdout: bool = False  # True when this split is one side of the seeded holdout
  sizes: np.ndarray | None = None  # int64 (N, 2) (h, w) of every image, when known (folders)
  # int32 (N, 2): how `images.decode_op` decodes every image and its EXIF orientation, read with `sizes`
  # (`images.read_header`), so the pipelines do not read the headers again; None when not known.
  headers: np.ndarray | None = None
  streaming: bool = False
  num_examples: int = 0  # the split size when streaming (from the metadata)
  builder: object = dataclasses.field(default=None, repr=False)  # the TFDS builder when streaming
  unreadable: tuple[str, ...] = ()  # files of the split left out when read: not images (header check)

  def __len__(self) -> int:
    return self.num_examples if self.streaming else len(self.labels)

  def subset(self, indices: Any) -> Records:
    if self.streaming:
      raise DataError(f'{self.name!r} split {self.split!r} is streamed; use gather_streamed() for a subset')
    indices = np.asarray(indices, np.int64)
    sizes = None if self.sizes is None else self.sizes[indices]
    headers = None if self.headers is None else self.headers[indices]
    return dataclasses.replace(
      self, labels=self.labels[indices], payload=self.payload[indices], sizes=sizes, headers=headers
    )


_CACHE: dict = {}
_LOCK = threading.RLock()


def clear_cache() -> None:
  """Forgets the splits read so far (they are kept in memory for the life of the process)."""
  with _LOCK:
    _CACHE.clear()


def is_folder(dataset: str) -> bool:
  """True when the dataset spec names an image folder rather than a TFDS dataset."""
  dataset = os.fspath(dataset)
  if os.path.isdir(os.path.expanduser(dataset)):
    return True
  if dataset.startswith(('/', './', '../', '~')) or os.path.exists(dataset):
    raise DataError(
      f'image folder {dataset!r} does not exist or is not a folder; give a folder ROOT/<split>/<class>/<image> '
      'or a TFDS dataset name such as cifar10'
    )
  return False


def load_split(
  dataset: Any,
  split: str,
  data_dir: str | os.PathLike[str] | None = None,
  *,
  max_memory_gb: float | None = None,
) -> Records:
  """Returns the split `split` of `dataset` (TFDS name or folder path), applying the holdout if needed.

  A TFDS split whose encoded size is above `max_memory_bytes(max_memory_gb)` comes back `streaming`
  (metadata only, nothing read but a small sample).
  """
  dataset = os.fspath(dataset)
  budget = max_memory_bytes(max_memory_gb)
  key = (dataset, split, None if data_dir is None else os.fspath(data_dir), budget)
  with _LOCK:
    if key in _CACHE:
      return _CACHE[key]
  folder = is_folder(dataset)
  if folder:
    splits = _folder_split_names(dataset)
    reader = lambda s: _read_folder(dataset, s)  # noqa: E731
  else:
    builder = _tfds_builder(dataset, data_dir)
    splits = tfds_split_names(builder)
    reader = lambda s: _read_tfds(builder, dataset, s, budget)  # noqa: E731
  holdout = _has_holdout(splits, folder)

  def read(s):  # both sides of a holdout come from one read of the train split
    raw_key = ('raw',) + key[:1] + (s,) + key[2:]
    with _LOCK:
      if raw_key not in _CACHE:
        _CACHE[raw_key] = reader(s)
      return _CACHE[raw_key]

  # TFDS mock data (and unprepared metadata) has no split list: then every split is taken as it is.
  if split == 'test' and splits and 'test' not in splits:
    split = _eval_split(splits, folder)
  if split == HOLDOUT and not holdout:
    raise DataError(
      f'dataset {dataset!r} has no {HOLDOUT!r} split: the seeded holdout of train is the evaluation split only '
      f'of a dataset without a test split{" (or validation/, val/ folder)" if folder else ""}; its splits are '
      f'{sorted(splits)}'
    )
  if split == HOLDOUT or (split == 'train' and holdout):
    records = _holdout(read('train'), split)
  else:
    if splits and _base_split(split) not in splits:
      raise DataError(f'dataset {dataset!r} has no split {split!r}; its splits are {sorted(splits)}')
    records = read(split)
  with _LOCK:
    _CACHE[key] = records
  return records


def _has_holdout(splits, folder: bool) -> bool:
  """Whether train is divided by the seeded holdout: a train split and no split to evaluate on."""
  return bool(splits) and 'train' in splits and _eval_split(splits, folder) == HOLDOUT


def _eval_split(splits, folder: bool) -> str:
  for name in FOLDER_SPLITS[1:] if folder else ('test',):
    if name in splits:
      return name
  return HOLDOUT


def resolve_test_split(
  dataset: str | os.PathLike[str], test_split: str = 'test', data_dir: str | os.PathLike[str] | None = None
) -> str:
  """The split that asking for `test_split` evaluates: `test_split` itself, except 'test' for a dataset
  without a test split: an image folder's `validation` (or `val`) folder, else 'holdout' (the seeded
  holdout of train)."""
  if test_split != 'test':
    return test_split
  dataset = os.fspath(dataset)
  folder = is_folder(dataset)
  splits = _folder_split_names(dataset) if folder else tfds_split_names(_tfds_builder(dataset, data_dir))
  return test_split if not splits or 'test' in splits else _eval_split(splits, folder)


def same_test_split(old: Any, new: Any) -> bool:
  """Whether the `test_split` of an existing workdir's config.json (`old`) names the split `new` does: a
  workdir written before the split was resolved says 'test' where a dataset without one means the holdout."""
  return old == new or (old == 'test' and new == HOLDOUT)


def check_folder_splits(root: str | os.PathLike[str], train_split: str, test_split: str) -> None:
  """The warnings and errors of an image folder's layout, before a run: a class folder of the evaluation split
  that train lacks is a DataError naming it; a train class without evaluation images, and a folder that is not
  a split, are warnings naming them."""
  root = pathlib.Path(root).expanduser()
  splits = _folder_split_names(root)
  others = [s for s in splits if s not in (*FOLDER_SPLITS, train_split, test_split)]
  if others:
    log.warning(
      'image folder %s: %s %s not a split (the splits are %s) and %s not read',
      root,
      ', '.join(f'{s}/' for s in others),
      'is' if len(others) == 1 else 'are',
      '/'.join(FOLDER_SPLITS),
      'is' if len(others) == 1 else 'are',
    )
  if test_split == HOLDOUT or train_split not in splits or test_split not in splits:
    return
  train, test = set(_class_folders(root / train_split)), set(_class_folders(root / test_split))
  extra = sorted(test - train)
  if extra:
    raise DataError(
      f'image folder {str(root)!r}: class folder(s) {", ".join(extra)} of {test_split}/ are not in '
      f'{train_split}/: the model could never predict them; add them to {train_split}/ or remove them from '
      f'{test_split}/'
    )
  empty = sorted(train - test)
  if empty:
    log.warning(
      'image folder %s: class(es) %s of %s/ have no %s/ images: they are not evaluated',
      root,
      ', '.join(empty),
      train_split,
      test_split,
    )


def _base_split(split: str) -> str:
  return split.split('[')[0].split('+')[0].strip()


def holdout_indices(labels: Any, fraction: Any = HOLDOUT_FRACTION, seed: Any = HOLDOUT_SEED) -> Any:
  """Returns (train_indices, test_indices): a stratified seeded holdout of `fraction` of each class."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(len(idx) * fraction))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _holdout(records: Records, split: str) -> Records:
  if records.streaming:
    raise DataError(
      f'{records.name!r} has no test split and its train split is streamed (larger than the memory budget), '
      'so it cannot be divided by the seeded holdout; give an explicit test split (e.g. "train[:5%]" as test '
      'and "train[5%:]" as train) or raise BIT_MAX_MEMORY_GB'
    )
  train, test = holdout_indices(records.labels)
  part = records.subset(train if split == 'train' else test)
  part = dataclasses.replace(
    part, split=split, holdout=True, unreadable=records.unreadable if split == 'train' else ()
  )
  if not len(part):
    raise DataError(
      f'the seeded {HOLDOUT_FRACTION:.0%} holdout of {records.name!r} split {records.split!r} '
      f'leaves no {split!r} examples ({len(records)} in all); add images, or a test/ split'
    )
  log.info(
    '%s has no test split: its %s split is the seeded %.0f%% holdout side of train (%d train, %d holdout)',
    records.name,
    split,
    100 * HOLDOUT_FRACTION,
    len(train),
    len(test),
  )
  return part


# ---------------------------------------------------------------------------------------------- folders


def _folder_split_names(root) -> list[str]:
  root = pathlib.Path(root).expanduser()
  return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))


def _class_folders(split_dir) -> list[str]:
  return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith('.'))


def folder_class_names(root: str | os.PathLike[str]) -> list[str]:
  """The class names of an image folder, sorted (the TFDS ImageFolder order): its train/ class folders, or
  without train/ the union over its splits."""
  root = pathlib.Path(root).expanduser()
  if (root / 'train').is_dir():
    return _class_folders(root / 'train')
  names = set()
  for split in _folder_split_names(root):
    names.update(_class_folders(root / split))
  return sorted(names)


def _probe(path):
  """Returns the `images.Header` of a decodable image, or the reason it cannot be used."""
  try:
    return images.read_header(path)
  except images.ImageDecodeError as e:
    return str(e).removeprefix(f'{path}: ')


def _read_folder(root, split: str) -> Records:
  root = pathlib.Path(root).expanduser()
  split_dir = root / split
  if not split_dir.is_dir():
    raise DataError(
      f'image folder {str(root)!r} has no split folder {split!r}; its splits are {_folder_split_names(root)}'
    )
  class_names = folder_class_names(root)
  present = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith('.'))
  if not present:
    raise DataError(
      f'split folder {str(split_dir)!r} has no class folders; expected {split_dir}/<class>/<image>'
    )
  unknown = [name for name in present if name not in class_names]
  if unknown:
    raise DataError(
      f'class folder(s) {", ".join(unknown)} of {split_dir} are not in {root / "train"}: the classes are '
      "train's; add them to train/ or remove them"
    )
  paths, labels = [], []
  for name in present:
    files = sorted(
      p for p in (split_dir / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
      raise DataError(
        f'class folder {str(split_dir / name)!r} holds no images ({"/".join(IMAGE_EXTENSIONS)}); '
        'add images or remove the folder'
      )
    paths += [str(f) for f in files]
    labels += [class_names.index(name)] * len(files)
  # Reading the headers finds files that are not images (or not a format TensorFlow decodes) before the run
  # and gives the sizes; threads because this is file I/O.
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    probes = list(pool.map(_probe, paths))
  keep, headers = [], []
  for i, p in enumerate(probes):
    if isinstance(p, str):
      log.warning('skipping unreadable image %s (%s)', paths[i], p)
    else:
      keep.append(i)
      headers.append(p)
  if not keep:
    raise DataError(f'split folder {str(split_dir)!r} has no readable images')
  skipped = len(paths) - len(keep)
  if skipped:
    log.warning('%d unreadable file(s) skipped in %s', skipped, split_dir)
  sizes = np.array([h[:2] for h in headers])
  return Records(
    name=str(root),
    split=split,
    labels=np.array(labels, np.int64)[keep],
    payload=np.array(paths, dtype=object)[keep],
    is_path=True,
    class_names=tuple(class_names),
    image_size=(int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1]))),
    sizes=sizes.astype(np.int64),
    headers=np.array([h[2:] for h in headers], np.int32),
    unreadable=tuple(paths[i] for i, p in enumerate(probes) if isinstance(p, str)),
  )


# ---------------------------------------------------------------------------------------------- TFDS


def _tfds_builder(name, data_dir):
  tf_hidden()
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - TFDS raises several types for an unknown name, config or version
    raise DataError(_unknown_tfds_message(tfds, name, e)) from None
  for key in ('image', 'label'):
    if key not in builder.info.features:
      raise DataError(
        f'TFDS dataset {name!r} has no {key!r} feature (features: {list(builder.info.features)}); '
        'only image classification datasets with image and label features are supported'
      )
  try:
    # Like tfds.load: prepare on first use (imagenet2012 needs its files in <data_dir>/downloads/manual).
    builder.download_and_prepare()
  except Exception as e:  # noqa: BLE001
    raise DataError(_prepare_error_message(name, builder, e)) from e
  return builder


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()
  text = text[0] if text else type(e).__name__
  return text if len(text) <= limit else text[: limit - 3] + '...'


def _unknown_tfds_message(tfds, name: str, e: BaseException) -> str:
  """What is wrong with a dataset name TFDS refused: a few close names, never TFDS's whole catalogue."""
  import difflib

  base = name.split(':')[0].split('/')[0].strip()
  known = tfds.list_builders(with_community_datasets=False)
  if base in known:  # the name is right, its config or version is not
    return f'TFDS dataset {name!r} cannot be built ({_first_line(e)}); fix dataset={name!r}'
  close = difflib.get_close_matches(base, known, n=3, cutoff=0.6)
  hint = (
    f'did you mean {" or ".join(repr(c) for c in close)}?' if close else 'tfds.list_builders() lists them'
  )
  return (
    f'dataset={name!r} is neither an image folder nor a TFDS dataset ({hint}); give a TFDS name such as '
    "'cifar10' or a folder ROOT/<split>/<class>/<image>"
  )


def _network_failure(e: BaseException) -> BaseException | None:
  """The exception in `e`'s chain that says the network (or a host) could not be reached, if any."""
  import socket
  import urllib.error

  kinds = [ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError]
  try:
    import requests

    kinds += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
  except ImportError:  # pragma: no cover - requests is a dependency
    pass
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, tuple(kinds)):
      return e
    e = e.__cause__ or e.__context__
  return None


def _prepare_error_message(name: str, builder, e: BaseException) -> str:
  """One line on why TFDS could not download or prepare `name`, and what to do about it."""
  import re

  where = f'in {builder.data_dir}'
  if isinstance(e, ImportError) and getattr(e, 'name', None):
    package = e.name.split('.')[0]
    return (
      f'preparing TFDS dataset {name!r} needs the Python package {package!r}, which is not installed: '
      f'pip install {package.replace("_", "-")}, then rerun'
    )
  network = _network_failure(e)
  if network is not None:
    host = re.search(r"host='([^']+)'", str(network))
    what = f'{host.group(1)} cannot be reached' if host else 'the download failed'
    return (
      f'could not download TFDS dataset {name!r}: {what} ({type(network).__name__}: the network is '
      'unreachable from here, or blocked). Connect this machine to the internet (behind a proxy: set '
      f'HTTPS_PROXY) and rerun, or prepare {name!r} on a machine that has a network and copy its TFDS data '
      f"folder (~/tensorflow_datasets/{builder.name}) here, passing that folder's parent as data_dir="
    )
  return f'could not download and prepare TFDS dataset {name!r} {where}: {_first_line(e)}'


def tfds_split_names(builder: Any) -> list[str]:
  """The splits a TFDS builder declares (empty when its metadata is unknown, as under mock data)."""
  return list(builder.info.splits.keys())


def _split_metadata(builder, split: str) -> tuple[int | None, int | None]:
  """(num_bytes, num_examples) of a split (slices too) from the TFDS metadata; None where unknown."""
  try:
    info = builder.info.splits[split]
  except Exception:  # noqa: BLE001 - no metadata (mock data) or a split string TFDS cannot size
    return None, None
  return int(info.num_bytes or 0) or None, int(info.num_examples)


def as_encoded_dataset(
  builder: Any, name: str, split: str, *, shuffle_files: bool = False, read_config: Any = None
) -> Any:
  """TFDS's tf.data reader of `split` with every image kept encoded: elements `(image_bytes, label)`."""
  import tensorflow_datasets as tfds

  # Keep every image encoded: decoding happens per example in the pipeline (and a segmentation mask
  # would otherwise be decoded for nothing).
  decoders = {
    k: tfds.decode.SkipDecoding()
    for k, f in builder.info.features.items()
    if isinstance(f, tfds.features.Image)
  }
  kwargs = {} if read_config is None else {'read_config': read_config}
  try:
    ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=shuffle_files, **kwargs)
  except Exception as e:  # noqa: BLE001
    raise DataError(f'TFDS dataset {name!r} cannot read split {split!r}: {e}') from e
  return ds.map(lambda ex: (ex['image'], ex['label']))


def _class_names(builder, labels=None) -> tuple[str, ...]:
  label_feature = builder.info.features['label']
  names = getattr(label_feature, 'names', None)
  if names:
    return tuple(names)
  if labels is not None:
    return tuple(str(i) for i in range(int(labels.max()) + 1))
  count = getattr(label_feature, 'num_classes', None)
  if not count:
    raise DataError(
      f'TFDS dataset {builder.name!r} does not declare its classes (label feature {label_feature}); '
      'it cannot be streamed: raise BIT_MAX_MEMORY_GB so it is read into memory'
    )
  return tuple(str(i) for i in range(int(count)))


def _fixed_image_size(builder) -> tuple[int, int] | None:
  shape = builder.info.features['image'].shape
  if shape[0] is not None and shape[1] is not None:
    return int(shape[0]), int(shape[1])
  return None


def _read_tfds(builder, name, split: str, budget: float) -> Records:
  num_bytes, _ = _split_metadata(builder, split)
  # Budget 0 streams every split, also those whose size the metadata does not give (mock data).
  if budget <= 0 or (num_bytes or 0) > budget:
    return _stream_tfds(builder, name, split, num_bytes)
  ds = as_encoded_dataset(builder, name, split).batch(1024)
  images, labels = [], []
  for im, lab in ds.as_numpy_iterator():
    images.extend(im.tolist())
    labels.append(lab)
  if not images:
    raise DataError(f'split {split!r} of TFDS dataset {name!r} is empty')
  labels = np.concatenate(labels).astype(np.int64)
  payload = np.empty(len(images), dtype=object)
  payload[:] = images
  log.info(
    'read %s split %s: %d examples, %.1f MB encoded',
    name,
    split,
    len(images),
    sum(len(b) for b in images) / 1e6,
  )
  return Records(
    name=name,
    split=split,
    labels=labels,
    payload=payload,
    is_path=False,
    class_names=_class_names(builder, labels),
    image_size=_fixed_image_size(builder) or _typical_size_of_bytes(payload),
  )


def _stream_tfds(builder, name, split: str, num_bytes) -> Records:
  """The metadata of a split too large for memory: size, classes, typical image size from a small sample."""
  _, n = _split_metadata(builder, split)
  ds = as_encoded_dataset(builder, name, split)
  if n is None:
    n = int(ds.cardinality())
  if n < 0:  # neither metadata nor a known cardinality: count the records (read, never decoded)
    n = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
  if n == 0:
    raise DataError(f'split {split!r} of TFDS dataset {name!r} is empty')
  image_size = _fixed_image_size(builder)
  if image_size is None:
    sample = np.empty(min(SIZE_SAMPLE, n), dtype=object)
    sample[:] = [im for im, _ in ds.take(SIZE_SAMPLE).as_numpy_iterator()]
    image_size = _typical_size_of_bytes(sample)
  log.info(
    '%s split %s is streamed from its files (%d examples, %s encoded, above the memory budget)',
    name,
    split,
    n,
    'unknown size' if num_bytes is None else f'{num_bytes / 1e9:.1f} GB',
  )
  return Records(
    name=name,
    split=split,
    labels=None,
    payload=None,
    is_path=False,
    class_names=_class_names(builder),
    image_size=image_size,
    streaming=True,
    num_examples=n,
    builder=builder,
  )


def streamed_labels(records: Records) -> np.ndarray:
  """The labels (N,) of a streamed split in its file order: one pass that reads every record and decodes only
  the labels (cached for the life of the process)."""

  def read():
    log.info(
      'reading the labels of streamed %s split %s (images are not decoded)', records.name, records.split
    )
    ds = as_encoded_dataset(records.builder, records.name, records.split).map(lambda im, lab: lab)
    return records, np.concatenate(list(ds.batch(8192).as_numpy_iterator())).astype(np.int64)

  return memoized(('labels', id(records)), read)


def gather_streamed(records: Records, indices: Any) -> Records:
  """An in-memory Records of the examples at `indices` (positions in file order) of a streamed split: one
  pass that reads every record and keeps only the chosen ones encoded (for few-shot subsets)."""
  tf = tf_hidden()
  indices = np.unique(np.asarray(indices, np.int64))
  keep = np.zeros(len(records), bool)
  keep[indices] = True
  keep_t = tf.constant(keep)
  ds = as_encoded_dataset(records.builder, records.name, records.split).enumerate()
  ds = ds.filter(lambda i, ex: tf.gather(keep_t, tf.minimum(i, len(records) - 1)) & (i < len(records)))
  images, labels = [], []
  for _, (im, lab) in ds.as_numpy_iterator():
    images.append(im)
    labels.append(lab)
  if len(images) != len(indices):
    raise DataError(
      f'{records.name!r} split {records.split!r}: read {len(images)} of the {len(indices)} chosen examples; '
      'the split changed since its labels were read'
    )
  payload = np.empty(len(images), dtype=object)
  payload[:] = images
  return dataclasses.replace(
    records,
    labels=np.array(labels, np.int64),
    payload=payload,
    streaming=False,
    num_examples=0,
    builder=None,
  )


def tf_hidden() -> Any:
  """Returns the tensorflow module, with TensorFlow kept off the GPUs (JAX owns them)."""
  global _TF_READY
  import tensorflow as tf

  if not _TF_READY:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # devices already initialized by someone else: nothing more we can do
      pass
    _TF_READY = True
  return tf


def _typical_size_of_bytes(payload) -> tuple[int, int]:
  import io

  from PIL import Image

  rng = np.random.default_rng(0)
  sample = rng.choice(len(payload), size=min(SIZE_SAMPLE, len(payload)), replace=False)
  sizes = []
  for i in sample:
    try:
      with Image.open(io.BytesIO(payload[i])) as im:
        sizes.append(im.size[::-1])
    except Exception:  # noqa: BLE001,S112 - a bad record is reported when the pipeline decodes it
      continue
  if not sizes:
    raise DataError('no image of the dataset sample could be read to find the typical image size')
  sizes = np.array(sizes)
  return int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1]))


def memoized(key: Any, make: Any) -> Any:
  """`make()` once per `key` for the life of the process (until clear_cache); `make` returns (keep, value),
  `keep` an object held so that an id() inside `key` stays unique."""
  with _LOCK:
    if key in _CACHE:
      return _CACHE[key][1]
  keep, value = make()
  with _LOCK:
    _CACHE[key] = (keep, value)
  return value
