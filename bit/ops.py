"""BiT's numerical building blocks: each fast path beside its plain reference, and one switch between them.

Every op here has a reference form (the textbook formula, which XLA differentiates) and a fast form that
gives the same values and gradients up to float rounding (tests/test_ops.py checks both ways). The fast
forms were written and measured on CPU, where each made the R50x1 train step faster (docs/performance.md);
none has been measured on a GPU or TPU, so there `auto` picks the reference until a measurement says
otherwise.

The switch, read when a function is traced (so when it is compiled):
- `BIT_FAST_OPS=auto|on|off` in the environment; unset means `auto`.
- `set_fast_ops('off')` (returns the previous setting; None goes back to the environment's), or
  `with fast_ops('off'): ...`. Both clear JAX's compilation caches when the setting changes, so that a
  function compiled under the old setting is traced again.
- `auto`: per op and per backend, what was measured faster there (`AUTO`); `on`: every fast form;
  `off`: every reference.

The ops (`OPS`):
  group_norm    GroupNorm (+ the ReLU after it) with a written-out gradient
  standardize   weight standardization of HWIO kernels on their 2-D view, closed-form gradient
  conv_1x1      1x1 convolutions as one matmul
  conv_matmul   3x3/7x7 convolutions over few output pixels as im2col matmuls, forward and backward
  max_pool      the root's zero-padded 3x3/2 max-pool, separable and without the padded copy
  root_barrier  an optimization barrier on the gradient of the root convolution's output
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bit.errors import ConfigError

ENV = 'BIT_FAST_OPS'
MODES = ('auto', 'on', 'off')
OPS = ('group_norm', 'standardize', 'conv_1x1', 'conv_matmul', 'max_pool', 'root_barrier')
# What `auto` takes, per backend: the ops measured faster there than their reference. CPU: all of them (see
# docs/performance.md). GPU and TPU: none yet; add an op once a measurement there says so.
AUTO: dict[str, frozenset[str]] = {'cpu': frozenset(OPS), 'gpu': frozenset(), 'tpu': frozenset()}

_setting: str | None = None  # set_fast_ops's value; None: the environment decides


def _check_mode(value, where: str) -> str:
  if value not in MODES:
    raise ConfigError(
      f'{where}={value!r} is not one of {", ".join(MODES)}: use auto (the default), on or off.'
    )
  return value


def fast_ops_mode() -> str:
  """The setting in force: `set_fast_ops`'s, else `BIT_FAST_OPS`, else 'auto'. ConfigError for a bad value."""
  if _setting is not None:
    return _setting
  return _check_mode(os.environ.get(ENV, 'auto') or 'auto', ENV)


def set_fast_ops(mode: str | None, *, retrace: bool = True) -> str | None:
  """Sets the switch for this process ('auto', 'on', 'off'; None: back to `BIT_FAST_OPS`); returns the old one.

  Functions traced from now on see the new setting. With `retrace` (the default) JAX's compilation caches
  are cleared when the setting changes, so that a function jitted before is traced again; `retrace=False`
  keeps them, for code that traces anew anyway (eager calls, a fresh `jax.jit`).
  """
  global _setting
  if mode is not None:
    _check_mode(mode, 'set_fast_ops(mode)')
  old, before = _setting, fast_ops_mode()
  _setting = mode
  if retrace and fast_ops_mode() != before:
    jax.clear_caches()
  return old


@contextlib.contextmanager
def fast_ops(mode: str | None, *, retrace: bool = True) -> Any:
  """`with fast_ops('off'): ...` runs (and traces) the block under `mode`, then restores the setting."""
  old = set_fast_ops(mode, retrace=retrace)
  try:
    yield
  finally:
    set_fast_ops(old, retrace=retrace)


def use_fast(op: str) -> bool:
  """Whether `op` (one of OPS) takes its fast form for the current setting and JAX's default backend."""
  mode = fast_ops_mode()
  if mode != 'auto':
    return mode == 'on'
  return op in AUTO.get(jax.default_backend(), frozenset())


# --- padding ------------------------------------------------------------------------------------------------


def fixed_padding(x: jax.Array, pad: int) -> jax.Array:
  """Symmetric zero padding of the spatial axes of an NHWC tensor (XLA's 'SAME' is asymmetric at stride 2)."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


# --- weight standardization --------------------------------------------------------------------------------


def standardize(w: jax.Array, axis: Any = (0, 1, 2), eps: float = 1e-10) -> jax.Array:
  """Weight standardization: zero mean, unit (biased) variance over `axis`, in float32."""
  w = w.astype(jnp.float32)
  if w.ndim == 4 and tuple(axis) == (0, 1, 2) and use_fast('standardize'):
    return _standardize_hwio(w, eps)
  return standardize_reference(w, axis, eps)


def standardize_reference(w: jax.Array, axis: Any = (0, 1, 2), eps: float = 1e-10) -> jax.Array:
  w = w.astype(jnp.float32)
  w = w - jnp.mean(w, axis=axis, keepdims=True)
  return w / jnp.sqrt(jnp.mean(jnp.square(w), axis=axis, keepdims=True) + eps)


# On CPU, reducing over the three leading axes of the 4-D kernel, and XLA's autodiff of it, were a large part
# of an R50 train step; the (H*W*I, O) view and the closed-form backward make it a small one
# (docs/performance.md).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _standardize_hwio(w: jax.Array, eps: float) -> jax.Array:
  return _standardize_hwio_fwd(w, eps)[0]


def _standardize_hwio_fwd(w, eps):
  w2 = w.reshape(-1, w.shape[-1])
  centered = w2 - jnp.mean(w2, axis=0, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=0, keepdims=True) + eps)
  y = centered * inv_std
  return y.reshape(w.shape), (y, inv_std)


def _standardize_hwio_bwd(eps, res, g):
  # y = (w - mean) / std  =>  dw = (g - mean(g) - y * mean(g * y)) / std, all over the reduced axis.
  y, inv_std = res
  g2 = g.reshape(y.shape)
  dw = inv_std * (g2 - jnp.mean(g2, axis=0, keepdims=True) - y * jnp.mean(g2 * y, axis=0, keepdims=True))
  return (dw.reshape(g.shape),)


_standardize_hwio.defvjp(_standardize_hwio_fwd, _standardize_hwio_bwd)


# --- convolutions -------------------------------------------------------------------------------------------


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1)) -> jax.Array:
  """VALID NHWC x HWIO convolution, through `conv_1x1` or `conv_matmul` where those are switched on."""
  strides = tuple(strides)
  if kernel.shape[:2] == (1, 1) and use_fast('conv_1x1'):
    if strides != (1, 1):
      x = x[:, :: strides[0], :: strides[1]]
    return conv_1x1(x, kernel)
  if _few_output_pixels(x.shape, kernel.shape, strides) and use_fast('conv_matmul'):
    return conv_matmul(x, kernel, strides)
  return conv_reference(x, kernel, strides)


def conv_reference(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1)) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, window_strides=tuple(strides), padding='VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def conv_1x1(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1 1x1 convolution of NHWC `x` with a (1, 1, Cin, Cout) kernel, as one matmul.

  On CPU XLA runs the weight gradient of a 1x1 *convolution* at a small fraction of the matmul peak, while
  the dot's gradients are plain matmuls. An explicit transpose of x for the weight gradient (behind an
  optimization barrier) was slower than letting XLA fuse it, so autodiff does the backward
  (docs/performance.md).
  """
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[-2:]))
  return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


# XLA's CPU convolution over few output pixels, forward and backward, runs far below the matmul peak (its
# layout assignment swaps the batch and feature dimensions of tiny images): the 3x3 convolutions at 1x1-8x8
# outputs were most of an R26x1 train step at 32 px. As im2col matmuls they are several times faster
# (docs/performance.md); at 16x16 and more XLA's own convolution is faster.
MATMUL_MAX_PIXELS = 64


def _few_output_pixels(x_shape, k_shape, strides) -> bool:
  ho = (x_shape[1] - k_shape[0]) // strides[0] + 1
  wo = (x_shape[2] - k_shape[1]) // strides[1] + 1
  return ho * wo <= MATMUL_MAX_PIXELS


def _im2col(x, kh, kw, strides):
  """(N, H, W, C) -> (N, Ho, Wo, kh*kw*C) patches, taps in (i, j) order then channels (HWIO's order)."""
  sh, sw = strides
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  taps = [
    x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i in range(kh) for j in range(kw)
  ]
  return jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
  """A VALID NHWC x HWIO convolution as an im2col matmul, forward and backward (patches are not kept)."""
  return _conv_mm_fwd(x, kernel, strides)[0]


def _conv_mm_fwd(x, kernel, strides):
  kh, kw, cin, cout = kernel.shape
  patches = _im2col(x, kh, kw, strides)
  y = jnp.dot(patches.reshape(-1, kh * kw * cin), kernel.reshape(-1, cout))
  return y.reshape(patches.shape[:3] + (cout,)), (x, kernel)


def _conv_mm_bwd(strides, res, g):
  x, kernel = res
  kh, kw, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  _, ho, wo, _ = g.shape
  g2 = g.reshape(-1, cout)
  patches = _im2col(x, kh, kw, strides).reshape(-1, kh * kw * cin)
  dkernel = jax.lax.dot_general(patches, g2.astype(patches.dtype), (((0,), (0,)), ((), ())))
  dpatches = jnp.dot(g2, kernel.reshape(-1, cout).T).reshape(n, ho, wo, kh * kw, cin)
  # col2im: each tap's gradient goes back where the tap was read from (strided: interior padding).
  sh, sw = strides
  zero = jnp.zeros((), dpatches.dtype)
  dx = None
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    pads = [
      (0, 0, 0),
      (i, h - i - sh * (ho - 1) - 1, sh - 1),
      (j, w - j - sw * (wo - 1) - 1, sw - 1),
      (0, 0, 0),
    ]
    tap = jax.lax.pad(dpatches[:, :, :, t], zero, pads)
    dx = tap if dx is None else dx + tap
  return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


conv_matmul.defvjp(_conv_mm_fwd, _conv_mm_bwd)


# --- the root's max-pool ------------------------------------------------------------------------------------


def zero_padded_max_pool(x: jax.Array) -> jax.Array:
  """BiT's root pooling: a VALID 3x3 max-pool with stride 2 of `x` zero-padded by 1 on each side.

  (flax's `max_pool(padding=...)` pads with -inf; BiT pads with zeros.)
  """
  if use_fast('max_pool'):
    return _zero_padded_pool_axis(_zero_padded_pool_axis(x, 1), 2)
  return zero_padded_max_pool_reference(x)


def zero_padded_max_pool_reference(x: jax.Array) -> jax.Array:
  return nn.max_pool(fixed_padding(x, 1), (3, 3), strides=(2, 2), padding='VALID')


def _zero_padded_pool_axis(x: jax.Array, axis: int) -> jax.Array:
  """Max over 3 taps with stride 2 along `axis` of `x` zero-padded by 1 on both sides, without the padded copy.

  Output i covers unpadded positions 2i-1, 2i, 2i+1; the even and odd positions are strided slices, and the
  taps that fall outside are zero rows padded onto those (half-size) slices, which XLA fuses into the maximum.
  """
  n = x.shape[axis]
  out = (n - 1) // 2 + 1

  def take(start, stop):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, stop, 2)
    return x[tuple(idx)]

  def pad(a, lo, hi):
    config = [(0, 0, 0)] * a.ndim
    config[axis] = (lo, hi, 0)
    return jax.lax.pad(a, jnp.zeros((), a.dtype), config)

  even = take(0, 2 * out - 1)  # positions 2i
  odd = take(1, n)  # positions 2i+1, n // 2 of them
  after = odd if odd.shape[axis] == out else pad(odd, 0, out - odd.shape[axis])
  before = pad(take(1, 2 * out - 2), 1, 0)  # positions 2i-1; i = 0 is the padding
  return jnp.maximum(jnp.maximum(before, even), after)


# --- the root's gradient barrier ---------------------------------------------------------------------------


def root_barrier(x: jax.Array) -> jax.Array:
  """The identity; with the fast op on, its gradient is materialized before it flows on.

  On CPU, without the barrier XLA fused the max-pool and GroupNorm backward into the transposed copy its
  kernel-gradient convolution needs, which made that copy several times slower (docs/performance.md).
  """
  return gradient_barrier(x) if use_fast('root_barrier') else x


@jax.custom_vjp
def gradient_barrier(x: Any) -> Any:
  """The identity, whose gradient passes an XLA optimization barrier."""
  return x


gradient_barrier.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


# --- GroupNorm ----------------------------------------------------------------------------------------------


def group_norm(x: Any, scale: Any, bias: Any, groups: int = 32, eps: float = 1e-5, relu: bool = False) -> Any:
  """GroupNorm of NHWC `x` (two-pass variance, statistics in float32; returns float32), then ReLU if `relu`."""
  if use_fast('group_norm'):
    return _group_norm_fast(x, scale, bias, groups, eps, relu)
  return group_norm_reference(x, scale, bias, groups, eps, relu)


def group_norm_reference(
  x: Any, scale: Any, bias: Any, groups: int = 32, eps: float = 1e-5, relu: bool = False
) -> Any:
  """The textbook form: reduce over H, W and the group's channels at once."""
  x = x.astype(jnp.float32)
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (groups, c // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
  y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias
  return jnp.maximum(y, 0.0) if relu else y


def _group_stats(x3, groups, eps):
  """Per-channel mean and 1/std of each (image, group) of a float32 (N, HW, C) tensor; two-pass variance.

  Reduces over the spatial axis first (per channel, contiguous in C) and then over the channels of a group:
  the same sums as a reduction over (HW, C/G) at once, which XLA's CPU code runs several times slower.
  """
  n, hw, c = x3.shape
  cg = c // groups
  count = hw * cg
  mean = jnp.repeat(jnp.sum(jnp.sum(x3, axis=1).reshape(n, groups, cg), axis=-1) / count, cg, axis=-1)
  sq = jnp.sum(jnp.square(x3 - mean[:, None, :]), axis=1)
  var = jnp.sum(sq.reshape(n, groups, cg), axis=-1) / count
  return mean, jnp.repeat(jax.lax.rsqrt(var + eps), cg, axis=-1)


# The gradient is written out (one reduction pass and one elementwise pass) instead of XLA's autodiff of the
# reference, which took ~2.5x longer on CPU.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_fast(x, scale, bias, groups, eps, relu):
  return _group_norm_fwd(x, scale, bias, groups, eps, relu)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, relu):
  x3 = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
  mean, inv = _group_stats(x3, groups, eps)
  y = (x3 - mean[:, None, :]) * (inv * scale)[:, None, :] + bias
  if relu:
    y = jnp.maximum(y, 0.0)
  return y.reshape(x.shape), (x, scale, bias, mean, inv)


def _group_norm_bwd(groups, eps, relu, res, g):
  x, scale, bias, mean, inv = res
  n, c = x.shape[0], x.shape[-1]
  cg = c // groups
  x3 = x.astype(jnp.float32).reshape(n, -1, c)
  g3 = g.astype(jnp.float32).reshape(n, -1, c)
  xhat = (x3 - mean[:, None, :]) * inv[:, None, :]
  if relu:
    g3 = jnp.where(xhat * scale + bias > 0, g3, 0.0)
  sum_g = jnp.sum(g3, axis=1)  # (N, C)
  sum_gx = jnp.sum(g3 * xhat, axis=1)  # (N, C)
  count = x3.shape[1] * cg

  def group_mean(v):  # (N, C) per-channel sums -> (N, C) the mean over each channel's group
    return jnp.repeat(jnp.sum(v.reshape(n, groups, cg), axis=-1) / count, cg, axis=-1)

  # y = xhat * scale + bias, xhat = (x - mean) * inv  =>  dx = inv * (gs - mean(gs) - xhat * mean(gs * xhat)).
  a = group_mean(sum_g * scale)
  b = group_mean(sum_gx * scale)
  dx = inv[:, None, :] * (g3 * scale - a[:, None, :] - xhat * b[:, None, :])
  return dx.reshape(x.shape).astype(x.dtype), jnp.sum(sum_gx, axis=0), jnp.sum(sum_g, axis=0)


_group_norm_fast.defvjp(_group_norm_fwd, _group_norm_bwd)
