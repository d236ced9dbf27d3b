"""bit against timm on this CPU in alternating rounds: bit's real train step and inference, then timm eager,
timm under torch.compile and timm in onnxruntime (benchmarks/timm_compare.py, run in a torch venv).

  python benchmarks/timm_rounds.py --timm-python ~/torchvenv/bin/python --rounds 3

Each round runs `python -m bit.tools.speed` (bit's benchmark: the train step `bit.train` runs, and the standardized
forward pass) in this interpreter, then timm_compare.py with every mode in the other. Prints one line per
round and, last, one JSON line: every round's figures, their medians, and bit's median over each of timm's
(`ratios`). The machine's load average is recorded at the start and end of every run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

# (name, train key, inference key) of each implementation's figures in its benchmark's JSON.
FIGURES = {
  'bit': ('train_images_per_sec', 'infer_images_per_sec'),
  'timm eager': ('train_images_per_sec', 'infer_images_per_sec'),
  'timm torch.compile': ('compile_train_images_per_sec', 'compile_infer_images_per_sec'),
  'timm onnxruntime': (None, 'onnx_infer_images_per_sec'),
}


def last_json(cmd: list[str]) -> dict:
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f'error: {" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--timm-python', required=True, help='python of a venv with torch, timm, onnx, onnxruntime')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--model', default='R50x1', help='R<depth>x<width>')
  ap.add_argument('--size', type=int, default=128)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--warmup', type=int, default=2)
  a = ap.parse_args()
  depth, width = a.model[1:].split('x')
  speed = 'bit.tools.speed'
  shape = ['--size', str(a.size), '--batch', str(a.batch), '--steps', str(a.steps), '--warmup', str(a.warmup)]
  bit_cmd = [sys.executable, '-m', speed, '--model', a.model, *shape]
  timm_cmd = [a.timm_python, str(pathlib.Path(__file__).with_name('timm_compare.py'))]
  timm_cmd += ['--depth', depth, '--width', width, *shape]
  runs = {'bit': [], 'timm': []}
  rates = {
    (name, kind): []
    for name, keys in FIGURES.items()
    for kind, key in zip(('train', 'infer'), keys, strict=True)
    if key
  }
  for r in range(a.rounds):
    for who, cmd in (('bit', bit_cmd), ('timm', timm_cmd)):
      out = last_json(cmd)
      runs[who].append(out)
      for (name, kind), values in rates.items():
        if name.split()[0] == who:
          values.append(out[FIGURES[name][kind == 'infer']])
    print(
      f'round {r + 1} (load {runs["bit"][-1]["load_avg_1m"]}-{runs["timm"][-1]["load_avg_1m_end"]}): '
      + ', '.join(f'{n} {k} {v[-1]:.1f}' for (n, k), v in rates.items()),
      flush=True,
    )
  medians = {f'{n} {k}': statistics.median(v) for (n, k), v in rates.items()}
  ratios = {
    f'bit / {n} {k}': round(medians[f'bit {k}'] / medians[f'{n} {k}'], 3) for (n, k) in rates if n != 'bit'
  }
  result = {
    'model': a.model,
    'size': a.size,
    'batch': a.batch,
    'steps': a.steps,
    'rounds': a.rounds,
    'cpu_count': os.cpu_count(),
    'bit': speed,
    'timm': runs['timm'][-1].get('impl'),
    'onnxruntime': runs['timm'][-1].get('onnxruntime'),
    'per_round': {f'{n} {k}': v for (n, k), v in rates.items()},
    'load_avg_1m': [
      [x['load_avg_1m'], x.get('load_avg_1m_end')]
      for pair in zip(runs['bit'], runs['timm'], strict=True)
      for x in pair
    ],
    'medians': medians,
    'ratios': ratios,
  }
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
