"""Train-step throughput and XLA temp memory of each transfer mode, through the real step of `bit.train`.

  python benchmarks/transfer_modes.py --model R50x1 --size 128 --batch 16 --rounds 5

The step is built as `bit.train` builds it: `train_state.create_state` (the one optimizer, the transfer
masks, the trainable/frozen split) and `train_state.train_step` wrapped by `parallel.DataParallel` (shard_map
over one CPU device), the state replicated and donated. Random weights (timing does not depend on them), one
fixed random batch. The modes are timed in alternating rounds (full, head, partial, ..., full, head, ...), so
a machine that gets busier or quieter in between shifts every mode alike; each round's figure is the median
of `--steps` steps and the reported figure the median over rounds. Temp memory is
`compiled.memory_analysis().temp_size_in_bytes` of each compiled step (activations and scratch; the state
and the batch, its arguments, are not part of it).

Prints one line per round and, last, one JSON line: per mode `images_per_sec`, `step_seconds`,
`temp_mb`, `compile_seconds` and the ratios to 'full'.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np
from common import fast_params

from bit import models, parallel, train_state

MODES = {
  'full': dict(transfer='full'),
  'head': dict(transfer='head'),
  'partial_stages1': dict(transfer='partial', unfreeze_stages=1),
  'partial_units1': dict(transfer='partial', unfreeze_units=1),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', default='R50x1')
  ap.add_argument('--size', type=int, default=128)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--classes', type=int, default=1000)
  ap.add_argument('--steps', type=int, default=5, help='timed steps per mode and round')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--modes', default=','.join(MODES), help=f'comma-separated, of {", ".join(MODES)}')
  a = ap.parse_args(argv)

  model = models.create_model(a.model, a.classes)
  params = fast_params(model, head_std=0.01)
  lr = train_state.lr_schedule([10, 10**6, 2 * 10**6, 3 * 10**6, 4 * 10**6], 1e-5)
  dp = parallel.DataParallel('shard_map', parallel.select_devices(1))
  rng = np.random.default_rng(1)
  batch = {
    'image': rng.uniform(-1, 1, (a.batch, a.size, a.size, 3)).astype(np.float32),
    'label': np.eye(a.classes, dtype=np.float32)[rng.integers(0, a.classes, a.batch)],
  }
  dbatch = dp.shard(batch)
  runs, result = {}, {}
  for name in a.modes.split(','):
    t0 = time.perf_counter()
    state = train_state.create_state(model, params, lr, **MODES[name])
    dstate = dp.replicate(state)
    step = dp.wrap(train_state.train_step, donate=True).lower(dstate, dbatch).compile()
    temp = step.memory_analysis().temp_size_in_bytes
    dstate, _ = step(dstate, dbatch)  # one untimed step
    jax.block_until_ready(dstate)
    runs[name] = [step, dstate, []]
    result[name] = {'temp_mb': round(temp / 2**20, 1), 'compile_seconds': round(time.perf_counter() - t0, 1)}
    print(
      f'{name}: compiled in {result[name]["compile_seconds"]} s, temp {result[name]["temp_mb"]} MB',
      flush=True,
    )
  for r in range(a.rounds):
    line = []
    for name, run in runs.items():
      step, dstate, medians = run
      times = []
      for _ in range(a.steps):
        t0 = time.perf_counter()
        dstate, metrics = step(dstate, dbatch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
      run[1] = dstate
      medians.append(statistics.median(times))
      line.append(f'{name} {a.batch / medians[-1]:.1f} img/s')
    print(f'round {r + 1}: ' + ', '.join(line), flush=True)
  for name, (_, _, medians) in runs.items():
    t = statistics.median(medians)
    result[name].update(step_seconds=round(t, 4), images_per_sec=round(a.batch / t, 2))
  if 'full' in result:
    for res in result.values():
      res['speedup_vs_full'] = round(res['images_per_sec'] / result['full']['images_per_sec'], 2)
      res['temp_vs_full'] = round(res['temp_mb'] / result['full']['temp_mb'], 3)
  print(json.dumps({'model': a.model, 'size': a.size, 'batch': a.batch, 'modes': result}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
