"""BiT's pre-activation ResNetV2 as a Flax linen module, numerically identical to the official code.

Parameter names follow the official checkpoint layout (see `bit.checkpoints` for the mapping):

  root_block/conv_root/kernel
  block{b}/unit{uu}/{gn1,conv1,gn2,conv2,gn3,conv3}, block{b}/unit01/conv_proj
  norm_pre_head/{scale,bias}, head/{kernel,bias}

Numerics, as in the official BiT code:
- Weight standardization over the H, W, I axes of each HWIO kernel, biased variance, eps 1e-10 inside the
  square root, always computed in float32.
- GroupNorm with 32 groups, eps 1e-5, two-pass variance, statistics in float32.
- Symmetric zero padding, then VALID convolutions (XLA's 'SAME' is asymmetric at stride 2) and a VALID
  max-pool after zero padding (flax's padded max_pool pads with -inf, BiT with zeros).
"""

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bit.errors import BitError

BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}

# The architectures of the released checkpoints.
ARCHITECTURES = {
  'R50x1': (50, 1),
  'R50x3': (50, 3),
  'R101x1': (101, 1),
  'R101x3': (101, 3),
  'R152x2': (152, 2),
  'R152x4': (152, 4),
}

MAX_WIDTH = 4
MIN_IMAGE_SIZE = 32


def parse_architecture(name: str) -> tuple[int, int]:
  """'R50x1' -> (50, 1). Any depth in BLOCKS and width 1..4 is accepted."""
  m = re.fullmatch(r'[Rr](\d+)[xX](\d+)', str(name).strip())
  if not m or int(m.group(1)) not in BLOCKS or not 1 <= int(m.group(2)) <= MAX_WIDTH:
    raise BitError(
      f'Unknown architecture {name!r}: expected R<depth>x<width> with depth in '
      f'{sorted(BLOCKS)} and width 1..{MAX_WIDTH}, e.g. R50x1 or R101x3.'
    )
  return int(m.group(1)), int(m.group(2))


def architecture_name(depth: int, width: int) -> str:
  return f'R{depth}x{width}'


def standardize(w: jax.Array, axis=(0, 1, 2), eps: float = 1e-10) -> jax.Array:
  """Weight standardization: zero mean, unit (biased) variance over `axis`, in float32."""
  w = w.astype(jnp.float32)
  if w.ndim == 4 and tuple(axis) == (0, 1, 2):
    return _standardize_hwio(w, eps)
  w = w - jnp.mean(w, axis=axis, keepdims=True)
  return w / jnp.sqrt(jnp.mean(jnp.square(w), axis=axis, keepdims=True) + eps)


# Standardization of an HWIO kernel on its (H*W*I, O) view with a hand-written gradient. Reducing over
# the three leading axes of the 4-D kernel, and XLA's autodiff of it, cost ~20% of an R50 train step on
# CPU; the 2-D view and the closed-form backward make it a few percent.
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


def fixed_padding(x: jax.Array, pad: int) -> jax.Array:
  """Symmetric zero padding of the spatial axes of an NHWC tensor."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def conv_1x1(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A stride-1 1x1 convolution of NHWC `x` with a (1, 1, Cin, Cout) kernel, as one matmul.

  Written as a (N*H*W, Cin) @ (Cin, Cout) dot for speed on CPU: XLA runs the weight gradient of a 1x1
  *convolution* at a small fraction of the matmul peak, while the dot's gradients are plain matmuls
  (~1.2x on a whole R50 train step). An explicit transpose of x for the weight gradient (behind an
  optimization barrier) measured ~8% slower than letting XLA fuse it, so autodiff does the backward.
  """
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[-2:]))
  return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1)) -> jax.Array:
  """VALID NHWC x HWIO convolution; 1x1 kernels go through `conv_1x1` (a matmul).

  On CPU, a convolution whose output has at most `MATMUL_MAX_PIXELS` pixels per image runs as an im2col
  matmul (`conv_matmul`), forward and backward.
  """
  if kernel.shape[:2] == (1, 1):
    if strides != (1, 1):
      x = x[:, :: strides[0], :: strides[1]]
    return conv_1x1(x, kernel)
  if _matmul_wanted(x.shape, kernel.shape, strides):
    return conv_matmul(x, kernel, tuple(strides))
  return _conv_xla(x, kernel, strides)


def _conv_xla(x, kernel, strides):
  return jax.lax.conv_general_dilated(
    x, kernel, window_strides=strides, padding='VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


# XLA's CPU convolution over few output pixels, forward and backward, can run at 1-16 GFLOP/s (its layout
# assignment swaps the batch and feature dimensions of tiny images): the 3x3 convolutions at 1x1-8x8 outputs
# were 2/3 of an R26x1 train step at 32 px. As im2col matmuls they take a tenth of that; at 16x16 and more
# XLA's own convolution is faster.
MATMUL_MAX_PIXELS = 64


def _matmul_wanted(x_shape, k_shape, strides) -> bool:
  ho = (x_shape[1] - k_shape[0]) // strides[0] + 1
  wo = (x_shape[2] - k_shape[1]) // strides[1] + 1
  return ho * wo <= MATMUL_MAX_PIXELS and jax.default_backend() == 'cpu'


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


def max_pool_3x3_s2_zero_padded(x: jax.Array) -> jax.Array:
  """BiT's root pooling: a VALID 3x3 max-pool with stride 2 of `x` zero-padded by 1, separable (rows, then
  columns) and without materializing the padded tensor. Equals `nn.max_pool(fixed_padding(x, 1), (3, 3),
  (2, 2), 'VALID')`, values and gradients (ties aside)."""
  return _zero_padded_pool_axis(_zero_padded_pool_axis(x, 1), 2)


@jax.custom_vjp
def gradient_barrier(x):
  """The identity, whose gradient is materialized before it flows on (an XLA optimization barrier).

  Used on the root convolution's output: without it XLA fused the max-pool and GroupNorm backward into the
  transposed copy its CPU kernel-gradient convolution needs (25 ms of a 600 ms R50x1 step at 128 px; 6 ms
  with the barrier; the whole step 3-4% faster in three alternating runs).
  """
  return x


gradient_barrier.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


class StdConv(nn.Module):
  """A bias-free convolution whose kernel is weight-standardized at every call.

  With `folded=True` the kernel is taken as already standardized (see `fold_for_inference`).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features), jnp.float32
    )
    if not self.folded:
      kernel = standardize(kernel)
    kernel = kernel.astype(self.dtype)
    return conv2d(x.astype(self.dtype), kernel, self.strides)


class GroupNorm(nn.Module):
  """BiT's GroupNorm: 32 groups, eps 1e-5, two-pass variance, statistics in float32.

  `relu=True` applies the ReLU that follows every GroupNorm in BiT inside the same op (`group_norm`).
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  relu: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise BitError(f'GroupNorm: {c} channels do not divide into {self.num_groups} groups.')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.relu).astype(self.dtype)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, scale, bias, groups: int = 32, eps: float = 1e-5, relu: bool = False):
  """GroupNorm of NHWC `x` (float32 statistics, returns float32), then ReLU if `relu`.

  Its gradient is written out (one reduction pass and one elementwise pass) instead of XLA's autodiff,
  which took ~2.5x longer on CPU; the values are the same up to float rounding.
  """
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


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class ResidualUnit(nn.Module):
  """Pre-activation bottleneck unit; the stride sits on the 3x3 convolution."""

  features: int  # the bottleneck width; the unit outputs 4x this
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(StdConv, dtype=self.dtype, folded=self.folded)
    norm = functools.partial(GroupNorm, dtype=self.dtype, relu=True)
    out = 4 * self.features
    y = norm(name='gn1')(x)
    # The projection takes the pre-activated input whenever channels or stride change (block1/unit01 too).
    if x.shape[-1] != out or self.strides != (1, 1):
      shortcut = conv(out, (1, 1), self.strides, name='conv_proj')(y)
    else:
      shortcut = x
    y = conv(self.features, (1, 1), name='conv1')(y)
    y = norm(name='gn2')(y)
    y = conv(self.features, (3, 3), self.strides, name='conv2')(fixed_padding(y, 1))
    y = norm(name='gn3')(y)
    y = conv(out, (1, 1), name='conv3')(y)
    return y + shortcut.astype(y.dtype)


def _remat_policy(prim, *_, **__) -> bool:
  """Rematerialization keeps the reductions' outputs (GroupNorm statistics: one number per image and channel,
  cheap to store, a full pass over the activation to recompute) and recomputes everything else."""
  return prim.name.startswith('reduce_')


REMAT = ('none', 'unit', 'stage')


def _maybe_remat(cls, on: bool):
  # nn.remat keeps the module's name and params: checkpoints load the same with or without it.
  return nn.remat(cls, policy=_remat_policy) if on else cls


class ResidualBlock(nn.Module):
  """A stage: `units` residual units named unit01, unit02, ...; the first one strides."""

  units: int
  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  folded: bool = False
  remat: str = 'none'  # 'unit': each unit's activations are recomputed in the backward pass

  @nn.compact
  def __call__(self, x):
    unit = _maybe_remat(ResidualUnit, self.remat == 'unit')
    for u in range(1, self.units + 1):
      strides = self.strides if u == 1 else (1, 1)
      x = unit(self.features, strides, dtype=self.dtype, folded=self.folded, name=f'unit{u:02d}')(x)
    return x


class ResNetV2(nn.Module):
  """BiT ResNetV2. `apply({'params': p}, images)` -> float32 logits; `pre_logits=True` -> pooled features.

  Images are NHWC floats in [-1, 1], at least 32x32. `dtype` is the compute dtype (e.g. jnp.bfloat16);
  parameters, weight standardization and GroupNorm statistics stay float32.

  `folded=True` is the inference form: it expects params from `fold_for_inference` (kernels standardized
  once) and skips the per-call standardization; use it for evaluation and prediction, not for training.
  """

  depth: int = 50
  width: int = 1
  num_classes: int = 1000
  dtype: Any = jnp.float32
  folded: bool = False
  remat: str = 'none'  # 'none', 'unit' or 'stage': what the backward pass recomputes instead of storing

  @property
  def num_features(self) -> int:
    return 2048 * self.width

  @property
  def architecture(self) -> str:
    return architecture_name(self.depth, self.width)

  @nn.compact
  def __call__(self, x, *, pre_logits: bool = False):
    if self.depth not in BLOCKS:
      raise BitError(f'Unknown depth {self.depth}: use one of {sorted(BLOCKS)}.')
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise BitError(
        f'ResNetV2 expects NHWC RGB images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got shape {x.shape}.'
      )
    base = 64 * self.width
    x = RootBlock(base, dtype=self.dtype, folded=self.folded, name='root_block')(x)
    if self.remat not in REMAT:
      raise BitError(f'remat={self.remat!r} is not one of {", ".join(REMAT)}.')
    block = _maybe_remat(ResidualBlock, self.remat == 'stage')
    for b, units in enumerate(BLOCKS[self.depth], 1):
      strides = (1, 1) if b == 1 else (2, 2)
      x = block(
        units,
        base * 2 ** (b - 1),
        strides,
        dtype=self.dtype,
        folded=self.folded,
        remat=self.remat,
        name=f'block{b}',
      )(x)
    x = GroupNorm(dtype=self.dtype, relu=True, name='norm_pre_head')(x)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if pre_logits:
      return features
    head = nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.zeros,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name='head',
    )
    return head(features)


class RootBlock(nn.Module):
  """7x7/2 standardized conv with symmetric zero padding, then a zero-padded VALID 3x3/2 max-pool."""

  features: int
  dtype: Any = jnp.float32
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    x = StdConv(self.features, (7, 7), (2, 2), dtype=self.dtype, folded=self.folded, name='conv_root')(
      fixed_padding(x, 3)
    )
    return max_pool_3x3_s2_zero_padded(gradient_barrier(x))


def create_model(arch: str, num_classes: int, dtype: Any = jnp.float32) -> ResNetV2:
  """A ResNetV2 for an architecture name such as 'R50x1'."""
  depth, width = parse_architecture(arch)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise BitError(f'num_classes must be a positive integer, got {num_classes!r}.')
  return ResNetV2(depth=depth, width=width, num_classes=num_classes, dtype=dtype)


def fold_for_inference(params):
  """Params with every conv kernel weight-standardized once, for `ResNetV2(..., folded=True)`.

  The result has the same tree and shapes; `model.clone(folded=True).apply({'params': folded}, x)` equals
  `model.apply({'params': params}, x)` up to float rounding, without re-standardizing at every call
  (~10-15% of an inference step on CPU). Not for training: the gradients would skip the standardization.
  """

  def fold(path, leaf):
    names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    if names[-1] == 'kernel' and len(names) >= 2 and str(names[-2]).startswith('conv') and leaf.ndim == 4:
      return standardize(leaf)
    return leaf

  return jax.jit(lambda p: jax.tree_util.tree_map_with_path(fold, p))(params)


@dataclasses.dataclass(frozen=True)
class Inference:
  """Inference with the weights standardized once rather than at every call.

  `prepared = inf.prepare(params)` once, then `inf(prepared, images)` per batch (jit it); gives the logits
  (or `pre_logits=True` features) of `model.apply({'params': params}, images)` up to float rounding.
  Hashable, so compiled functions can be cached per model.
  """

  model: ResNetV2

  def prepare(self, params):
    return fold_for_inference(params)

  def __call__(self, prepared, images, pre_logits: bool = False):
    return self.model.clone(folded=True).apply({'params': prepared}, images, pre_logits=pre_logits)


def init_params(model: ResNetV2, seed: int = 0, image_size: int = 64):
  """Randomly initialized float32 params (a plain nested dict); the head is zeros."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), images)
  return jax.tree_util.tree_map(lambda a: a, dict(variables['params']))


def param_shapes(model: ResNetV2):
  """The param tree as jax.ShapeDtypeStructs, without allocating anything."""
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
