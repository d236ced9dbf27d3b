"""The per-device steps and their two wrappers, on a tiny linear model (fast to compile): the same update on
1 device, 4 devices with shard_map, 4 with pmap, without any mapping, and with gradient accumulation."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bit import hyperrule, parallel
from bit.errors import ConfigError
from bit.train_state import create_state, lr_schedule, train_step

CLASSES = 5


class Tiny(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(CLASSES, dtype=self.dtype)(jnp.tanh(nn.Dense(16, dtype=self.dtype)(x)))


def batch(step, n=8):
  rng = np.random.default_rng(step)
  labels = rng.integers(0, CLASSES, n)
  lam = 0.7  # MixUp-style soft labels
  onehot = np.eye(CLASSES, dtype=np.float32)[labels]
  return {
    'image': rng.uniform(-1, 1, (n, 4, 4, 3)).astype(np.float32),
    'label': lam * onehot + (1 - lam) * onehot[::-1],
  }


def fresh_state(accum_steps=1, trainable_mask=None, dtype=jnp.float32):
  model = Tiny(dtype=dtype)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 3), np.float32))['params']
  return create_state(
    model, params, lr_schedule([1, 2, 3, 4, 5], 0.1), accum_steps=accum_steps, trainable_mask=trainable_mask
  )


def run(dp, state, steps=3):
  step = dp.wrap(train_step, donate=True)
  s = dp.replicate(state)
  losses = []
  for i in range(steps):
    s, m = step(s, dp.shard(batch(i)))
    losses.append(float(dp.unreplicate(m)['loss']))
  return dp.unreplicate(s), losses


def reference(state, steps=3):
  """No device mapping at all: the plain per-device function on the whole batch."""
  losses = []
  for i in range(steps):
    state, m = jax.jit(train_step, static_argnames='axis_name')(state, batch(i), axis_name=None)
    losses.append(float(m['loss']))
  return state, losses


def assert_trees_close(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.fixture(scope='module')
def ref():
  return reference(fresh_state())


@pytest.mark.parametrize(
  'mode,num_devices,accum',
  [
    ('shard_map', 1, 1),
    ('shard_map', 4, 1),
    ('pmap', 4, 1),
    ('shard_map', 4, 2),
    ('pmap', 1, 2),
  ],
)
def test_same_update_whatever_the_devices(ref, mode, num_devices, accum):
  dp = parallel.DataParallel(mode, parallel.select_devices(num_devices))
  dp.check_batch(8, accum)
  state, losses = run(dp, fresh_state(accum_steps=accum))
  ref_state, ref_losses = ref
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_trees_close(state.params, ref_state.params)
  assert_trees_close(state.opt_state, ref_state.opt_state)
  assert int(state.step) == 3


@pytest.mark.parametrize('mode', parallel.MODES)
def test_one_device_step_runs_no_all_reduce(mode):
  """Over one device the gradient mean is the identity: the compiled step must not copy every gradient
  through an all-reduce (it did, and that also kept the update from fusing). Over several it must reduce."""
  for n, want in ((1, False), (2, True)):
    dp = parallel.DataParallel(mode, parallel.select_devices(n))
    step = dp.wrap(train_step, donate=True)
    hlo = step.lower(dp.replicate(fresh_state()), dp.shard(batch(0))).compile().as_text()
    assert ('all-reduce' in hlo) is want, (mode, n)


def test_batch_must_divide_over_devices_and_micro_batches():
  dp = parallel.DataParallel('shard_map', parallel.select_devices(4))
  with pytest.raises(ConfigError, match=r'batch_size=6 .*4 devices.*multiple of 4'):
    dp.check_batch(6)
  with pytest.raises(ConfigError, match='accum_steps=4.*multiple of 16'):
    dp.check_batch(8, 4)
  dp.check_batch(16, 4)


def test_bad_mode_devices_and_multihost_flags():
  with pytest.raises(ConfigError, match='parallelism'):
    parallel.DataParallel('pjit')
  with pytest.raises(ConfigError, match='num_devices=9'):
    parallel.select_devices(9)
  assert len(parallel.select_devices(0)) == len(jax.devices())
  assert not parallel.initialize_distributed()  # nothing set: a single-process run
  with pytest.raises(ConfigError, match='num_processes'):
    parallel.initialize_distributed(coordinator_address='127.0.0.1:1234')


@pytest.mark.parametrize('mode', parallel.MODES)
def test_replicate_shard_unreplicate_round_trip(mode):
  dp = parallel.DataParallel(mode)
  tree = {'a': np.arange(6.0).reshape(2, 3), 'b': np.int32(7)}
  back = dp.unreplicate(dp.replicate(tree))
  np.testing.assert_array_equal(back['a'], tree['a'])
  assert int(back['b']) == 7
  x = np.arange(8 * 3.0).reshape(8, 3)
  sharded = dp.shard({'x': x})['x']
  gathered = np.concatenate([np.asarray(s.data).reshape(-1, 3) for s in sharded.addressable_shards])
  np.testing.assert_array_equal(np.sort(gathered, axis=0), x)


def test_lr_schedule_is_the_hyperrule():
  supports = hyperrule.schedule(5000)
  fn = jax.jit(lr_schedule(supports, 0.003))
  for step in [0, 1, 50, 99, 100, 101, 200, 201, 300, 301, 399, 400, 401, 499]:
    assert float(fn(step)) == pytest.approx(hyperrule.learning_rate(step, 5000), rel=1e-6), step


def test_trainable_mask_freezes_parameters():
  state = fresh_state()
  mask = jax.tree_util.tree_map_with_path(lambda p, _: 'Dense_1' in jax.tree_util.keystr(p), state.params)
  state = fresh_state(trainable_mask=mask)
  new, _ = reference(state, steps=3)  # step 0 has lr 0 (warmup); later steps move the trainable params
  np.testing.assert_array_equal(new.params['Dense_0']['kernel'], state.params['Dense_0']['kernel'])
  assert not np.allclose(new.params['Dense_1']['kernel'], state.params['Dense_1']['kernel'])


def test_bfloat16_compute_keeps_float32_params(ref):
  state, losses = reference(fresh_state(dtype=jnp.bfloat16))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  np.testing.assert_allclose(losses, ref[1], rtol=2e-2)  # bfloat16 has ~3 significant digits
  assert losses != ref[1]  # and it did compute in bfloat16


@pytest.mark.parametrize('mode', parallel.MODES)
def test_donation_warning_is_silenced_only_inside_bits_calls_on_cpu(mode):
  import warnings

  dp = parallel.DataParallel(mode, jax.devices()[:1])

  def step(state, batch):  # no output has state['b']'s shape: its donated buffer is not usable
    return {'a': state['a'] + jnp.sum(batch) + jnp.sum(state['b'])}

  state = dp.replicate({'a': np.zeros(3, np.float32), 'b': np.zeros((7, 5), np.float32)})
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter('always')
    before = list(warnings.filters)
    dp.wrap(step, donate=True)(state, dp.shard(np.ones((2, 3), np.float32)))
    assert warnings.filters == before
    jax.jit(step, donate_argnums=0)({'a': jnp.zeros(3), 'b': jnp.zeros((7, 5))}, jnp.ones(3))
  donation = [w for w in seen if 'donated buffers were not usable' in str(w.message)]
  assert len(donation) == 1  # JAX's own jit still warns; bit's wrapped step did not


# --- joining the cluster jax detects, without flags ---------------------------------------------------------

SLURM_TWO_TASKS = {
  'SLURM_JOB_ID': '4242',
  'SLURM_STEP_ID': '0',
  'SLURM_NTASKS': '2',
  'SLURM_PROCID': '1',
  'SLURM_LOCALID': '1',
  'SLURM_STEP_NODELIST': 'node[001-002]',
  'SLURM_NODELIST': 'node[001-002]',
}


@pytest.mark.parametrize(
  'env, kind, n, i',
  [
    ({}, 'none', 1, 0),
    (SLURM_TWO_TASKS, 'slurm', 2, 1),
    ({**SLURM_TWO_TASKS, 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}, 'slurm', 1, 0),  # a one-task job step
    (
      {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4', 'SLURM_NODELIST': 'a'},
      'none',
      1,
      0,
    ),  # sbatch script, no srun
    (
      {
        'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.2:5000',
        'OMPI_COMM_WORLD_SIZE': '4',
        'OMPI_COMM_WORLD_RANK': '3',
        'OMPI_COMM_WORLD_LOCAL_RANK': '1',
      },
      'ompi',
      4,
      3,
    ),
    ({'KUBERNETES_SERVICE_HOST': '10.0.0.1'}, 'none', 1, 0),  # a pod, not an indexed Job
  ],
)
def test_detect_cluster_reads_the_environment_as_jax_does(env, kind, n, i):
  found = parallel.detect_cluster(env)
  assert (found.kind, found.num_processes, found.process_id) == (kind, n, i)
  assert not found  # detecting joins nothing


@pytest.mark.parametrize(
  'env, missing',
  [
    ({k: v for k, v in SLURM_TWO_TASKS.items() if k != 'SLURM_NTASKS'}, 'SLURM_NTASKS'),
    ({k: v for k, v in SLURM_TWO_TASKS.items() if k != 'SLURM_LOCALID'}, 'SLURM_LOCALID'),
    ({**SLURM_TWO_TASKS, 'SLURM_PROCID': '2'}, 'SLURM_PROCID=2 is not a task of SLURM_NTASKS=2'),
    ({**SLURM_TWO_TASKS, 'SLURM_NTASKS': 'two'}, "SLURM_NTASKS='two'"),
    ({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '2'}, 'OMPI_COMM_WORLD_RANK'),
    ({'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '0'}, 'Open MPI 5'),
  ],
)
def test_a_partial_cluster_environment_is_an_error_naming_what_is_missing(env, missing, monkeypatch):
  import re

  with pytest.raises(ConfigError, match=re.escape(missing)):
    parallel.detect_cluster(env)
  # The same from the tools' entry point, before anything waits on a coordinator; --distributed=off skips it.
  for k in [k for k in os.environ if k.startswith(('SLURM_', 'OMPI_', 'JAX_'))]:
    monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ConfigError, match=re.escape(missing)):
    parallel.initialize_distributed()
  off = parallel.initialize_distributed(distributed='off')
  assert not off and off.kind == 'none'


def _slurm_port_job_id() -> int:
  """A job id whose coordinator port in jax's SLURM rule (job id % 4096 + 61440) is free on 127.0.0.1."""
  import random
  import socket

  for port in random.Random().sample(range(61440, 65536), 200):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
    return 10 * 4096 + port - 61440
  pytest.skip('no free port in 61440..65535 for the SLURM coordinator')


def test_two_slurm_tasks_without_flags_form_one_run_equal_to_one_process(tmp_path):
  import subprocess

  from helpers import ROOT, make_folder, make_npz, train_command, without_compilation_cache

  from bit import checkpoints

  folder, npz = make_folder(tmp_path / 'folder'), make_npz(tmp_path / 'm.npz')

  def command(workdir):
    # train_command's tiny run with 5 steps and MixUp off (its draw is per process); a second
    # --config.schedule would be appended to the first, so the flags are written out.
    return [
      *train_command(workdir, npz, folder)[:-2],  # without its schedule and MixUp
      '--config.schedule=[1,2,3,4,6]',
      '--config.mixup_alpha=0.0',
    ]

  base = {
    k: v for k, v in without_compilation_cache(os.environ).items() if not k.startswith(('SLURM_', 'JAX_'))
  }
  base.update(JAX_PLATFORMS='cpu')
  job = str(_slurm_port_job_id())
  procs = []
  for i in range(2):
    env = dict(
      base,
      XLA_FLAGS='--xla_force_host_platform_device_count=2',
      SLURM_JOB_ID=job,
      SLURM_STEP_ID='0',
      SLURM_NTASKS='2',
      SLURM_NNODES='1',
      SLURM_PROCID=str(i),
      SLURM_LOCALID=str(i),
      SLURM_NODEID='0',
      SLURM_STEP_NODELIST='localhost',
      SLURM_NODELIST='localhost',
      SLURM_STEP_NUM_TASKS='2',
      SLURM_STEP_NUM_NODES='1',
    )
    procs.append(
      subprocess.Popen(
        command(tmp_path / 'two'),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  single = subprocess.Popen(
    command(tmp_path / 'one'),
    env=dict(base, XLA_FLAGS='--xla_force_host_platform_device_count=4'),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    outs = [p.communicate(timeout=600) for p in [*procs, single]]
  finally:
    for p in [*procs, single]:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip([*procs, single], outs, strict=True):
    assert p.returncode == 0, err[-4000:]
  for i in range(2):
    assert f'cluster: slurm (job {job}), process {i} of 2, 2 local devices (cpu)' in outs[i][1]
  assert 'cluster:' not in outs[2][1]  # outside a cluster: nothing to report (the recipe names the devices)
  _, two = checkpoints.load(str(tmp_path / 'two' / 'model.npz'), keep_head=True)
  _, one = checkpoints.load(str(tmp_path / 'one' / 'model.npz'), keep_head=True)
  assert float(np.abs(np.asarray(two['head']['kernel'])).max()) > 0  # it trained
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_prefetch_puts_batches_ahead_in_the_same_order():
  put_calls = []

  def put(b):
    put_calls.append(b)
    return ('on device', b)

  fed = parallel.prefetch_to_device(iter(range(6)), put, size=2)
  assert next(fed) == ('on device', 0)
  assert put_calls == [0, 1, 2]  # the next two batches were put before the first step ran
  assert list(fed) == [('on device', b) for b in range(1, 6)] and put_calls == list(range(6))


def test_the_lagged_max_reads_each_step_lag_steps_later_and_all_when_waiting():
  agreed = parallel.LaggedMax(lag=2)
  assert [agreed.push(v) for v in (0, 0, 15, 0, 0, 0)] == [0, 0, 0, 0, 15, 0]
  assert agreed.push(2) == 0 and agreed.drain() == 2 and agreed.drain() == 0  # nothing left pending
  assert [agreed.push(v) for v in (0, 3, 0)] == [0, 0, 0] and agreed.drain() == 3
