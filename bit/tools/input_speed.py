"""Benchmark of the training input pipeline: images/s from files to host batches (decode, resize, crop, flip,
MixUp), without any model.

  python -m bit.tools.input_speed --folder ROOT        # an image folder ROOT/<split>/<class>/<image>
  python -m bit.tools.input_speed                      # generates real-size JPEGs in a temporary folder
  python -m bit.tools.input_speed --format png --image-size 32x32 --crop 32 --decoded-cache-gb 0   # no cache
  python -m bit.tools.input_speed --dataset cifar10 --mock-examples 2000 --crop 32    # TFDS (here mock data)
  taskset -c 0 python -m bit.tools.input_speed --decoded-cache-gb 0 --compare-tf --rounds 3   # against tf.data

Figures are images/s and images/s per core (the cores of the affinity mask, `taskset`). `--compare-tf` times
plain tf.data on the same files (`tf.io.decode_jpeg`, resize, random crop, flip, batch) in rounds alternating
with bit's, so both see the same machine load.

The last line printed is one JSON object with the result. `pipeline_images_per_sec(...)` is the same
measurement as a number for other benchmark modules (`pipeline_benchmark(...)` gives the whole record).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from typing import Any

import numpy as np


def make_jpeg_folder(
  root: str | os.PathLike[str],
  *,
  num_images: int = 256,
  num_classes: int = 4,
  size: Any = (375, 500),
  seed: int = 0,
  image_format: str = 'jpeg',
  exif: bool = False,
) -> pathlib.Path:
  """Writes `num_images` photo-like JPEGs (or PNGs) of `size` (h, w) into root/train/<class>/; returns root.

  The images are smooth color fields with fine noise, so their file size and decode cost are close to real
  photos (pure noise would compress far worse; flat colors far better). With `exif`, each JPEG carries a
  camera's EXIF segment, orientation 1 and 6 in turn (a phone's landscape and portrait photos).
  """
  from PIL import Image

  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  h, w = size
  for i in range(num_images):
    folder = root / 'train' / f'class{i % num_classes:03d}'
    folder.mkdir(parents=True, exist_ok=True)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    photo = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    if image_format == 'png':
      Image.fromarray(photo).save(folder / f'{i:05d}.png')
    else:
      tags = Image.Exif()
      tags.update({0x010F: 'Camera maker', 0x0110: 'Camera model', 0x0112: (1, 6)[i % 2]})
      Image.fromarray(photo).save(folder / f'{i:05d}.jpg', quality=90, exif=tags.tobytes() if exif else b'')
  return root


def cores() -> int:
  """The CPU cores this process may run on (its affinity mask: `taskset -c 0,1` gives 2)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # no affinity masks (macOS)
    return os.cpu_count() or 1


def plain_tf_dataset(folder, split, *, batch, resize, crop, seed=0):
  """The plain tf.data reference: `tf.io.decode_jpeg` (its defaults), `tf.image.resize` to `resize` x `resize`,
  random crop `crop`, random flip, batch; the files of folder/split/<class>/ in a shuffled endless stream."""
  from bit import data_sources

  tf = data_sources.tf_hidden()
  files = sorted(str(f) for f in pathlib.Path(folder, split).glob('*/*') if f.is_file())

  def example(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    image = tf.image.resize(image, [resize, resize])
    image = tf.image.random_crop(image, [crop, crop, 3])
    return tf.image.random_flip_left_right(image)

  ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed).repeat()
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _images_per_sec(batches, *, batch, steps, warmup) -> tuple[float, float, tuple]:
  """(images/s over `steps` batches after `warmup` ones, seconds to the first timed batch, last batch shape)."""
  first = time.perf_counter()
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    last = next(batches)
  seconds = time.perf_counter() - start
  image = last['image'] if isinstance(last, dict) else last
  return steps * batch / seconds, start - first, tuple(image.shape)


def pipeline_benchmark(
  folder: str | os.PathLike[str] | None = None,
  *,
  split: str = 'train',
  global_batch_size: int = 64,
  resize: int | None = None,
  crop: int = 224,
  steps: int = 20,
  warmup: int = 3,
  mixup_alpha: float = 0.0,
  num_images: int = 256,
  image_size: Any = (375, 500),
  seed: int = 0,
  image_format: str = 'jpeg',
  exif: bool = False,
  dataset: Any = None,
  mock_examples: int = 0,
  decoded_cache_gb: float | None = None,
  max_memory_gb: float | None = None,
  rounds: int = 1,
  compare_tf: bool = False,
) -> dict[str, Any]:
  """Measures the training pipeline on `folder` (generated in a temporary folder when None), or on the TFDS
  `dataset` (with `mock_examples` > 0, on `tfds.testing.mock_data` of that many examples).

  `decoded_cache_gb` and `max_memory_gb` are the pipeline's decoded-cache and streaming budgets (None: the
  defaults). `resize` defaults to the project's training rule for the folder's typical image size and `crop`
  (`hyperrule.train_resolution`). `rounds` times the pipeline that many times (a fresh iterator each) and
  reports the median; with `compare_tf` (a folder of JPEGs) each round is followed by one of the plain tf.data
  reference (`plain_tf_dataset`) on the same files at the same sizes, so both see the same machine load.
  Returns a dict with `images_per_sec` (steady state, after `warmup` batches), `images_per_sec_per_core`
  (over `cores`, the affinity mask), the plain figures and ratios with `compare_tf`, and the settings used.
  """
  import contextlib
  import statistics

  from bit import data, data_sources, hyperrule

  with contextlib.ExitStack() as stack:
    generated = folder is None and dataset is None
    generate = dict(num_images=num_images, size=image_size, seed=seed, image_format=image_format, exif=exif)
    folder = _benchmark_source(stack, folder, dataset, mock_examples, compare_tf, generate)
    info = data.get_info(str(folder), train_split=split, test_split=split, max_memory_gb=max_memory_gb)
    if resize is None:
      resize, crop = hyperrule.train_resolution(info.image_size, crop=crop)
    timing = dict(batch=global_batch_size, steps=steps, warmup=warmup)
    iterator_kwargs = dict(
      split=split,
      global_batch_size=global_batch_size,
      resize=resize,
      crop=crop,
      num_classes=info.num_classes,
      mixup_alpha=mixup_alpha,
      max_memory_gb=max_memory_gb,
      decoded_cache_gb=decoded_cache_gb,
    )
    bit_runs, tf_runs, setups = _timed_rounds(folder, int(rounds), seed, compare_tf, timing, iterator_kwargs)
  n = cores()
  ips = statistics.median(bit_runs)
  result = {
    'benchmark': 'input_pipeline',
    'images_per_sec': round(ips, 1),
    'images_per_sec_per_core': round(ips / n, 1),
    'rounds': [round(x, 1) for x in bit_runs],
    'setup_seconds': round(setups[0], 3),  # iterator creation + warmup batches (includes any one-time decode)
    'steps': steps,
    'batch_size': global_batch_size,
    'resize': resize,
    'crop': crop,
    'mixup_alpha': mixup_alpha,
    'folder': None if generated else str(folder),
    'image_format': image_format if generated else None,
    'exif': exif if generated else None,
    'decoded_cache_gb': data_sources.decoded_cache_bytes(decoded_cache_gb) / 1e9,
    'train_size': info.train_size,
    'image_size': list(info.image_size),
    **_machine(n),
  }
  if compare_tf:
    result.update(_plain_tf_figures(tf_runs, ips, n))
  return result


def _machine(n):
  """The machine the figures were measured on: `n` cores in the affinity mask, all CPUs, the 1-minute load."""
  return {'cores': n, 'cpus': os.cpu_count(), 'load_avg_1m': round(os.getloadavg()[0], 2)}


def _benchmark_source(stack, folder, dataset, mock_examples, compare_tf, generate):
  """What to measure: the TFDS `dataset` (under `tfds.testing.mock_data` with `mock_examples`), else `folder`,
  else a folder of `generate` (`make_jpeg_folder` arguments) in a temporary folder; contexts go on `stack`."""
  tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix='bit_bench_data_'))
  if dataset is not None:
    if compare_tf:
      raise ValueError('compare_tf needs a folder of JPEGs (no dataset)')
    if mock_examples:
      import tensorflow_datasets as tfds

      stack.enter_context(tfds.testing.mock_data(num_examples=int(mock_examples)))
    return dataset
  if folder is None:
    return make_jpeg_folder(tmp, **generate)
  return folder


def _timed_rounds(folder, rounds, seed, compare_tf, timing, iterator_kwargs):
  """Images/s and setup seconds of `rounds` fresh training iterators (seed + round), each followed with
  `compare_tf` by one round of the plain tf.data reference: (bit_runs, tf_runs, setups)."""
  from bit import data, data_sources

  bit_runs, tf_runs, setups = [], [], []
  batch, resize, crop = (
    iterator_kwargs['global_batch_size'],
    iterator_kwargs['resize'],
    iterator_kwargs['crop'],
  )
  for r in range(rounds):
    data_sources.clear_cache()  # the decoded cache (and its one-time cost) is part of what is measured
    it = data.train_iterator(str(folder), seed=seed + r, **iterator_kwargs)
    ips, setup, shape = _images_per_sec(it, **timing)
    assert shape == (batch, crop, crop, 3)
    bit_runs.append(ips)
    setups.append(setup)
    del it
    if compare_tf:
      split = iterator_kwargs['split']
      ds = plain_tf_dataset(folder, split, batch=batch, resize=resize, crop=crop, seed=seed + r)
      tf_runs.append(_images_per_sec(ds.as_numpy_iterator(), **timing)[0])
  return bit_runs, tf_runs, setups


def _plain_tf_figures(tf_runs, ips, n):
  """The plain tf.data reference's median figures over `n` cores and bit's ratio to it."""
  import statistics

  plain = statistics.median(tf_runs)
  return dict(
    plain_tf_images_per_sec=round(plain, 1),
    plain_tf_images_per_sec_per_core=round(plain / n, 1),
    plain_tf_rounds=[round(x, 1) for x in tf_runs],
    bit_over_plain_tf=round(ips / plain, 3),
  )


def pipeline_images_per_sec(folder: str | os.PathLike[str] | None = None, **kwargs: Any) -> float:
  """The training pipeline's steady-state images/s on `folder`; keyword arguments as `pipeline_benchmark`."""
  return pipeline_benchmark(folder, **kwargs)['images_per_sec']


def main(argv: Any = None) -> None:
  """Command line entry: prints a summary line, then the result as one JSON object on the last line."""
  p = argparse.ArgumentParser(
    prog='python -m bit.tools.input_speed',
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--folder', help='image folder ROOT/<split>/<class>/<image> (default: generate JPEGs)')
  p.add_argument('--split', default='train')
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--resize', type=int, default=None, help='default: the training rule for the crop')
  p.add_argument('--crop', type=int, default=224)
  p.add_argument('--steps', type=int, default=20, help='timed batches')
  p.add_argument('--warmup', type=int, default=3, help='untimed batches first')
  p.add_argument('--mixup-alpha', type=float, default=0.0)
  p.add_argument('--num-images', type=int, default=256, help='images to generate without --folder')
  p.add_argument('--image-size', default='375x500', help='HxW of generated images')
  p.add_argument('--format', default='jpeg', choices=['jpeg', 'png'], help='format of generated images')
  p.add_argument(
    '--exif', action='store_true', help='generated JPEGs carry camera EXIF (orientations 1 and 6 in turn)'
  )
  p.add_argument('--dataset', help='a TFDS dataset name instead of a folder')
  p.add_argument(
    '--mock-examples', type=int, default=0, help='with --dataset: use TFDS mock data of N examples'
  )
  p.add_argument('--decoded-cache-gb', type=float, default=None, help='decoded-cache budget (0 = off)')
  p.add_argument('--max-memory-gb', type=float, default=None, help='streaming budget (0 = stream TFDS)')
  p.add_argument(
    '--rounds', type=int, default=1, help='timed rounds (alternating with --compare-tf); the median'
  )
  p.add_argument(
    '--compare-tf', action='store_true', help='also time plain tf.data (decode_jpeg, resize, crop, flip)'
  )
  args = p.parse_args(argv)
  from bit import runtime

  runtime.configure_tool()  # as the other tools, before TensorFlow and JAX start
  h, w = (int(x) for x in args.image_size.lower().split('x'))
  result = pipeline_benchmark(
    args.folder,
    split=args.split,
    global_batch_size=args.batch_size,
    resize=args.resize,
    crop=args.crop,
    steps=args.steps,
    warmup=args.warmup,
    mixup_alpha=args.mixup_alpha,
    num_images=args.num_images,
    image_size=(h, w),
    image_format=args.format,
    exif=args.exif,
    dataset=args.dataset,
    mock_examples=args.mock_examples,
    decoded_cache_gb=args.decoded_cache_gb,
    max_memory_gb=args.max_memory_gb,
    rounds=args.rounds,
    compare_tf=args.compare_tf,
  )
  print(
    f'input pipeline: {result["images_per_sec"]:.1f} images/s, {result["images_per_sec_per_core"]:.1f} per core '
    f'(batch {args.batch_size}, resize {result["resize"]}, crop {result["crop"]}, {result["cores"]} cores)'
  )
  if args.compare_tf:
    print(
      f'plain tf.data: {result["plain_tf_images_per_sec"]:.1f} images/s, '
      f'{result["plain_tf_images_per_sec_per_core"]:.1f} per core; bit/plain {result["bit_over_plain_tf"]:.3f}'
    )
  print(json.dumps(result))


if __name__ == '__main__':
  main()
