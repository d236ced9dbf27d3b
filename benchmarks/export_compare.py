"""CPU inference speed of bit's ONNX export next to timm's own ONNX export of the same network, both run by the
same onnxruntime in one process, in alternating rounds (and bit's JAX inference, and optionally its SavedModel).

  pip install -e '.[export]'
  python benchmarks/export_compare.py --timm-python /work/venvs/timm/bin/python   # a venv with torch + timm

Builds one R50x1 (random weights: speed does not depend on them) and exports it with `bit.export(...,
'onnx')` (the graph written from the standardized params: NHWC input, one transpose, Conv / InstanceNorm /
MaxPool, a symbolic batch). With --timm-python, that venv builds timm's ResNetV2 of the same shape
(benchmarks/timm_compare.py's: StdConv2d, the 'fixed' stem) and exports it with `torch.onnx.export` (the
dynamo exporter, opset 18, NCHW, a fixed batch); the .onnx file comes back here. Each round times, in turn,
a batch of --batch images at --size px through: bit's ONNX, timm's ONNX (same onnxruntime, same session
options), bit's JAX inference (kernels standardized once) (`models.Inference`), and with --savedmodel the SavedModel's
`serving_default`. Each figure is the median over --steps calls after --warmup; it prints one line per round
and, last, a JSON line with the medians over rounds and the 1-minute load average.

  python benchmarks/export_compare.py --decode-study 50

instead measures how far a server that decodes JPEGs at full scale lands from bit's reduced-scale decode
(`bit.images.decode`, what bit-predict and the SavedModel's serving_bytes do): --decode-study synthetic
photo-like JPEGs (smooth gradients, shapes, texture noise; quality 90) at 375x500 and at 1500x2000, through
--model with random weights whose head bias centres the photos' mean logit (so that classes vary), at 128
and 224 px: the top-1 agreement with bit.predict of the file, and the mean absolute difference of the model
inputs, for (a) full-scale decode + bit's resize, (b) full-scale decode + PIL's antialiased bilinear resize.
The input differences are exact; the class agreement means something only with trained weights (a random
network's near-tied logits flip on any change: measured 0-12% agreement, docs/serving.md).
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import bit
from bit import models, xla

# Run by --timm-python: timm's ResNetV2 as benchmarks/timm_compare.py builds it, exported to ONNX.
TIMM_EXPORT = """
import functools, sys, time, torch
from timm.layers import StdConv2d
from timm.models.resnetv2 import ResNetV2
depth, width, classes, batch, size, path = sys.argv[1:7]
layers = {26: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[int(depth)]
model = ResNetV2(layers=layers, num_classes=int(classes), width_factor=int(width), stem_type='fixed',
                 conv_layer=functools.partial(StdConv2d, eps=1e-8)).eval()
x = torch.rand(int(batch), 3, int(size), int(size)) * 2 - 1
t0 = time.perf_counter()
torch.onnx.export(model, (x,), path, input_names=['x'], output_names=['logits'], opset_version=18, dynamo=True,
                  external_data=False)
print(round(time.perf_counter() - t0, 1), torch.__version__)
"""


def median_rate(call, batch, steps, warmup):
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return batch / statistics.median(times)


def op_counts(path):
  import onnx

  counts = {}
  for n in onnx.load(str(path), load_external_data=False).graph.node:
    counts[n.op_type] = counts.get(n.op_type, 0) + 1
  return dict(sorted(counts.items()))


def photo_like(rng, h, w):
  """A synthetic photo: smooth colour gradients, a few filled shapes, fine texture noise."""
  from PIL import Image, ImageDraw

  yy, xx = np.mgrid[:h, :w] / max(h, w)
  base = np.stack([np.sin(xx * rng.uniform(2, 9) + c * 2 + yy * rng.uniform(1, 5)) for c in range(3)], -1)
  img = Image.fromarray(((base * 0.5 + 0.5) * 200 + 20).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(3, 9))):
    x0, y0 = rng.integers(0, w), rng.integers(0, h)
    box = [int(x0), int(y0), int(x0 + rng.integers(w // 20, w // 2)), int(y0 + rng.integers(h // 20, h // 2))]
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  pixels = np.asarray(img).astype(np.float32) + rng.normal(0, 12, (h, w, 3))
  return np.clip(pixels, 0, 255).astype(np.uint8)


def decode_study(a):
  from PIL import Image

  from bit import prediction

  model = models.create_model(a.model, 1000)
  params = models.init_params(model, seed=1)
  params['head']['kernel'] = np.asarray(
    np.random.default_rng(2).normal(0, 0.05, params['head']['kernel'].shape), np.float32
  )
  rng = np.random.default_rng(0)
  rows = []
  with tempfile.TemporaryDirectory(prefix='bit_decode_study_') as tmp:
    for h, w in ((375, 500), (1500, 2000)):
      files = []
      for i in range(a.decode_study):
        files.append(pathlib.Path(tmp) / f'{h}x{w}_{i:03d}.jpg')
        Image.fromarray(photo_like(rng, h, w)).save(files[-1], quality=90)
      for size in (128, 224):
        bit_x = prediction.preprocess(files, size)  # bit's reduced-scale decode
        full = [np.asarray(Image.open(f).convert('RGB')) for f in files]
        full_x = np.stack([prediction.resize_bilinear(p.astype(np.float32), size) for p in full]) / 127.5 - 1
        pil_x = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in full])
        pil_x = pil_x.astype(np.float32) / 127.5 - 1
        inference = models.Inference(model)
        fn = xla.jit(inference)
        prepared = inference.prepare(params)
        logits = {
          k: np.asarray(fn(prepared, v)) for k, v in (('bit', bit_x), ('full', full_x), ('pil', pil_x))
        }
        centre = logits['bit'].mean(0)
        top = {k: (v - centre).argmax(-1) for k, v in logits.items()}
        short = min(h, w)
        ratio = max([r for r in (1, 2, 4, 8) if short // r >= size] or [1])
        rows.append(
          {
            'photos': f'{len(files)} x {h}x{w} JPEG q90',
            'size': size,
            'bit_decode_scale': f'1/{ratio}',
            'classes_seen': len(set(top['bit'].tolist())),
            'full_decode_top1_agreement': float(np.mean(top['full'] == top['bit'])),
            'full_decode_mean_abs_input_diff': round(float(np.abs(full_x - bit_x).mean()), 4),
            'pil_resize_top1_agreement': float(np.mean(top['pil'] == top['bit'])),
            'pil_resize_mean_abs_input_diff': round(float(np.abs(pil_x - bit_x).mean()), 4),
          }
        )
        print(json.dumps(rows[-1]), flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', default='R50x1')
  ap.add_argument('--size', type=int, default=128)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--timm-python', default=None, help='python of a venv with torch + timm (none: no timm)')
  ap.add_argument('--savedmodel', action='store_true', help='also time the SavedModel (a slow export)')
  ap.add_argument('--decode-study', type=int, default=0, help='N photos per size: the decode study instead')
  a = ap.parse_args()
  if a.decode_study:
    decode_study(a)
    return 0

  import onnxruntime as ort

  depth, width = models.parse_architecture(a.model)
  model = models.create_model(a.model, 1000)
  params = models.init_params(model, image_size=a.size)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (a.batch, a.size, a.size, 3)).astype(np.float32)
  out = pathlib.Path(tempfile.mkdtemp(prefix='bit_export_compare_'))
  result = {'model': a.model, 'size': a.size, 'batch': a.batch, 'export_seconds': {}, 'versions': {}}
  try:
    t0 = time.perf_counter()
    bit.export(model, params, 'onnx', out / 'onnx', size=a.size)
    result['export_seconds']['bit_onnx'] = round(time.perf_counter() - t0, 1)
    result['ops'] = {'bit_onnx': op_counts(out / 'onnx' / 'model.onnx')}
    options = ort.SessionOptions()  # the same for both graphs: onnxruntime's defaults (all cores)
    session = ort.InferenceSession(
      str(out / 'onnx' / 'model.onnx'), options, providers=['CPUExecutionProvider']
    )
    calls = {'bit_onnx': lambda: session.run(['logits'], {'images': x})}
    if a.timm_python:
      timm_path = out / 'timm.onnx'
      proc = subprocess.run(
        [
          a.timm_python,
          '-c',
          TIMM_EXPORT,
          str(depth),
          str(width),
          '1000',
          str(a.batch),
          str(a.size),
          timm_path,
        ],
        capture_output=True,
        text=True,
      )
      if proc.returncode:
        sys.exit(f'timm export failed:\n{proc.stderr[-3000:]}')
      seconds, torch_version = proc.stdout.split()[-2:]
      result['export_seconds']['timm_onnx'] = float(seconds)
      result['versions']['torch'] = torch_version
      result['ops']['timm_onnx'] = op_counts(timm_path)
      timm_session = ort.InferenceSession(str(timm_path), options, providers=['CPUExecutionProvider'])
      x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
      calls['timm_onnx'] = lambda: timm_session.run(None, {'x': x_nchw})
    inference = models.Inference(model)
    prepared = inference.prepare(params)
    jax_fn = xla.jit(inference)
    calls['bit_jax'] = lambda: jax.block_until_ready(jax_fn(prepared, x))
    if a.savedmodel:
      import tensorflow as tf

      t0 = time.perf_counter()
      bit.export(model, params, 'savedmodel', out / 'sm', size=a.size)
      result['export_seconds']['savedmodel'] = round(time.perf_counter() - t0, 1)
      saved = tf.saved_model.load(str(out / 'sm')).signatures['serving_default']
      tf_x = tf.constant(x)
      calls['tf_savedmodel'] = lambda: saved(images=tf_x)['logits'].numpy()
      result['versions']['tensorflow'] = tf.__version__
    print(f'export seconds: {result["export_seconds"]}', flush=True)
    rates = {k: [] for k in calls}
    loads = []
    for r in range(a.rounds):
      for name, call in calls.items():
        rates[name].append(median_rate(call, a.batch, a.steps, a.warmup))
      loads.append(os.getloadavg()[0])
      print(f'round {r + 1}: ' + ', '.join(f'{k} {v[-1]:.1f}' for k, v in rates.items()), flush=True)
  finally:
    shutil.rmtree(out, ignore_errors=True)
  result['versions'].update(onnxruntime=ort.__version__, jax=jax.__version__, bit=bit.__version__)
  result['load_avg_1m'] = [round(v, 2) for v in loads]
  result['infer_images_per_sec'] = {k: [round(v, 1) for v in vs] for k, vs in rates.items()}
  result['median'] = {k: round(statistics.median(vs), 1) for k, vs in rates.items()}
  if 'timm_onnx' in rates:
    result['bit_onnx_over_timm_onnx'] = round(result['median']['bit_onnx'] / result['median']['timm_onnx'], 2)
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
