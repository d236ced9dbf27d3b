"""Benchmark of the training input pipeline: images/s from files to host batches (decode, resize, crop, flip,
MixUp), without any model.

  python -m bit.tools.input_speed --folder ROOT        # an image folder ROOT/<split>/<class>/<image>
  python -m bit.tools.input_speed                      # generates real-size JPEGs in a temporary folder
  python -m bit.tools.input_speed --format png --image-size 32x32 --crop 32 --decoded-cache-gb 0   # no cache
  python -m bit.tools.input_speed --dataset cifar10 --mock-examples 2000 --crop 32    # TFDS (here mock data)

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
) -> pathlib.Path:
  """Writes `num_images` photo-like JPEGs (or PNGs) of `size` (h, w) into root/train/<class>/; returns root.

  The images are smooth color fields with fine noise, so their file size and decode cost are close to real
  photos (pure noise would compress far worse; flat colors far better).
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
      Image.fromarray(photo).save(folder / f'{i:05d}.jpg', quality=90)
  return root


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
  dataset: Any = None,
  mock_examples: int = 0,
  decoded_cache_gb: float | None = None,
  max_memory_gb: float | None = None,
) -> dict[str, Any]:
  """Measures the training pipeline on `folder` (generated in a temporary folder when None), or on the TFDS
  `dataset` (with `mock_examples` > 0, on `tfds.testing.mock_data` of that many examples).

  `decoded_cache_gb` and `max_memory_gb` are the pipeline's decoded-cache and streaming budgets (None: the
  defaults). `resize` defaults to the project's training rule for the folder's typical image size and `crop`
  (`hyperrule.train_resolution`). Returns a dict with `images_per_sec` (steady state, after `warmup`
  batches) and the settings used.
  """
  import contextlib

  from bit import data, data_sources, hyperrule

  with contextlib.ExitStack() as stack:
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix='bit_bench_data_'))
    generated = folder is None and dataset is None
    if dataset is not None:
      folder = dataset
      if mock_examples:
        import tensorflow_datasets as tfds

        stack.enter_context(tfds.testing.mock_data(num_examples=int(mock_examples)))
    elif generated:
      folder = make_jpeg_folder(
        tmp, num_images=num_images, size=image_size, seed=seed, image_format=image_format
      )
    data_sources.clear_cache()  # the decoded cache (and its one-time cost) is part of what is measured
    info = data.get_info(str(folder), train_split=split, test_split=split, max_memory_gb=max_memory_gb)
    if resize is None:
      resize, crop = hyperrule.train_resolution(info.image_size, crop=crop)
    first = time.perf_counter()
    it = data.train_iterator(
      str(folder),
      split=split,
      global_batch_size=global_batch_size,
      resize=resize,
      crop=crop,
      num_classes=info.num_classes,
      mixup_alpha=mixup_alpha,
      seed=seed,
      max_memory_gb=max_memory_gb,
      decoded_cache_gb=decoded_cache_gb,
    )
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    setup = start - first
    for _ in range(steps):
      batch = next(it)
    seconds = time.perf_counter() - start
    assert batch['image'].shape == (global_batch_size, crop, crop, 3)
  return {
    'benchmark': 'input_pipeline',
    'images_per_sec': round(steps * global_batch_size / seconds, 1),
    'seconds': round(seconds, 3),
    'setup_seconds': round(setup, 3),  # iterator creation + warmup batches (includes any one-time decode)
    'steps': steps,
    'batch_size': global_batch_size,
    'resize': resize,
    'crop': crop,
    'mixup_alpha': mixup_alpha,
    'folder': None if generated else str(folder),
    'image_format': image_format if generated else None,
    'decoded_cache_gb': data_sources.decoded_cache_bytes(decoded_cache_gb) / 1e9,
    'train_size': info.train_size,
    'image_size': list(info.image_size),
    'cpus': os.cpu_count(),
  }


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
  p.add_argument('--dataset', help='a TFDS dataset name instead of a folder')
  p.add_argument(
    '--mock-examples', type=int, default=0, help='with --dataset: use TFDS mock data of N examples'
  )
  p.add_argument('--decoded-cache-gb', type=float, default=None, help='decoded-cache budget (0 = off)')
  p.add_argument('--max-memory-gb', type=float, default=None, help='streaming budget (0 = stream TFDS)')
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
    dataset=args.dataset,
    mock_examples=args.mock_examples,
    decoded_cache_gb=args.decoded_cache_gb,
    max_memory_gb=args.max_memory_gb,
  )
  print(
    f'input pipeline: {result["images_per_sec"]:.1f} images/s '
    f'(batch {args.batch_size}, resize {result["resize"]}, crop {result["crop"]}, {result["cpus"]} CPUs)'
  )
  print(json.dumps(result))


if __name__ == '__main__':
  main()
