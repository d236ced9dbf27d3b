"""The per-device steps and their two wrappers, on a tiny linear model (fast to compile): the same update on
1 device, 4 devices with shard_map, 4 with pmap, without any mapping, and with gradient accumulation."""

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
  assert parallel.initialize_distributed() is False  # nothing set: a single-process run
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
