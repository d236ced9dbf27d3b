# ruff: noqa: E402 - jax.distributed must start before the modules that touch the backend are imported
"""Two CPU processes: steps/s of a small data-parallel train step and how far the host loop runs ahead of
the devices, with the old per-step blocking allgather of the stop flag vs parallel.LaggedMax, with and
without prefetch_to_device.  python lead.py ADDRESS I"""
import json
import sys
import time

from bit import parallel

parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from bit.train_state import create_state, lr_schedule, train_step


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10)(jnp.tanh(nn.Dense(1024)(x)))

dp = parallel.DataParallel('shard_map', jax.devices())
model = Net()
params = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))['params']
state = create_state(model, params, lr_schedule([10, 20, 30, 40, 10**6], 0.01))
step = dp.wrap(train_step, donate=True)
rng = np.random.default_rng(jax.process_index())
host = [{'image': rng.uniform(-1, 1, (64, 32, 32, 3)).astype(np.float32),
         'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 64)]} for _ in range(4)]
N = int(sys.argv[3]) if len(sys.argv) > 3 else 60
out = {}
for _rnd in range(2):
  for stop in ('allgather', 'lagged'):
    for prefetch in (0, 2):
      s = dp.replicate(state)
      agreed = parallel.LaggedMax(2)
      batches = (host[i % 4] for i in range(N + 10))
      fed = parallel.prefetch_to_device(batches, dp.shard, prefetch) if prefetch else (dp.shard(b) for b in batches)
      for _i in range(5):
        s, m = step(s, next(fed))
      jax.block_until_ready(s)
      multihost_utils.sync_global_devices('start')
      lead = []
      t0 = time.perf_counter()
      for _i in range(N):
        s, m = step(s, next(fed))
        if stop == 'allgather':
          int(np.max(multihost_utils.process_allgather(np.asarray(0, np.int32))))
        else:
          agreed.push(0)
        lead.append(time.perf_counter())
      dispatched = time.perf_counter()
      jax.block_until_ready(s)
      done = time.perf_counter()
      agreed.drain()
      sps = N / (done - t0)
      key = f'{stop}_prefetch{prefetch}'
      out.setdefault(key, []).append({'steps_per_sec': round(sps, 2), 'host_lead_steps': round((done - dispatched) * sps, 2)})
if jax.process_index() == 0:
  print(json.dumps(out))
