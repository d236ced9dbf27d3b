"""The model's hand-written gradients (GroupNorm+ReLU, im2col conv backward) against XLA's autodiff of the
plain formulas, and the XLA settings of bit/xla.py."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bit import models, xla


def _plain_group_norm(x, scale, bias, groups, eps, relu):
  """The textbook GroupNorm (reduce over H, W and the group's channels at once), autodiffed by JAX."""
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (groups, c // groups))
  mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
  y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias
  return jnp.maximum(y, 0) if relu else y


@pytest.mark.parametrize('relu', [True, False])
@pytest.mark.parametrize('shape,groups', [((3, 5, 4, 64), 32), ((2, 1, 1, 96), 32), ((2, 6, 6, 16), 4)])
def test_group_norm_values_and_gradients_match_autodiff(shape, groups, relu):
  rng = np.random.default_rng(0)
  # An offset mean and uneven scales, so that a wrong group or axis shows.
  x = jnp.asarray(rng.normal(1.5, 2.0, shape), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 0.3, shape[-1]), jnp.float32)
  cot = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def run(fn):
    y, vjp = jax.vjp(lambda a, s, b: fn(a, s, b, groups, 1e-5, relu), x, scale, bias)
    return (y,) + vjp(cot)

  got, want = run(models.group_norm), run(_plain_group_norm)
  for name, g, w in zip(('y', 'dx', 'dscale', 'dbias'), got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=name)
  if relu:
    assert float(jnp.min(got[0])) == 0.0  # the ReLU is applied


def test_group_norm_keeps_bfloat16_inputs_and_float32_statistics():
  x = jnp.asarray(np.random.default_rng(1).normal(100.0, 1.0, (2, 4, 4, 32)), jnp.bfloat16)
  y = models.group_norm(x, jnp.ones(32), jnp.zeros(32), 32, 1e-5, False)
  assert y.dtype == jnp.float32
  # Statistics in float32: a large mean with unit spread still normalizes to unit spread.
  assert abs(float(jnp.std(y)) - 1.0) < 0.05
  dx = jax.grad(lambda a: jnp.sum(models.group_norm(a, jnp.ones(32), jnp.zeros(32), 32, 1e-5, True)))(x)
  assert dx.dtype == jnp.bfloat16


@pytest.mark.parametrize(
  'x_shape,k,strides',
  [
    ((2, 6, 6, 8), 3, (1, 1)),
    ((2, 7, 7, 8), 3, (2, 2)),
    ((3, 10, 9, 4), 3, (2, 2)),
    ((1, 9, 9, 3), 7, (2, 2)),
  ],
)
def test_conv_matmul_equals_xla_convolution_and_gradients(x_shape, k, strides):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, x_shape[-1], 5)), jnp.float32)

  out_shape = models._conv_xla(x, w, strides).shape
  cot = jnp.asarray(rng.normal(size=out_shape), jnp.float32)  # a fixed random cotangent

  def loss(conv, a, b):
    return jnp.sum(conv(a, b, strides) * cot)

  want = jax.grad(lambda a, b: loss(models._conv_xla, a, b), argnums=(0, 1))(x, w)
  got = jax.grad(lambda a, b: loss(models.conv_matmul, a, b), argnums=(0, 1))(x, w)
  for g, t in zip(got, want, strict=True):
    np.testing.assert_allclose(g, t, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    models.conv_matmul(x, w, strides), models._conv_xla(x, w, strides), rtol=1e-5, atol=1e-5
  )


def test_matmul_convolution_only_for_small_outputs_on_cpu():
  assert jax.default_backend() == 'cpu'
  small = models._matmul_wanted((4, 10, 10, 256), (3, 3, 256, 256), (1, 1))  # 8x8 out
  large = models._matmul_wanted((4, 18, 18, 128), (3, 3, 128, 128), (1, 1))  # 16x16 out
  assert small and not large


def test_model_gradients_unchanged_by_the_fast_paths():
  """A whole R26 at 32 px (all its 3x3 convs take the matmul path) against the plain formulas."""
  model = models.create_model('R26x1', 3)
  params = models.init_params(model, seed=0, image_size=32)
  params['head']['kernel'] = jnp.asarray(np.random.default_rng(3).normal(0, 0.01, (2048, 3)), jnp.float32)
  images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)

  def loss(p):
    return jnp.sum(jax.nn.log_softmax(model.apply({'params': p}, images))[:, 0])

  got = jax.grad(loss)(params)
  saved = (models.group_norm, models.MATMUL_MAX_PIXELS)
  try:
    models.group_norm = _plain_group_norm
    models.MATMUL_MAX_PIXELS = 0
    want = jax.grad(loss)(params)
  finally:
    models.group_norm, models.MATMUL_MAX_PIXELS = saved
  for (path, g), t in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
  ):
    scale = float(jnp.max(jnp.abs(t))) + 1e-6
    assert float(jnp.max(jnp.abs(g - t))) / scale < 1e-3, jax.tree_util.keystr(path)


def test_compiler_options_respect_a_users_flag(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  assert xla.compiler_options() == {xla.FLAG: xla._OPTION_VALUE}
  monkeypatch.setenv('XLA_FLAGS', f'--{xla.FLAG}=')
  assert xla.compiler_options() is None
  monkeypatch.setenv('XLA_FLAGS', '')
  xla.configure_environment()
  assert xla.FLAG in os.environ['XLA_FLAGS'] and not xla.user_has_set()


def test_other_jaxlib_versions_are_left_alone(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  monkeypatch.setattr(xla.importlib.metadata, 'version', lambda name: '0.7.1')
  xla._jaxlib_known.cache_clear()  # the version is read once per process
  try:
    xla.configure_environment()
    assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'
    assert xla.compiler_options() is None
  finally:
    xla._jaxlib_known.cache_clear()


def test_bit_jit_keeps_convolutions_out_of_ynnpack_even_after_jax_started():
  # A fresh process whose JAX backend starts before bit is imported (so XLA_FLAGS can no longer act).
  code = """
import os
os.environ.pop('XLA_FLAGS', None)
import jax, jax.numpy as jnp
jax.devices()
from bit import models, xla
x, w = jnp.ones((2, 10, 10, 64)), jnp.ones((3, 3, 64, 64))
f = lambda a, b: models._conv_xla(a, b, (1, 1))
for fn in (jax.jit(f), xla.jit(f)):
  print('ynn' in fn.lower(x, w).compile().as_text())
"""
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=True
  ).stdout.split()
  assert out == ['True', 'False']  # XLA's default sends the convolution to YNNPACK; bit's settings do not


def test_gradient_barrier_is_the_identity_both_ways():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3)), jnp.float32)
  np.testing.assert_array_equal(models.gradient_barrier(x), x)
  g = jax.grad(lambda a: jnp.sum(jnp.sin(models.gradient_barrier(a))))(x)
  np.testing.assert_allclose(g, jnp.cos(x), rtol=1e-6)


@pytest.mark.parametrize('hw', [(8, 8), (9, 7), (5, 6), (32, 32), (7, 9), (17, 23)])
def test_zero_padded_pool_equals_flax_max_pool_of_the_padded_tensor(hw):
  # Mostly negative values, so that the zero padding wins at the borders and a wrong tap shows.
  x = jnp.asarray(np.random.default_rng(6).normal(-1.0, 1.0, (2,) + hw + (3,)), jnp.float32)

  def want_fn(a):
    return nn.max_pool(models.fixed_padding(a, 1), (3, 3), strides=(2, 2), padding='VALID')

  got, want = models.max_pool_3x3_s2_zero_padded(x), want_fn(x)
  np.testing.assert_array_equal(got, want)
  cot = jnp.asarray(np.random.default_rng(7).normal(size=want.shape), jnp.float32)
  g_got = jax.grad(lambda a: jnp.sum(models.max_pool_3x3_s2_zero_padded(a) * cot))(x)
  g_want = jax.grad(lambda a: jnp.sum(want_fn(a) * cot))(x)
  np.testing.assert_allclose(g_got, g_want, rtol=1e-6, atol=1e-6)
