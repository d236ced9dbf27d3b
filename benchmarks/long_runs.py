"""The long-run figures of docs/long-runs.md: save stall (sync vs async), SIGTERM to exit, remat cost.

  python benchmarks/long_runs.py save      # stall of one checkpoint save of an R50x1 train state
  python benchmarks/long_runs.py sigterm   # SIGTERM after step 2 of an R50x1 run at 128 px to its exit
  python benchmarks/long_runs.py remat     # R50x1 train step at 128 px, batch 16: remat none, unit, stage

Rounds alternate between the settings compared; each prints the medians, then one JSON line.
"""

import json
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import threading
import time

import common  # noqa: F401  (puts tests/ on the path: test_train, make_checkpoint)
import jax
import numpy as np


def save(rounds=5):
  import orbax.checkpoint as ocp

  from bit import models, parallel, train
  from bit.train_state import create_state, lr_schedule, state_to_tree

  model = models.create_model('R50x1', 10)
  params = models.init_params(model, image_size=64)
  dp = parallel.DataParallel('shard_map', jax.devices()[:1])
  dstate = dp.replicate(create_state(model, params, lr_schedule([1, 2, 3, 4, 5], 0.003)))
  times = {'async': [], 'sync': []}
  with tempfile.TemporaryDirectory() as d:
    managers = {
      k: train._checkpoint_manager(pathlib.Path(d) / k, 2, asynchronous=k == 'async') for k in times
    }
    for r in range(rounds):
      for k, m in managers.items():
        m.wait_until_finished()
        t = time.perf_counter()
        m.save(r, args=ocp.args.StandardSave(state_to_tree(dp.unreplicate(dstate))))  # as _save_checkpoint
        times[k].append(time.perf_counter() - t)
    for m in managers.values():
      m.wait_until_finished()
      m.close()
  out = {f'{k}_stall_s': statistics.median(v) for k, v in times.items()}
  print(json.dumps(out))


def sigterm():
  from test_train import base_config, make_folder, make_npz

  from bit import train
  from bit.errors import Interrupted
  from bit.metrics_log import read_metrics

  with tempfile.TemporaryDirectory() as d:
    d = pathlib.Path(d)
    folder = make_folder(d / 'folder', size=128)
    npz = d / 'r50.npz'
    from make_checkpoint import random_checkpoint

    np.savez(npz, **random_checkpoint(50, 1, 5, 0))
    del make_npz
    c = base_config(npz, folder, num_devices=1, batch_size=16, resize=144, crop=128, checkpoint_every=0)
    workdir = d / 'w'
    sent = {}

    def watch():
      while not any(m.get('step', 0) >= 2 and 'loss' in m for m in read_metrics(workdir)):
        time.sleep(0.01)
      sent['t'] = time.perf_counter()
      os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    try:
      train.fit(c, workdir)
    except Interrupted as e:
      print(json.dumps({'sigterm_to_exit_s': round(time.perf_counter() - sent['t'], 2), 'message': str(e)}))


def remat(rounds=5, steps=3):
  from bit import models, parallel
  from bit.train_state import create_state, lr_schedule, train_step

  dp = parallel.DataParallel('shard_map', jax.devices()[:1])
  p_train = dp.wrap(train_step, donate=True)
  rng = np.random.default_rng(0)
  batch = dp.shard(
    {
      'image': rng.uniform(-1, 1, (16, 128, 128, 3)).astype(np.float32),
      'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)],
    }
  )
  base = models.create_model('R50x1', 10)
  params = models.init_params(base, image_size=64)
  states = {}
  for r in ('none', 'unit', 'stage'):
    states[r] = dp.replicate(create_state(base.clone(remat=r), params, lr_schedule([1, 2, 3, 4, 5], 0.003)))
    states[r], m = p_train(states[r], batch)  # compile
    jax.block_until_ready(m)
  times = {r: [] for r in states}
  for _ in range(rounds):
    for r in states:
      t = time.perf_counter()
      for _ in range(steps):
        states[r], m = p_train(states[r], batch)
      jax.block_until_ready(m)
      times[r].append((time.perf_counter() - t) / steps)
  out = {f'{r}_step_s': round(statistics.median(v), 3) for r, v in times.items()}
  print(json.dumps(out))


if __name__ == '__main__':
  {'save': save, 'sigterm': sigterm, 'remat': remat}[sys.argv[1]]()
