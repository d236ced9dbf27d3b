"""Two processes on 127.0.0.1, two CPU devices each (gloo collectives): one shard_map run over the four
devices, each process feeding its half of every batch; both must end with the same params, and with the
params of the same run in one process over four devices."""

import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from helpers import assert_params_close, make_folder, make_npz, start_two_processes  # noqa: E402

CONFIG = r"""
def config(model, dataset):
  from bit import config as common

  c = common.get_config()
  c.model, c.dataset, c.batch_size, c.resize, c.crop = model, dataset, 8, 40, 32
  c.schedule, c.mixup_alpha, c.checkpoint_every, c.log_every = (1, 2, 3, 4, 6), 0.0, 3, 1
  return c
"""

WORKER = (
  CONFIG
  + r"""
import sys, numpy as np
from bit import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import jax
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
from bit import train
result = train.fit(config(sys.argv[3], sys.argv[4]), sys.argv[5])
flat = {}
def walk(t, p=''):
  for k, v in t.items():
    walk(v, p + k + '/') if isinstance(v, dict) else flat.__setitem__(p + k, np.asarray(v))
walk(result.params)
np.savez(f'{sys.argv[5]}/params_{jax.process_index()}.npz', top1=result.metrics['top1'], **flat)
"""
)


def test_two_processes_end_with_the_same_params(tmp_path):
  folder = make_folder(tmp_path / 'folder')
  npz = make_npz(tmp_path / 'm.npz')
  workdir = tmp_path / 'w'
  procs = start_two_processes(WORKER, npz, folder, workdir)
  try:
    outs = [p.communicate(timeout=420) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-4000:]
  p0, p1 = (dict(np.load(workdir / f'params_{i}.npz')) for i in range(2))
  assert p0.keys() == p1.keys()
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
  assert not np.allclose(p0['head/kernel'], 0)  # it trained
  # Process 0 wrote the workdir files; its model.npz holds the params both processes ended with.
  from bit import checkpoints

  _, exported = checkpoints.load(str(workdir / 'model.npz'), keep_head=True)
  p0.pop('top1')
  nested = {}
  for k, v in p0.items():
    node = nested
    *parents, leaf = k.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = v
  assert_params_close(exported, nested, atol=0, rtol=0)
  assert (workdir / 'metrics.jsonl').exists() and (workdir / 'checkpoints' / '6').exists()
  # The same run in this one process, over its four devices: the same model, up to float rounding (the
  # gradient is summed in another order), and the same test accuracy.
  from bit import train

  namespace = {}
  exec(CONFIG, namespace)
  single = train.fit(namespace['config'](str(npz), str(folder)), tmp_path / 'single')
  assert_params_close(single.params, nested)
  assert single.metrics['top1'] == float(p1['top1'])
