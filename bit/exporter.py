"""Export a model's inference function for serving outside JAX: a TF SavedModel, ONNX, or serialized StableHLO.

  bit.export(model, params, 'savedmodel', 'exports/flowers_tf', size=224, labels=names)
  bit-export --workdir runs/tf_flowers --format onnx --input raw --output exports/flowers_onnx

What is exported is the inference function (kernels standardized once) (`models.Inference`: kernels standardized once, at export):
a batch of any size of `images` (NHWC RGB) -> `logits` and `probabilities` (softmax). `input` says what
`images` is: 'float32' in [-1, 1] at the export's side, 'uint8' 0..255 at that side (scaled inside), or 'raw'
uint8 at any height and width, resized inside exactly as `bit.preprocess` resizes (bilinear, half-pixel
centres, no antialiasing; `resize_bilinear`) and scaled. Each export is a directory:

  savedmodel/  saved_model.pb, variables/   `serving_default(images=...)` -> {'logits', 'probabilities'};
                                            with input='raw' also `serving_bytes(images=<encoded JPEG/PNG>)`
  onnx/        model.onnx                   inputs ['images'], outputs ['logits', 'probabilities']
  stablehlo/   model.stablehlo              `jax.export.deserialize(bytes).call(images)` -> dict
  + export.json (size, the input tensor, the exact preprocessing and the functions that reproduce it, what a
    wrong shape or dtype gives, the source checkpoint and its sha256, how to call it), labels.txt

- SavedModel: `jax2tf` (native serialization: the StableHLO runs inside TF's XlaCallModule op, lowered for
  CPU and CUDA), params as TF variables, a polymorphic batch (and height, width for 'raw'); the signature
  checks the image shape itself. `serving_bytes` decodes in TF ops as `bit.images.decode` does
  (`decode_bytes_tf`: the reduced-scale JPEG decode; not the EXIF orientation). Loads with
  `tf.saved_model.load`, no JAX.
- ONNX: written node by node from the standardized params with `onnx`'s helpers (`onnx_graph`): standard ops
  of the default domain at `ONNX_OPSET`, NHWC input transposed once to NCHW, a symbolic batch without shape
  arithmetic (GroupNorm is Reshape [0, 32, -1] + InstanceNormalization). Needs the `[export]` extra (onnx).
- StableHLO: `jax.export` bytes for CPU and CUDA, the exact form; reload with `jax.export.deserialize`.

docs/serving.md has the signatures, the preprocessing and the ONNX layout. The directory is built next to
`path` and renamed into place; an existing `path` is refused unless `overwrite=True`, which replaces only a
previous export (a directory with export.json), never anything else.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bit import files, models
from bit.errors import BitError
from bit.types import ExportManifest, Format, Input, Params, PathLike

FORMATS = ('savedmodel', 'onnx', 'stablehlo')
INPUTS = ('float32', 'uint8', 'raw')
ONNX_OPSET = 21
# The size an export of a model that does not say its own (a new head on a local .npz) is made at.
DEFAULT_SIZE = 224
ONNX_IR_VERSION = 10  # the IR of opset 21: onnxruntime >= 1.20 reads it
# Lowered for both, so one file serves on either; a platform jax.export cannot lower for is left out.
PLATFORMS = ('cpu', 'cuda')
FILES = {'savedmodel': 'saved_model.pb', 'onnx': 'model.onnx', 'stablehlo': 'model.stablehlo'}
EXTRA = "pip install 'bit-jax[export]' (in a checkout: pip install -e '.[export]')"

HOW_TO_CALL = {
  'savedmodel': (
    "import tensorflow as tf; m = tf.saved_model.load(DIR); out = m.signatures['serving_default']"
    "(images=tf.constant(x)); out['logits'], out['probabilities']"
  ),
  'onnx': (
    "import onnxruntime as ort; s = ort.InferenceSession(DIR + '/model.onnx'); "
    "logits, probabilities = s.run(['logits', 'probabilities'], {'images': x})"
  ),
  'stablehlo': (
    "import jax; f = jax.export.deserialize(open(DIR + '/model.stablehlo', 'rb').read()); "
    "out = f.call(x); out['logits'], out['probabilities']"
  ),
}


def check_format(format: str) -> str:
  if format not in FORMATS:
    raise BitError(f'Unknown export format {format!r}: use one of {", ".join(FORMATS)}.')
  return format


def check_size(size: Any) -> int:
  """`size` as an int of at least `models.MIN_IMAGE_SIZE`; BitError naming it otherwise."""
  if not isinstance(size, (int, np.integer)) or int(size) < models.MIN_IMAGE_SIZE:
    raise BitError(f'size must be an integer of at least {models.MIN_IMAGE_SIZE} pixels, got {size!r}.')
  return int(size)


def _check_input(input: str) -> str:
  if input not in INPUTS:
    raise BitError(
      f'Unknown input convention {input!r}: use float32 (NHWC in [-1, 1] at the export size), uint8 (0..255 at '
      'the export size) or raw (uint8 0..255 at any size, resized inside).'
    )
  return input


def _import_onnx():
  try:
    import onnx
  except ImportError as e:
    raise BitError(f"format 'onnx' needs the onnx package ({e.name} is not installed): {EXTRA}.") from None
  return onnx


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """A float NHWC batch (any height and width, symbolic too) resized to `size` x `size` as `bit.preprocess`
  resizes (`bit.prediction.resize_bilinear`, `tf.image.resize(..., 'bilinear', antialias=False)`): half-pixel
  centres, edge-clamped, two taps per axis, no antialiasing. Gathers, so jax.export keeps H and W symbolic."""

  def axis(x, ax):
    n = x.shape[ax]
    if not isinstance(n, int) or n != size:
      n_in = jnp.asarray(n, jnp.float32)
      src = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (n_in / size) - 0.5
      src = jnp.clip(src, 0.0, n_in - 1.0)
      lo = jnp.floor(src)
      w = src - lo
      lo = lo.astype(jnp.int32)
      hi = jnp.minimum(lo + 1, jnp.asarray(n, jnp.int32) - 1)
      shape = [1] * x.ndim
      shape[ax] = size
      w = w.reshape(shape)
      x = jnp.take(x, lo, axis=ax) * (1.0 - w) + jnp.take(x, hi, axis=ax) * w
    return x

  return axis(axis(images, 1), 2)


def serving_function(
  model: models.ResNetV2, prepared: Params, input: Input = 'float32', size: int | None = None
) -> Callable[[Params, jax.Array], dict[str, jax.Array]]:
  """images (NHWC: float32 in [-1, 1] or uint8 at the model's size, or with `input='raw'` uint8 at any size,
  resized to `size` inside) -> {'logits', 'probabilities'}, with `prepared` params
  (`models.Inference(model).prepare(params)`) as its first argument: `fn(prepared, images)`."""
  inference = models.Inference(model)
  if input == 'raw' and size is None:
    raise BitError("serving_function: input='raw' needs size= (the side the images are resized to).")

  def fn(prepared, images):
    if input == 'float32':
      x = images
    else:
      x = images.astype(jnp.float32)
      if input == 'raw':
        assert size is not None  # checked above
        x = resize_bilinear(x, size)
      x = x / 127.5 - 1.0
    logits = inference(prepared, x)
    return {'logits': logits, 'probabilities': jax.nn.softmax(logits, axis=-1)}

  fn.model = model  # type: ignore[attr-defined]  (the ONNX writer builds its graph from the model)
  return fn


def _channels(prepared) -> int:
  # The model's input channels follow its root kernel (bit.load(..., in_chans=C)).
  return int(prepared['root_block']['conv_root']['kernel'].shape[2])


def _image_dtype(input):
  return jnp.float32 if input == 'float32' else jnp.uint8


def _shape(size, input, channels: int = 3) -> str:
  return f'(batch, height, width, {channels})' if input == 'raw' else f'(batch, {size}, {size}, {channels})'


def decode_bytes_tf(tf: Any, data: Any, size: int) -> Any:
  """One encoded image (a scalar string tensor) as float32 (size, size, 3) pixels 0..255, in TF ops, as
  `bit.images.decode(data, size)` then `bit.prediction.resize_bilinear` do: a JPEG whose short side is at
  least twice `size` is decoded at 1/2, 1/4 or 1/8 scale in the DCT (libjpeg's scaled IDCT, as Pillow's
  draft mode), never below `size`; the accurate integer IDCT (Pillow's); other formats (PNG, GIF's first
  frame, BMP) in full. Then TF's bilinear resize without antialiasing. Differs from bit's decoder in that
  the EXIF orientation is not applied, and CMYK JPEGs are not read."""

  def jpeg(ratio):
    return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method='INTEGER_ACCURATE')

  def other():
    return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)

  def decoded_jpeg():
    shape = tf.io.extract_jpeg_shape(data)
    short = tf.minimum(shape[0], shape[1])
    # The largest of 1, 2, 4, 8 with short // ratio >= size (bit.images.decode's choice).
    index = tf.reduce_sum(tf.cast(short // tf.constant([2, 4, 8]) >= size, tf.int32))
    return tf.switch_case(index, [jpeg(1), jpeg(2), jpeg(4), jpeg(8)])

  image = tf.cond(tf.io.is_jpeg(data), decoded_jpeg, other)
  image.set_shape([None, None, 3])
  resized = tf.image.resize(tf.cast(image, tf.float32)[None], [size, size], 'bilinear', antialias=False)[0]
  # tf.image.resize returns its input unchanged at the same size; bit's resize too.
  return resized


def _write_savedmodel(fn, prepared, size, input, out: pathlib.Path) -> dict:
  import tensorflow as tf
  from jax.experimental import jax2tf

  tf.config.set_visible_devices([], 'GPU')  # TF must not take the accelerator JAX uses

  def convert(f, shape):
    return jax2tf.convert(
      f, polymorphic_shapes=[None, shape], with_gradient=False, native_serialization_platforms=PLATFORMS
    )

  converted = convert(fn, _shape(size, input, _channels(prepared)))
  module = tf.Module()
  # Variables, not constants: a graph over 2 GB (R152x4) cannot be a protobuf.
  module.params = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a), trainable=False), prepared)
  side = None if input == 'raw' else size
  spec = tf.TensorSpec(
    [None, side, side, _channels(prepared)], tf.float32 if input == 'float32' else tf.uint8, name='images'
  )

  expected = (
    f'a {spec.dtype.name} tensor of shape [batch, {side or "height"}, {side or "width"}, 3] (NHWC RGB)'
  )

  @tf.function(autograph=False, input_signature=[spec])
  def serve(images):
    # A signature checks the dtype but not the shape of what it is fed: checked here, before the model runs.
    shape = tf.shape(images)
    ok = tf.equal(tf.size(shape), 4)
    want = tf.constant([side or 1, side or 1, 3])
    dims = tf.concat([shape, [1, 1, 1, 1]], 0)[1:4]  # padded: a tensor of lower rank fails the check above
    same = tf.logical_or(tf.equal(dims, want), tf.constant([side is None, side is None, False]))
    ok = tf.logical_and(ok, tf.reduce_all(same))
    check = tf.debugging.Assert(ok, [f'images must be {expected}; got shape', shape], summarize=8)
    with tf.control_dependencies([check]):
      return converted(module.params, tf.identity(images))

  module.serve = serve
  signatures = {'serving_default': serve}
  if input == 'raw':
    # Encoded JPEG/PNG bytes, one string per image (each at its own size): decoded and resized in TF, then the
    # float32 model at `size`.
    model_fn = convert(serving_function(fn.model, prepared, 'float32'), _shape(size, 'float32'))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name='images')])
    def serve_bytes(images):
      pixels = tf.map_fn(
        lambda s: decode_bytes_tf(tf, s, size),
        images,
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
      )
      return model_fn(module.params, pixels / 127.5 - 1.0)

    module.serve_bytes = serve_bytes
    signatures['serving_bytes'] = serve_bytes
  tf.saved_model.save(module, str(out), signatures=signatures)
  return {'signature': 'serving_default', 'signatures': list(signatures), 'platforms': list(PLATFORMS)}


# --- ONNX, written straight from the standardized params ----------------------------------------------------


class _OnnxGraph:
  """Nodes and initializers of one ONNX graph, with fresh value names."""

  def __init__(self, onnx):
    self.onnx, self.helper = onnx, onnx.helper
    self.nodes, self.initializers, self.count = [], [], 0

  def name(self, prefix):
    self.count += 1
    return f'{prefix}_{self.count}'

  def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
    from onnx import numpy_helper

    self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name

  def op(self, op_type, inputs, prefix=None, **attrs):
    out = self.name(prefix or op_type.lower())
    self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
    return out


def _onnx_conv(g, x, kernel, name, stride=1, pad=0):
  """A bias-free convolution with an already standardized HWIO kernel; `pad` zeros on each side (BiT's
  fixed padding), then VALID."""
  w = g.const(f'{name}/kernel', np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1)))  # HWIO -> OIHW
  kh, kw = np.shape(kernel)[:2]
  return g.op(
    'Conv', [x, w], name, kernel_shape=[kh, kw], strides=[stride, stride], pads=[pad] * 4, dilations=[1, 1]
  )


def _onnx_group_norm_relu(g, x, p, name, side, groups=32, eps=1e-5):
  """GroupNorm (32 groups, eps 1e-5) of an NCHW tensor of spatial side `side`, then ReLU.

  Reshape to (N, groups, C/groups * H * W) with [0, groups, -1] (0 keeps the batch, allowzero=0): no shape
  arithmetic around the norm. InstanceNormalization over that is the group's two-pass mean and variance;
  then the per-channel scale and bias, and the ReLU.
  """
  c = int(np.shape(p['scale'])[0])
  shape = g.const(f'{name}/groups', [0, groups, -1], np.int64)
  y = g.op('Reshape', [x, shape], f'{name}/reshape', allowzero=0)
  ones = g.const(f'{name}/ones', np.ones(groups))
  zeros = g.const(f'{name}/zeros', np.zeros(groups))
  y = g.op('InstanceNormalization', [y, ones, zeros], f'{name}/norm', epsilon=eps)
  back = g.const(f'{name}/shape', [0, c, side, side], np.int64)
  y = g.op('Reshape', [y, back], f'{name}/unshape', allowzero=0)
  y = g.op('Mul', [y, g.const(f'{name}/scale', np.reshape(p['scale'], (c, 1, 1)))], f'{name}/mul')
  y = g.op('Add', [y, g.const(f'{name}/bias', np.reshape(p['bias'], (c, 1, 1)))], f'{name}/add')
  return g.op('Relu', [y], f'{name}/relu')


def _conv_side(side, kernel, stride, pad):
  return (side + 2 * pad - kernel) // stride + 1


def _onnx_input(g, input, size):
  """From the NHWC `images` input to the NCHW float [-1, 1] tensor the network reads ('raw': resized to `size`)."""
  TensorProto = g.onnx.TensorProto
  x = 'images'
  if input != 'float32':
    x = g.op('Cast', [x], 'to_float', to=TensorProto.FLOAT)
  x = g.op('Transpose', [x], 'to_nchw', perm=[0, 3, 1, 2])
  if input == 'raw':
    # tf.image.resize(..., 'bilinear', antialias=False): half-pixel centres, edge-clamped, two taps per axis.
    sizes = g.const('resize/sizes', [size, size], np.int64)
    x = g.op(
      'Resize',
      [x, '', '', sizes],
      'resize',
      mode='linear',
      coordinate_transformation_mode='half_pixel',
      antialias=0,
      axes=[2, 3],
      exclude_outside=0,
      nearest_mode='floor',
    )
  if input != 'float32':
    x = g.op('Div', [x, g.const('scale/127.5', 127.5)], 'scale/div')
    x = g.op('Sub', [x, g.const('scale/one', 1.0)], 'scale/sub')
  return x


def _onnx_root(g, x, p, size):
  """The root block (7x7/2 conv, zero-padded 3x3/2 max-pool); returns its output and spatial side."""
  side = size
  root = p['root_block']['conv_root']['kernel']
  x = _onnx_conv(g, x, root, 'root_block/conv_root', stride=2, pad=3)
  side = _conv_side(side, 7, 2, 3)
  # BiT's zero-padded max-pool: pad with zeros (MaxPool's own padding would be -inf), then VALID.
  pads = g.const('root_block/pool/pads', [0, 0, 1, 1, 0, 0, 1, 1], np.int64)
  x = g.op('Pad', [x, pads, g.const('root_block/pool/zero', 0.0)], 'root_block/pool/pad', mode='constant')
  x = g.op('MaxPool', [x], 'root_block/pool', kernel_shape=[3, 3], strides=[2, 2])
  side = _conv_side(side, 3, 2, 1)
  return x, side


def _onnx_unit(g, x, q, name, stride, side):
  """One pre-activation bottleneck unit of params `q`; returns its output and spatial side."""
  y = _onnx_group_norm_relu(g, x, q['gn1'], f'{name}/gn1', side)
  shortcut = (
    _onnx_conv(g, y, q['conv_proj']['kernel'], f'{name}/conv_proj', stride) if 'conv_proj' in q else x
  )
  y = _onnx_conv(g, y, q['conv1']['kernel'], f'{name}/conv1')
  y = _onnx_group_norm_relu(g, y, q['gn2'], f'{name}/gn2', side)
  y = _onnx_conv(g, y, q['conv2']['kernel'], f'{name}/conv2', stride, pad=1)
  side = _conv_side(side, 3, stride, 1)
  y = _onnx_group_norm_relu(g, y, q['gn3'], f'{name}/gn3', side)
  y = _onnx_conv(g, y, q['conv3']['kernel'], f'{name}/conv3')
  x = g.op('Add', [y, shortcut], f'{name}/add')
  return x, side


def onnx_graph(model: models.ResNetV2, prepared: Params, size: int, input: Input = 'float32') -> Any:
  """The ONNX ModelProto of `serving_function(model, prepared, input, size)`, built node by node from the
  standardized params (`models.Inference(model).prepare(params)`): NHWC `images` (a symbolic batch; for
  'raw' a symbolic height and width too), transposed once to NCHW; outputs `logits` and `probabilities`."""
  onnx = _import_onnx()
  helper, TensorProto = onnx.helper, onnx.TensorProto
  g = _OnnxGraph(onnx)
  p = jax.tree_util.tree_map(np.asarray, prepared)
  if input == 'raw':
    in_shape = ['batch', 'height', 'width', 3]
  else:
    in_shape = ['batch', size, size, 3]
  dtype = TensorProto.FLOAT if input == 'float32' else TensorProto.UINT8
  x = _onnx_input(g, input, size)
  x, side = _onnx_root(g, x, p, size)
  for b, units in enumerate(models.BLOCKS[model.depth], 1):
    for u in range(1, units + 1):
      name = f'block{b}/unit{u:02d}'
      q = p[f'block{b}'][f'unit{u:02d}']
      stride = 2 if b > 1 and u == 1 else 1
      x, side = _onnx_unit(g, x, q, name, stride, side)
  x = _onnx_group_norm_relu(g, x, p['norm_pre_head'], 'norm_pre_head', side)
  x = g.op('GlobalAveragePool', [x], 'pool')
  x = g.op('Flatten', [x], 'flatten', axis=1)
  head = p['head']
  g.const('head/kernel', head['kernel'])
  g.const('head/bias', head['bias'])
  g.nodes.append(helper.make_node('Gemm', [x, 'head/kernel', 'head/bias'], ['logits'], name='head'))
  g.nodes.append(helper.make_node('Softmax', ['logits'], ['probabilities'], name='softmax', axis=-1))
  graph = helper.make_graph(
    g.nodes,
    'bit',
    [helper.make_tensor_value_info('images', dtype, in_shape)],
    [
      helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', model.num_classes]),
      helper.make_tensor_value_info('probabilities', TensorProto.FLOAT, ['batch', model.num_classes]),
    ],
    g.initializers,
  )
  proto = helper.make_model(
    graph,
    opset_imports=[helper.make_opsetid('', ONNX_OPSET)],
    producer_name='bit',
    producer_version=_version('bit-jax'),
  )
  proto.ir_version = min(proto.ir_version, ONNX_IR_VERSION)
  return proto


def _write_onnx(fn, prepared, size, input, out: pathlib.Path) -> dict:
  onnx = _import_onnx()
  proto = onnx_graph(fn.model, prepared, size, input)
  onnx.checker.check_model(proto)
  # The 2 GB protobuf limit: large models keep their weights in a file beside the graph.
  external = proto.ByteSize() > 1_800_000_000
  onnx.save_model(proto, str(out / FILES['onnx']), save_as_external_data=external, location='model.onnx.data')
  return {'opset': ONNX_OPSET, 'converter': f'bit (onnx {onnx.__version__} helpers)'}


def _write_stablehlo(fn, prepared, size, input, out: pathlib.Path) -> dict:
  spec = jax.ShapeDtypeStruct(
    jax.export.symbolic_shape(_shape(size, input, _channels(prepared))), _image_dtype(input)
  )
  exported = jax.export.export(jax.jit(lambda images: fn(prepared, images)), platforms=PLATFORMS)(spec)
  (out / FILES['stablehlo']).write_bytes(exported.serialize())
  return {
    'platforms': list(exported.platforms),
    'calling_convention_version': exported.calling_convention_version,
  }


WRITERS: dict[str, Callable[..., dict[str, Any]]] = {
  'savedmodel': _write_savedmodel,
  'onnx': _write_onnx,
  'stablehlo': _write_stablehlo,
}


RESIZE = (
  'resize straight to {s}x{s} (no crop, aspect ratio not kept) with bilinear interpolation WITHOUT antialiasing: '
  'half-pixel centres (source coordinate (i + 0.5) * in / {s} - 0.5, clamped to [0, in - 1]), two taps per '
  'axis, on float pixels 0..255'
)
SCALE = 'x / 127.5 - 1 (uint8 0..255 to float32 [-1, 1])'
REPRODUCE = [
  'bit.preprocess(images, size) (or bit.prediction.resize_bilinear on float pixels, then x / 127.5 - 1)',
  "tf.image.resize(x, [size, size], 'bilinear', antialias=False)",
  "onnxruntime's Resize (mode linear, coordinate_transformation_mode half_pixel, antialias 0)",
]
PIL_WARNING = (
  "Do not resize with PIL's Image.resize(..., BILINEAR), torchvision's resize(antialias=True), jax.image.resize "
  'or tf.image.resize(antialias=True): they antialias when downsampling (a wider filter), which is not what the '
  'model was trained and evaluated on; with PIL, predictions of a fine-tune flipped on 18 of 272 images.'
)
DECODE = (
  'bit.images.decode(file, size): Pillow, EXIF orientation applied, every mode to 8-bit RGB; a JPEG whose short '
  'side is at least 2 x size is decoded at 1/2, 1/4 or 1/8 scale in the DCT (the largest that keeps the short '
  'side >= size)'
)
SIGNATURE_ERRORS = {
  'savedmodel': 'refused before the model runs, with tf.errors.InvalidArgumentError: a wrong dtype "... was '
  'expected to be a {d} tensor but is a ... tensor", a wrong shape "assertion failed: [images must be a {d} '
  'tensor of shape [batch, {h}, {w}, 3] (NHWC RGB); got shape] [...]"',
  'onnx': 'refused before the model runs, with onnxruntime\'s INVALID_ARGUMENT: a wrong dtype "Unexpected input '
  'data type. Actual: (tensor(...)) , expected: (tensor({t}))", a wrong shape "Got invalid dimensions for '
  'input: images for the following indices index: 1 Got: ... Expected: {h}" (or "Invalid rank for input")',
  'stablehlo': 'refused before the model runs, with jax.export\'s ValueError: a wrong dtype "Dtype mismatch for '
  'args[0]: expected {d} and called with ...", a wrong shape "Shape mismatch for args[0].shape[1] ...: expected '
  '(batch, {h}, {w}, 3) and called with (...)" (or "Rank mismatch")',
}


def input_manifest(format: str, size: int, input: str, channels: int = 3) -> dict[str, Any]:
  """export.json's 'input': the tensor, and the exact transform between an image file and it."""
  dtype = 'float32' if input == 'float32' else 'uint8'
  side = None if input == 'raw' else size
  resize = RESIZE.format(s=size)
  if input == 'float32':
    inside, outside = 'nothing: the images are fed as given', [DECODE, resize, SCALE]
  elif input == 'uint8':
    inside, outside = SCALE, [DECODE, resize]
  else:
    inside, outside = f'{resize}, then {SCALE}', [DECODE]
  layout = 'NHWC, RGB' if channels == 3 else f'NHWC, {channels} channels'
  if format == 'onnx':
    layout += ' (the graph transposes to NCHW once, after the input; every op inside is NCHW)'
  shape = [None, side, side, channels]
  manifest = {
    'name': 'images',
    'convention': input,
    'dtype': dtype,
    'shape': shape,
    'layout': layout,
    'range': [-1.0, 1.0] if input == 'float32' else [0, 255],
    'batch': 'any size' + ('; one height and width per batch, any of them' if input == 'raw' else ''),
    'preprocessing_inside': inside,
    'preprocessing_before': outside,
    'reproduced_by': REPRODUCE,
    'warning': PIL_WARNING,
    'wrong_shape_or_dtype': SIGNATURE_ERRORS.get(format, '').format(
      h=side or 'height', w=side or 'width', d=dtype, t='float' if dtype == 'float32' else 'uint8'
    ),
  }
  if format == 'savedmodel' and input == 'raw':
    manifest['serving_bytes'] = {
      'input': 'images: a 1-D batch of strings, each one encoded JPEG, PNG, GIF (first frame) or BMP file, '
      'any size each',
      'decoding': 'in TF ops as bit.images.decode: a JPEG whose short side is at least 2 x size is decoded at '
      '1/2, 1/4 or 1/8 scale (tf.io.decode_jpeg(ratio=..., dct_method="INTEGER_ACCURATE"), the scaled IDCT '
      "Pillow's draft mode uses); then the resize and scale above. Unlike bit, the EXIF orientation is NOT "
      'applied (send upright images) and CMYK JPEGs are not read.',
    }
  return manifest


def _version(package):
  from importlib import metadata

  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return 'unknown'


def sha256_file(path: PathLike) -> str:
  """The hex sha256 of a file (export.json's `source_sha256`)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _refuse_existing(path: pathlib.Path, overwrite: bool) -> None:
  if not path.exists():
    return
  if not overwrite:
    raise BitError(f'{path} exists: give another path=, or overwrite=True to replace that export.')
  if not (path.is_dir() and (path / 'export.json').is_file()):
    raise BitError(
      f'{path} exists and is not a bit export (no export.json in it): overwrite=True replaces only a previous '
      'export; give another path=.'
    )


def export(
  model: models.ResNetV2,
  params: Params,
  format: Format,
  path: PathLike,
  *,
  size: int = 224,
  input: Input = 'float32',
  labels: Sequence[str] | None = None,
  source: PathLike | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes the inference function of `model` with `params` to the directory `path` in `format`.

  `format`: 'savedmodel', 'onnx' (needs the `[export]` extra) or 'stablehlo'. `size`: the image side the
  export takes (>= 32); the batch is free. `input`: 'float32' (values in [-1, 1]), 'uint8' (0..255, scaled
  inside) or 'raw' (uint8 at any height and width, resized to `size` inside as `bit.preprocess` does, then
  scaled; a SavedModel also gets `serving_bytes` for encoded images; docs/serving.md). `labels`: class names for labels.txt. `source`: the checkpoint file the params came from (its
  path and sha256 go into export.json). Returns `path`.
  """
  from bit import arguments

  model = arguments.check_model(model, 'bit.export')
  params = arguments.check_params(model, params, 'bit.export')
  check_format(format)
  size = check_size(size)
  _check_input(input)
  path = pathlib.Path(path).expanduser()
  _refuse_existing(path, overwrite)
  if labels is not None and len(labels) != model.num_classes:
    raise BitError(f'{len(labels)} class names for a model with {model.num_classes} classes.')
  if format == 'onnx':
    _import_onnx()  # before any work: say which extra is missing
  prepared = jax.device_get(models.Inference(model).prepare(params))
  fn = serving_function(model, prepared, input, size)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = files.temporary_dir(path.parent, prefix=f'.{path.name}.', suffix='.tmp')  # ends 0755 (umask 022)
  try:
    details = WRITERS[format](fn, prepared, size, input, tmp)
    if labels is not None:
      files.write_text(tmp / 'labels.txt', ''.join(f'{n}\n' for n in labels))
    source_path = pathlib.Path(source).expanduser().resolve() if source is not None else None
    manifest = {
      'format': format,
      'file': FILES[format],
      'architecture': model.architecture,
      'num_classes': model.num_classes,
      'size': size,
      'input': input_manifest(format, size, input, model.in_chans),
      'outputs': {'logits': [None, model.num_classes], 'probabilities': [None, model.num_classes]},
      'labels': 'labels.txt' if labels is not None else None,
      'source': str(source_path) if source_path else None,
      'source_sha256': sha256_file(source_path) if source_path and source_path.is_file() else None,
      'how_to_call': HOW_TO_CALL[format].replace('DIR', repr(str(path))),
      'exported_with': {'bit': _version('bit-jax'), 'jax': jax.__version__},
      **details,
    }
    files.write_json(tmp / 'export.json', manifest)
    files.replace_dir(tmp, path)  # a previous export (checked above) is removed once the new one is in
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def read_manifest(path: PathLike) -> ExportManifest:
  return json.loads((pathlib.Path(path) / 'export.json').read_text())


def load_source(
  *,
  workdir: PathLike | None = None,
  model: PathLike | None = None,
  num_classes: int | None = None,
  keep_head: bool = False,
) -> tuple[Any, Params, list[str] | None, int, pathlib.Path | None]:
  """(model, params, class_names, size, checkpoint_path) for `bit-export`.

  `workdir`: a finished bit-train run (its model.npz, labels.txt and the crop of its config.json). `model`:
  a registry name or a local official-layout .npz, loaded by `bit.load(model, num_classes,
  keep_head=keep_head)`; its class names when its own head is kept.
  """
  from bit import checkpoints

  if (workdir is None) == (model is None):
    raise BitError('Give either workdir= (a bit-train run) or model= (a registry name or an .npz), not both.')
  if workdir is not None:
    from bit import workdir as workdir_lib

    run = workdir_lib.load(workdir)
    return run.model, run.params, run.class_names, int(run.model.input_size), run.npz
  net, params = checkpoints.load(model, num_classes, keep_head=keep_head)
  names = checkpoints.label_names(model) if keep_head else None
  if names is not None and len(names) != net.num_classes:
    names = None
  # A kept head knows its size (`bit.load`: the registry's resolution, or the crop of the run's config.json
  # beside a local .npz); a new head takes the registry's, else BiT's usual 224.
  size, path = net.input_size, None
  try:
    cfg = checkpoints.get_pretrained_cfg(str(model))
    size = size or cfg.resolution
    path = checkpoints.cache_path(cfg.url)
  except BitError:
    path = pathlib.Path(model).expanduser()
  return net, params, names, int(size or DEFAULT_SIZE), path
