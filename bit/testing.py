"""Random BiT checkpoints in the official .npz layout for tests and the accelerator check.

The official BiT checkpoints (BiT-S/BiT-M *.npz) cannot be downloaded on the development machines, so parity
tests use random weights in exactly the same layout: the same key names, HWIO kernels, 1-D GroupNorm
gamma/beta, a 1x1 conv head. GroupNorm parameters are random too, so a mistake in their mapping shows up in
the logits. The stream comes from numpy.random.default_rng(seed) (PCG64), which is stable across numpy
versions: the golden fixtures under tests/data are made from these seeds (tests/data/README.md).

`tests/make_checkpoint.py` writes one to a file from the command line.
"""

from __future__ import annotations

import numpy as np

from bit.models import BLOCKS

__all__ = ['images', 'random_checkpoint']


def random_checkpoint(depth: int, width: int, classes: int, seed: int) -> dict[str, np.ndarray]:
  """A random R{depth}x{width} checkpoint with a `classes`-way head: official key name -> float32 array."""
  rng = np.random.default_rng(seed)
  w = {}

  def conv(name, kh, kw, cin, cout):
    std = np.sqrt(2.0 / (kh * kw * cin))
    w[name] = (rng.standard_normal((kh, kw, cin, cout)) * std).astype(np.float32)

  def group_norm(name, c):
    w[name + '/gamma'] = (1.0 + 0.2 * rng.standard_normal(c)).astype(np.float32)
    w[name + '/beta'] = (0.2 * rng.standard_normal(c)).astype(np.float32)

  base = 64 * width
  conv('resnet/root_block/standardized_conv2d/kernel', 7, 7, 3, base)
  cin = base
  for b, units in enumerate(BLOCKS[depth], 1):
    mid = base * 2 ** (b - 1)
    for u in range(1, units + 1):
      p = f'resnet/block{b}/unit{u:02d}/'
      group_norm(p + 'a/group_norm', cin)
      conv(p + 'a/standardized_conv2d/kernel', 1, 1, cin, mid)
      group_norm(p + 'b/group_norm', mid)
      conv(p + 'b/standardized_conv2d/kernel', 3, 3, mid, mid)
      group_norm(p + 'c/group_norm', mid)
      conv(p + 'c/standardized_conv2d/kernel', 1, 1, mid, 4 * mid)
      if u == 1:
        conv(p + 'a/proj/standardized_conv2d/kernel', 1, 1, cin, 4 * mid)
      cin = 4 * mid
  group_norm('resnet/group_norm', cin)
  w['resnet/head/conv2d/kernel'] = (0.05 * rng.standard_normal((1, 1, cin, classes))).astype(np.float32)
  w['resnet/head/conv2d/bias'] = (0.05 * rng.standard_normal(classes)).astype(np.float32)
  return w


def images(n: int, size: int, seed: int) -> np.ndarray:
  """The test inputs that go with a golden fixture: NHWC float32 in [-1, 1]."""
  return np.random.default_rng(seed + 1000).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
