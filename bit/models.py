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

The modules call the ops of `bit.ops` by name (`ops.standardize`, `ops.conv`, `ops.group_norm`,
`ops.zero_padded_max_pool`, `ops.root_barrier`); whether each takes its fast form or its plain reference is
`bit.ops`'s switch (`BIT_FAST_OPS`), never the model's.
"""

import dataclasses
import functools
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bit import ops
from bit.errors import BitError
from bit.types import DType, Params

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
# The compute dtypes by name (config.dtype); params, GroupNorm statistics and the optimizer stay float32.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


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


# The ops, by name (bit/ops.py holds each fast form beside its reference, and the switch between them).
fixed_padding: Callable[..., jax.Array] = ops.fixed_padding
standardize: Callable[..., jax.Array] = ops.standardize


class StdConv(nn.Module):
  """A bias-free convolution whose kernel is weight-standardized at every call.

  With `standardized=True` the kernel is taken as already standardized (see `standardize_kernels`).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  standardized: bool = False

  @nn.compact
  def __call__(self, x: Any) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features), jnp.float32
    )
    if not self.standardized:
      kernel = ops.standardize(kernel)
    return ops.conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)


class GroupNorm(nn.Module):
  """BiT's GroupNorm: 32 groups, eps 1e-5, two-pass variance, statistics in float32.

  `relu=True` applies the ReLU that follows every GroupNorm in BiT inside the same op (`ops.group_norm`).
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  relu: bool = False

  @nn.compact
  def __call__(self, x: Any) -> Any:
    c = x.shape[-1]
    if c % self.num_groups:
      raise BitError(f'GroupNorm: {c} channels do not divide into {self.num_groups} groups.')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return ops.group_norm(x, scale, bias, self.num_groups, self.epsilon, self.relu).astype(self.dtype)


class ResidualUnit(nn.Module):
  """Pre-activation bottleneck unit; the stride sits on the 3x3 convolution."""

  features: int  # the bottleneck width; the unit outputs 4x this
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  standardized: bool = False

  @nn.compact
  def __call__(self, x: Any) -> Any:
    conv = functools.partial(StdConv, dtype=self.dtype, standardized=self.standardized)
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
    y = conv(self.features, (3, 3), self.strides, name='conv2')(ops.fixed_padding(y, 1))
    y = norm(name='gn3')(y)
    y = conv(out, (1, 1), name='conv3')(y)
    return y + shortcut.astype(y.dtype)


REMAT = ('none', 'unit', 'stage')


def _recomputed(module: nn.Module):
  """`module` as a function whose backward pass recomputes its activations: only its input and params are
  kept from the forward pass (Flax param names unchanged).

  Not `nn.remat`: jax.checkpoint keeps the recomputation apart from the forward pass with an XLA
  optimization barrier, and XLA's CPU compiler removes those barriers before its common-subexpression
  elimination and scheduling, which then merged the recomputation back into the forward pass: every
  activation stayed live and the temporaries grew (docs/long-runs.md). Here the recomputation reads its
  input and params plus zero times one element of the incoming gradient: the same values (x + 0.0 == x; a
  non-finite gradient gives non-finite gradients, as it would anyway), but a data dependency no compiler
  pass removes, so it can neither be merged with the forward pass nor run before the backward pass reaches
  it, on any backend. The params are recomputed from too, so the standardized kernels are not kept either.
  """
  unbound = module.clone(parent=None, name=None)

  def apply(params, x):
    return unbound.apply({'params': params}, x)

  def fn(mdl, x):
    return mdl(x)

  def fwd(mdl, x):
    return mdl(x), (mdl.variables['params'], x)

  def bwd(res, g):
    params, x = res
    zero = jnp.ravel(g)[0].astype(jnp.float32) * 0.0
    params = jax.tree.map(lambda p: p + zero.astype(p.dtype), params)
    _, vjp = jax.vjp(apply, params, x + zero.astype(x.dtype))
    dparams, dx = vjp(g)
    return {'params': dparams}, dx

  return functools.partial(nn.custom_vjp(fn, forward_fn=fwd, backward_fn=bwd), module)


class ResidualBlock(nn.Module):
  """A stage: `units` residual units named unit01, unit02, ...; the first one strides."""

  units: int
  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  standardized: bool = False
  remat: str = 'none'  # 'unit': each unit's activations are recomputed in the backward pass

  @nn.compact
  def __call__(self, x: Any) -> Any:
    for u in range(1, self.units + 1):
      strides = self.strides if u == 1 else (1, 1)
      unit = ResidualUnit(
        self.features, strides, dtype=self.dtype, standardized=self.standardized, name=f'unit{u:02d}'
      )
      x = (_recomputed(unit) if self.remat == 'unit' else unit)(x)
    return x


class ResNetV2(nn.Module):
  """BiT ResNetV2. `apply({'params': p}, images)` -> float32 logits; `pre_logits=True` -> pooled features.

  `features=True` -> a dict for use as a backbone (detection, segmentation): `stem` (after the root's
  max-pool, stride 4, 64w channels), `stage1` .. `stage4` (the outputs of block1 .. block4: strides 4, 8, 16,
  32; 256w, 512w, 1024w, 2048w channels; pre-activation, i.e. before any norm, in the compute dtype), and
  `pre_logits` and `logits`, identical to the plain call's.

  Images are NHWC floats in [-1, 1], at least 32x32, with `in_chans` channels (3, RGB, unless the root kernel
  was adapted by `bit.load(..., in_chans=C)`; the root kernel's input axis is the model's channel count). `dtype` is the compute dtype (e.g. jnp.bfloat16);
  parameters, weight standardization and GroupNorm statistics stay float32.

  `standardized=True` is the inference form: it expects params from `standardize_kernels` (kernels standardized
  once) and skips the per-call standardization; use it for evaluation and prediction, not for training.

  `input_size` is the image side the model was trained (or fine-tuned) at, when known (`bit.load` sets it from
  the registry or a run's config.json); `bit.evaluate` and `bit.predict` use it when given no size. It does
  not change the params or the computation: the model takes any size >= 32.
  """

  depth: int = 50
  width: int = 1
  num_classes: int = 1000
  dtype: Any = jnp.float32
  standardized: bool = False
  remat: str = 'none'  # 'none', 'unit' or 'stage': what the backward pass recomputes instead of storing
  input_size: int | None = None
  in_chans: int = 3

  @property
  def num_features(self) -> int:
    return 2048 * self.width

  @property
  def architecture(self) -> str:
    return architecture_name(self.depth, self.width)

  @nn.compact
  def __call__(
    self, x: jax.Array | np.ndarray, *, pre_logits: bool = False, features: bool = False
  ) -> jax.Array | dict[str, jax.Array]:
    if self.depth not in BLOCKS:
      raise BitError(f'Unknown depth {self.depth}: use one of {sorted(BLOCKS)}.')
    if x.ndim != 4 or x.shape[-1] != self.in_chans or min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      what = 'RGB images' if self.in_chans == 3 else f'images of {self.in_chans} channels (in_chans)'
      raise BitError(
        f'ResNetV2 expects NHWC {what} of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got shape {x.shape}.'
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):  # a trace-time check: free under jit
      raise BitError(
        f'ResNetV2 takes float images with values in [-1, 1] (float32), got dtype {x.dtype}: convert '
        'uint8 pixels with bit.preprocess(images) (or x / 127.5 - 1), never pass 0..255 integers.'
      )
    base = 64 * self.width
    x = RootBlock(base, dtype=self.dtype, standardized=self.standardized, name='root_block')(x)
    out = {'stem': x}
    if self.remat not in REMAT:
      raise BitError(f'remat={self.remat!r} is not one of {", ".join(REMAT)}.')
    for b, units in enumerate(BLOCKS[self.depth], 1):
      strides = (1, 1) if b == 1 else (2, 2)
      block = ResidualBlock(
        units,
        base * 2 ** (b - 1),
        strides,
        dtype=self.dtype,
        standardized=self.standardized,
        remat=self.remat,
        name=f'block{b}',
      )
      x = (_recomputed(block) if self.remat == 'stage' else block)(x)
      out[f'stage{b}'] = x
    x = GroupNorm(dtype=self.dtype, relu=True, name='norm_pre_head')(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if pre_logits and not features:
      return pooled
    head = nn.Dense(
      self.num_classes,
      kernel_init=nn.initializers.zeros,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name='head',
    )
    logits = head(pooled)
    if features:
      return {**out, 'pre_logits': pooled, 'logits': logits}
    return logits


class RootBlock(nn.Module):
  """7x7/2 standardized conv with symmetric zero padding, then a zero-padded VALID 3x3/2 max-pool."""

  features: int
  dtype: Any = jnp.float32
  standardized: bool = False

  @nn.compact
  def __call__(self, x: Any) -> jax.Array:
    x = StdConv(
      self.features, (7, 7), (2, 2), dtype=self.dtype, standardized=self.standardized, name='conv_root'
    )(ops.fixed_padding(x, 3))
    return ops.zero_padded_max_pool(ops.root_barrier(x))


def create_model(
  arch: str,
  num_classes: int,
  dtype: DType = jnp.float32,
  input_size: int | None = None,
  in_chans: int = 3,
) -> ResNetV2:
  """A ResNetV2 for an architecture name such as 'R50x1' (`in_chans` input channels, RGB by default)."""
  depth, width = parse_architecture(arch)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise BitError(f'num_classes must be a positive integer, got {num_classes!r}.')
  if input_size is not None and (not isinstance(input_size, int) or input_size < MIN_IMAGE_SIZE):
    raise BitError(f'input_size must be an integer >= {MIN_IMAGE_SIZE}, got {input_size!r}.')
  check_in_chans(in_chans)
  return ResNetV2(
    depth=depth, width=width, num_classes=num_classes, dtype=dtype, input_size=input_size, in_chans=in_chans
  )


def check_in_chans(in_chans: object) -> int:
  """`in_chans` as an int >= 1; BitError naming the value otherwise."""
  if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
    raise BitError(
      f'in_chans must be a positive integer (the input image channels: 3 for RGB, 1 for gray), got {in_chans!r}.'
    )
  return in_chans


def standardize_kernels(params: Params) -> dict[str, Any]:
  """Params with every conv kernel weight-standardized once, for `ResNetV2(..., standardized=True)`.

  The result has the same tree and shapes; `model.clone(standardized=True).apply({'params': standardized}, x)` equals
  `model.apply({'params': params}, x)` up to float rounding, without re-standardizing at every call (a
  noticeable share of an inference step on CPU). Not for training: the gradients would skip the standardization.
  """

  def standardize(path, leaf):
    return ops.standardize(leaf) if is_standardized_kernel(path, leaf) else leaf

  return jax.jit(lambda p: jax.tree_util.tree_map_with_path(standardize, p))(params)


# The name before 2026-12 ("folded" read as BatchNorm folding; nothing is folded, the kernels are standardized).
fold_for_inference = standardize_kernels


def is_standardized_kernel(path: tuple[Any, ...], leaf: Any) -> bool:
  """Whether the leaf at `path` (a jax key path) is a conv kernel that `StdConv` weight-standardizes."""
  names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  return (
    len(names) >= 2
    and names[-1] == 'kernel'
    and str(names[-2]).startswith('conv')
    and getattr(leaf, 'ndim', None) == 4
  )


@dataclasses.dataclass(frozen=True)
class Inference:
  """Inference with the weights standardized once rather than at every call.

  `prepared = inf.prepare(params)` once, then `inf(prepared, images)` per batch (jit it); gives the logits
  (or `pre_logits=True` features) of `model.apply({'params': params}, images)` up to float rounding.
  Hashable, so compiled functions can be cached per model.
  """

  model: ResNetV2

  def prepare(self, params: Params) -> dict[str, Any]:
    """The params with every conv kernel standardized once (`standardize_kernels`)."""
    return standardize_kernels(params)

  def __call__(
    self, prepared: Params, images: jax.Array | np.ndarray, pre_logits: bool = False, features: bool = False
  ) -> jax.Array | dict[str, jax.Array]:
    return self.model.clone(standardized=True).apply(
      {'params': prepared}, images, pre_logits=pre_logits, features=features
    )


def init_params(model: ResNetV2, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
  """Randomly initialized float32 params (a plain nested dict); the head is zeros."""
  images = jnp.zeros((1, image_size, image_size, model.in_chans), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), images)
  return jax.tree_util.tree_map(lambda a: a, dict(variables['params']))


def param_shapes(model: ResNetV2) -> Any:
  """The param tree as jax.ShapeDtypeStructs, without allocating anything."""
  images = jax.ShapeDtypeStruct((1, 64, 64, model.in_chans), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']


def count_params(tree: Any) -> int:
  """The number of scalars in a param tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
