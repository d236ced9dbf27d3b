"""CPU inference speed of bit's exports next to bit's own JAX inference and timm's, in one run.

  pip install -e '.[export]'
  python benchmarks/export_compare.py --timm-python /path/to/torch-venv/bin/python   # timm_compare.py's venv

Exports one R50x1 (random weights: speed does not depend on them) as a SavedModel and as ONNX with
`bit.export`, then times, in alternating rounds, a batch of --batch images at --size px through: the ONNX
model in onnxruntime, the SavedModel's `serving_default` in TensorFlow, bit's folded JAX inference
(`models.Inference`, what `python -m bit.tools.speed` times), and timm's ResNetV2 (benchmarks/timm_compare.py
in its own venv, a subprocess per round). Each figure is the median over --steps calls after --warmup;
prints one line per round and, last, a JSON line with the medians over rounds.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import bit
from bit import models, xla


def median_rate(call, batch, steps, warmup):
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return batch / statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', default='R50x1')
  ap.add_argument('--size', type=int, default=128)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--timm-python', default=None, help='python of a venv with torch + timm (none: no timm)')
  a = ap.parse_args()

  import onnxruntime as ort
  import tensorflow as tf

  model = models.create_model(a.model, 1000)
  params = models.init_params(model, image_size=a.size)
  x = np.random.default_rng(0).uniform(-1, 1, (a.batch, a.size, a.size, 3)).astype(np.float32)
  out = pathlib.Path(tempfile.mkdtemp(prefix='bit_export_compare_'))
  t0 = time.perf_counter()
  bit.export(model, params, 'savedmodel', out / 'sm', size=a.size)
  t_sm = time.perf_counter() - t0
  t0 = time.perf_counter()
  bit.export(model, params, 'onnx', out / 'onnx', size=a.size)
  t_onnx = time.perf_counter() - t0
  print(f'export: savedmodel {t_sm:.1f} s, onnx {t_onnx:.1f} s', flush=True)

  inference = models.Inference(model)
  prepared = inference.prepare(params)
  jax_fn = xla.jit(inference)
  saved = tf.saved_model.load(str(out / 'sm')).signatures['serving_default']
  session = ort.InferenceSession(str(out / 'onnx' / 'model.onnx'), providers=['CPUExecutionProvider'])
  tf_x = tf.constant(x)
  calls = {
    'onnxruntime': lambda: session.run(['logits'], {'images': x}),
    'tf_savedmodel': lambda: saved(images=tf_x)['logits'].numpy(),
    'bit_jax': lambda: jax.block_until_ready(jax_fn(prepared, x)),
  }
  rates = {k: [] for k in [*calls, *(['timm'] if a.timm_python else [])]}
  for r in range(a.rounds):
    for name, call in calls.items():
      rates[name].append(median_rate(call, a.batch, a.steps, a.warmup))
    if a.timm_python:
      script = pathlib.Path(__file__).with_name('timm_compare.py')
      cmd = [
        a.timm_python,
        str(script),
        '--size',
        str(a.size),
        '--batch',
        str(a.batch),
        '--steps',
        str(a.steps),
      ]
      cmd += ['--depth', str(models.parse_architecture(a.model)[0]), '--warmup', str(a.warmup)]
      cmd += ['--modes', 'eager']  # timm's eager inference; timm_rounds.py runs the other modes
      proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
      rates['timm'].append(json.loads(proc.stdout.strip().splitlines()[-1])['infer_images_per_sec'])
    print(f'round {r + 1}: ' + ', '.join(f'{k} {v[-1]:.1f}' for k, v in rates.items()), flush=True)
  result = {
    'model': a.model,
    'size': a.size,
    'batch': a.batch,
    'versions': {
      'onnxruntime': ort.__version__,
      'tensorflow': tf.__version__,
      'jax': jax.__version__,
    },
    'load_avg_1m': round(os.getloadavg()[0], 2),
    'export_seconds': {'savedmodel': round(t_sm, 1), 'onnx': round(t_onnx, 1)},
    'infer_images_per_sec': {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
    'median': {k: round(statistics.median(vs), 1) for k, vs in rates.items()},
  }
  print(json.dumps(result), flush=True)
  import shutil

  shutil.rmtree(out, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
