"""timm's ResNetV2 (PyTorch) at the settings of `python -m bit.tools.speed`, for a same-machine comparison.

Not part of the package or the test suite; run it from a separate venv so torch never enters bit's:

  python3 -m venv ~/timmvenv
  ~/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
  ~/timmvenv/bin/python benchmarks/timm_compare.py --depth 50 --size 128 --batch 16

It prints, last, one JSON line with train_images_per_sec (forward + backward + SGD momentum 0.9, softmax
cross-entropy) and infer_images_per_sec (eval mode, torch.inference_mode), each the median over --steps
timed steps after --warmup untimed ones, and the same-run fp32 matmul GFLOP/s.
"""

import argparse
import functools
import json
import os
import statistics
import time

import timm
import torch
from timm.layers import StdConv2d
from timm.models.resnetv2 import ResNetV2

LAYERS = {26: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def matmul_gflops(n=1024, repeats=7):
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times) / 1e9


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--depth', type=int, default=50, choices=sorted(LAYERS))
  ap.add_argument('--width', type=int, default=1)
  ap.add_argument('--size', type=int, default=128)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--classes', type=int, default=1000)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--channels-last', action='store_true', help='NHWC memory format')
  a = ap.parse_args()

  # BiT's standardized conv (eps 1e-8 as in timm's BiT models), 'fixed' stem = symmetric zero padding.
  model = ResNetV2(
    layers=LAYERS[a.depth],
    num_classes=a.classes,
    width_factor=a.width,
    stem_type='fixed',
    conv_layer=functools.partial(StdConv2d, eps=1e-8),
  )
  x = torch.rand(a.batch, 3, a.size, a.size) * 2 - 1
  y = torch.randint(0, a.classes, (a.batch,))
  if a.channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  model.train()
  for _ in range(a.warmup):
    train_step()
  train_times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    train_step()
    train_times.append(time.perf_counter() - t0)

  model.eval()
  infer_times = []
  with torch.inference_mode():
    for _ in range(a.warmup):
      model(x)
    for _ in range(a.steps):
      t0 = time.perf_counter()
      model(x)
      infer_times.append(time.perf_counter() - t0)

  result = {
    'impl': f'timm {timm.__version__} / torch {torch.__version__}',
    'model': f'R{a.depth}x{a.width}',
    'size': a.size,
    'batch': a.batch,
    'threads': torch.get_num_threads(),
    'channels_last': a.channels_last,
    'matmul_peak_gflops': round(matmul_gflops(), 2),
    'load_avg_1m': round(os.getloadavg()[0], 2),
    'train_images_per_sec': round(a.batch / statistics.median(train_times), 2),
    'infer_images_per_sec': round(a.batch / statistics.median(infer_times), 2),
  }
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
