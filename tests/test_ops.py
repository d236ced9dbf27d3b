"""bit/ops.py: every fast op against its plain reference (values and gradients, on CPU), the whole R26x1 train
step with every fast op against the same step with none, and the BIT_FAST_OPS switch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bit import models, ops
from bit.errors import ConfigError
from bit.train_state import create_state, lr_schedule, train_step


def _vjp(fn, args, cot):
  y, vjp = jax.vjp(fn, *args)
  return (y,) + vjp(cot)


def _fast_and_reference(fn, args, cot):
  """`fn(*args)` and its gradients for the cotangent `cot`, with every fast op, then with none."""
  # A fresh jit per setting: traced (and compiled once) under it.
  with ops.fast_ops('on', retrace=False):
    fast = jax.jit(lambda *a: _vjp(fn, a, cot))(*args)
  with ops.fast_ops('off', retrace=False):
    ref = jax.jit(lambda *a: _vjp(fn, a, cot))(*args)
  return fast, ref


def _assert_close(got, want, rtol, atol, names):
  for name, g, w in zip(names, got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize('relu', [True, False])
@pytest.mark.parametrize('shape,groups', [((3, 5, 4, 64), 32), ((2, 1, 1, 96), 32), ((2, 6, 6, 16), 4)])
def test_group_norm_values_and_gradients_match_the_reference(shape, groups, relu):
  rng = np.random.default_rng(0)
  # An offset mean and uneven scales, so that a wrong group or axis shows.
  x = jnp.asarray(rng.normal(1.5, 2.0, shape), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 0.3, shape[-1]), jnp.float32)
  cot = jnp.asarray(rng.normal(size=shape), jnp.float32)
  fast, ref = _fast_and_reference(
    lambda a, s, b: ops.group_norm(a, s, b, groups, 1e-5, relu), (x, scale, bias), cot
  )
  _assert_close(fast, ref, 2e-4, 2e-5, ('y', 'dx', 'dscale', 'dbias'))
  if relu:
    assert float(jnp.min(fast[0])) == 0.0  # the ReLU is applied


@pytest.mark.parametrize('mode', ['on', 'off'])
def test_group_norm_keeps_bfloat16_inputs_and_float32_statistics(mode):
  x = jnp.asarray(np.random.default_rng(1).normal(100.0, 1.0, (2, 4, 4, 32)), jnp.bfloat16)
  with ops.fast_ops(mode, retrace=False):
    y = ops.group_norm(x, jnp.ones(32), jnp.zeros(32), 32, 1e-5, False)
    dx = jax.grad(lambda a: jnp.sum(ops.group_norm(a, jnp.ones(32), jnp.zeros(32), 32, 1e-5, True)))(x)
  assert y.dtype == jnp.float32
  # Statistics in float32: a large mean with unit spread still normalizes to unit spread.
  assert abs(float(jnp.std(y)) - 1.0) < 0.05
  assert dx.dtype == jnp.bfloat16


def test_standardize_closed_form_gradient_equals_autodiff_of_the_reference():
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 8)) * 0.3 + 0.1
  g = jax.random.normal(jax.random.PRNGKey(2), w.shape)
  fast, ref = _fast_and_reference(ops.standardize, (w,), g)
  _assert_close(fast, ref, 1e-4, 1e-4, ('y', 'dw'))
  assert np.abs(ref[1]).max() > 1e-2  # the comparison is not between two zeros
  np.testing.assert_allclose(np.mean(fast[0], axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(np.var(fast[0], axis=(0, 1, 2)), 1, rtol=1e-4)


@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_1x1_convolution_as_a_matmul_equals_the_convolution(strides):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 9, 9, 8))
  w = jax.random.normal(kw, (1, 1, 8, 16))
  cot = jax.random.normal(kg, ops.conv_reference(x, w, strides).shape)
  fast, ref = _fast_and_reference(lambda a, b: ops.conv(a, b, strides), (x, w), cot)
  _assert_close(fast, ref, 1e-5, 1e-4, ('y', 'dx', 'dw'))


@pytest.mark.parametrize(
  'x_shape,k,strides',
  [
    ((2, 6, 6, 8), 3, (1, 1)),
    ((2, 7, 7, 8), 3, (2, 2)),
    ((3, 10, 9, 4), 3, (2, 2)),
    ((1, 9, 9, 3), 7, (2, 2)),
  ],
)
def test_im2col_convolution_equals_the_convolution_and_its_gradients(x_shape, k, strides):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, x_shape[-1], 5)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=ops.conv_reference(x, w, strides).shape), jnp.float32)
  fast, ref = _fast_and_reference(lambda a, b: ops.conv(a, b, strides), (x, w), cot)
  _assert_close(fast, ref, 1e-4, 1e-4, ('y', 'dx', 'dw'))
  # The fast path really ran the im2col matmul (the same call under 'on' does not reach XLA's convolution).
  with ops.fast_ops('on', retrace=False):
    assert 'conv_general_dilated' not in str(jax.make_jaxpr(lambda a, b: ops.conv(a, b, strides))(x, w))


def test_im2col_only_for_small_outputs():
  with ops.fast_ops('on', retrace=False):
    small = jax.make_jaxpr(lambda a, b: ops.conv(a, b))(jnp.zeros((1, 10, 10, 8)), jnp.zeros((3, 3, 8, 8)))
    large = jax.make_jaxpr(lambda a, b: ops.conv(a, b))(jnp.zeros((1, 18, 18, 8)), jnp.zeros((3, 3, 8, 8)))
  assert 'conv_general_dilated' not in str(small)  # 8x8 outputs: a matmul
  assert 'conv_general_dilated' in str(large)  # 16x16: XLA's convolution is faster there


@pytest.mark.parametrize('hw', [(8, 8), (9, 7), (5, 6), (32, 32), (7, 9), (17, 23)])
def test_separable_zero_padded_pool_equals_the_max_pool_of_the_padded_tensor(hw):
  # Mostly negative values, so that the zero padding wins at the borders and a wrong tap shows.
  x = jnp.asarray(np.random.default_rng(6).normal(-1.0, 1.0, (2,) + hw + (3,)), jnp.float32)
  cot = jnp.asarray(
    np.random.default_rng(7).normal(size=ops.zero_padded_max_pool_reference(x).shape), jnp.float32
  )
  fast, ref = _fast_and_reference(ops.zero_padded_max_pool, (x,), cot)
  np.testing.assert_array_equal(fast[0], ref[0])
  np.testing.assert_allclose(fast[1], ref[1], rtol=1e-6, atol=1e-6)


def test_root_gradient_barrier_is_the_identity_both_ways():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3)), jnp.float32)
  fast, ref = _fast_and_reference(lambda a: jnp.sin(ops.root_barrier(a)), (x,), jnp.ones_like(x))
  np.testing.assert_array_equal(fast[0], ref[0])
  np.testing.assert_allclose(fast[1], jnp.cos(x), rtol=1e-6)
  np.testing.assert_allclose(ref[1], jnp.cos(x), rtol=1e-6)
  with ops.fast_ops('on', retrace=False):
    assert 'optimization_barrier' in str(jax.make_jaxpr(jax.grad(lambda a: jnp.sum(ops.root_barrier(a))))(x))


def test_whole_r26x1_train_step_is_the_same_with_and_without_the_fast_ops():
  """Loss and every gradient leaf of the real train step (bit.train_state.train_step), R26x1 at 32 px, where
  every 3x3 convolution takes the im2col path. Tolerance: each gradient leaf within 1e-3 of that leaf's
  largest magnitude, the loss within 1e-5 (relative), from float rounding in a different summation order."""
  model = models.create_model('R26x1', 3)
  params = models.init_params(model, seed=0, image_size=32)
  params['head']['kernel'] = jnp.asarray(np.random.default_rng(3).normal(0, 0.01, (2048, 3)), jnp.float32)
  rng = np.random.default_rng(4)
  batch = {
    'image': jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32),
    'label': jax.nn.one_hot(jnp.asarray([0, 2]), 3),
  }
  state = create_state(model, params, lr_schedule([0, 10, 20, 30, 40], 0.003))

  def run(mode):
    with ops.fast_ops(mode, retrace=False):  # a fresh jit: traced under `mode`
      new, metrics = jax.jit(functools.partial(train_step, axis_name=None))(state, batch)
    return float(metrics['loss']), new.opt_state[0].trace  # momentum's trace after one step: the gradients

  (fast_loss, fast), (ref_loss, ref) = run('on'), run('off')
  assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
  for (path, g), t in zip(
    jax.tree_util.tree_leaves_with_path(fast), jax.tree_util.tree_leaves(ref), strict=True
  ):
    scale = float(jnp.max(jnp.abs(t)))
    assert scale > 0, jax.tree_util.keystr(path)  # every leaf gets a gradient
    assert float(jnp.max(jnp.abs(g - t))) / scale < 1e-3, jax.tree_util.keystr(path)


def _jaxpr_of_the_model(image_size=32):
  model = models.create_model('R26x1', 3)
  params = models.param_shapes(model)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return str(jax.make_jaxpr(lambda p, a: model.apply({'params': p}, a))(params, x))


def test_the_switch_picks_the_forms_per_backend(monkeypatch):
  monkeypatch.delenv(ops.ENV, raising=False)
  assert ops.fast_ops_mode() == 'auto'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert all(ops.use_fast(op) for op in ops.OPS)  # CPU: today's measured choices
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not any(ops.use_fast(op) for op in ops.OPS)  # GPU: the references until measured there
  monkeypatch.setenv(ops.ENV, 'on')
  assert all(ops.use_fast(op) for op in ops.OPS)
  monkeypatch.setenv(ops.ENV, 'off')
  with ops.fast_ops('on', retrace=False):  # the Python setter wins over the environment
    assert ops.fast_ops_mode() == 'on'
  assert ops.fast_ops_mode() == 'off'


def test_the_model_calls_the_ops_the_switch_picks(monkeypatch):
  monkeypatch.setenv(ops.ENV, 'off')
  plain = _jaxpr_of_the_model()
  monkeypatch.setenv(ops.ENV, 'on')
  fast = _jaxpr_of_the_model()
  assert 'custom_vjp_call' not in plain and 'conv_general_dilated' in plain
  assert 'custom_vjp_call' in fast


def test_set_fast_ops_retraces_compiled_functions():
  x = jnp.asarray(np.random.default_rng(8).normal(size=(1, 9, 9, 3)), jnp.float32)
  f = jax.jit(lambda a: jax.grad(lambda b: jnp.sum(ops.root_barrier(b)))(a))
  with ops.fast_ops('on'):
    assert 'optimization_barrier' in f.lower(x).as_text()
  with ops.fast_ops('off'):
    assert 'optimization_barrier' not in f.lower(x).as_text()


@pytest.mark.parametrize('value', ['fast', 'ON', 'true'])
def test_an_unknown_setting_is_a_clear_error(monkeypatch, value):
  monkeypatch.setenv(ops.ENV, value)
  with pytest.raises(ConfigError, match=f"BIT_FAST_OPS='{value}' is not one of auto, on, off"):
    ops.use_fast('group_norm')
  monkeypatch.delenv(ops.ENV)
  with pytest.raises(ConfigError, match=f"set_fast_ops\\(mode\\)='{value}'"):
    ops.set_fast_ops(value)
  assert ops.fast_ops_mode() == 'auto'  # a rejected value changes nothing
