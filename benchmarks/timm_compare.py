"""timm's ResNetV2 (PyTorch) at the settings of `python -m bit.tools.speed`: eager, torch.compile and ONNX.

Not part of the package or the test suite; run it from a separate venv so torch never enters bit's:

  python3 -m venv ~/torchvenv
  ~/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm onnx onnxruntime onnxscript
  ~/torchvenv/bin/python benchmarks/timm_compare.py --depth 50 --size 128 --batch 16

In one run, in this order (`--modes` picks some):
- eager: train_images_per_sec (forward + backward + SGD momentum 0.9, softmax cross-entropy) and
  infer_images_per_sec (eval mode, torch.inference_mode);
- compile: the same under `torch.compile` (default mode, inductor; needs a C compiler), the model compiled
  and the optimizer step left eager as a user would write it: compile_train_images_per_sec,
  compile_infer_images_per_sec, and the seconds of the first (compiling) calls;
- onnx: the eval model exported with `torch.onnx.export` (the dynamo exporter, opset 18) and run in
  onnxruntime's CPU provider with as many intra-op threads as torch uses: onnx_infer_images_per_sec and
  onnx_export_seconds.
Each figure is the median over --steps timed calls after --warmup untimed ones. It prints, last, one JSON line
with them and the same-run fp32 matmul GFLOP/s.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import timm
import torch
from timm.layers import StdConv2d
from timm.models.resnetv2 import ResNetV2

MODES = ('eager', 'compile', 'onnx')
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


def median_seconds(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def first_call_seconds(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def make_train_step(model, x, y):
  opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  return train_step


def images_per_sec(batch: int, seconds: float) -> float:
  return round(batch / seconds, 2)


def measure_eager(model, x, y, a, result):
  model.train()
  result['train_images_per_sec'] = images_per_sec(
    a.batch, median_seconds(make_train_step(model, x, y), a.steps, a.warmup)
  )
  model.eval()
  with torch.inference_mode():
    result['infer_images_per_sec'] = images_per_sec(
      a.batch, median_seconds(lambda: model(x), a.steps, a.warmup)
    )


def measure_compile(model, x, y, a, result):
  compiled = torch.compile(model)
  model.train()
  step = make_train_step(compiled, x, y)
  result['compile_train_first_call_seconds'] = round(first_call_seconds(step), 2)
  result['compile_train_images_per_sec'] = images_per_sec(a.batch, median_seconds(step, a.steps, a.warmup))
  model.eval()
  with torch.inference_mode():
    result['compile_infer_first_call_seconds'] = round(first_call_seconds(lambda: compiled(x)), 2)
    result['compile_infer_images_per_sec'] = images_per_sec(
      a.batch, median_seconds(lambda: compiled(x), a.steps, a.warmup)
    )


def measure_onnx(model, x, a, result):
  import onnxruntime as ort

  model.eval()
  with tempfile.TemporaryDirectory(prefix='timm_onnx_') as tmp:
    path = os.path.join(tmp, 'resnetv2.onnx')
    t0 = time.perf_counter()
    torch.onnx.export(
      model, (x,), path, input_names=['x'], output_names=['logits'], opset_version=18, dynamo=True
    )
    result['onnx_export_seconds'] = round(time.perf_counter() - t0, 2)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  feed = {'x': x.numpy()}
  result['onnxruntime'] = ort.__version__
  result['onnx_infer_images_per_sec'] = images_per_sec(
    a.batch, median_seconds(lambda: session.run(None, feed), a.steps, a.warmup)
  )


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
  ap.add_argument('--modes', default=','.join(MODES), help='comma-separated subset of eager,compile,onnx')
  a = ap.parse_args()
  modes = a.modes.split(',')
  if set(modes) - set(MODES):
    ap.error(f'--modes {a.modes!r}: use a comma-separated subset of {",".join(MODES)}')

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
  result = {
    'impl': f'timm {timm.__version__} / torch {torch.__version__}',
    'model': f'R{a.depth}x{a.width}',
    'size': a.size,
    'batch': a.batch,
    'threads': torch.get_num_threads(),
    'channels_last': a.channels_last,
    'matmul_peak_gflops': round(matmul_gflops(), 2),
    'load_avg_1m': round(os.getloadavg()[0], 2),
    'modes': modes,
  }
  # Every mode runs on the same model; the train steps change its weights, which does not change the speed.
  for mode in MODES:
    if mode not in modes:
      continue
    t0 = time.perf_counter()
    if mode == 'eager':
      measure_eager(model, x, y, a, result)
    elif mode == 'compile':
      measure_compile(model, x, y, a, result)
    else:
      measure_onnx(model, x, a, result)
    print(f'[timm] {mode}: {time.perf_counter() - t0:.1f} s', file=sys.stderr, flush=True)
  result['load_avg_1m_end'] = round(os.getloadavg()[0], 2)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
