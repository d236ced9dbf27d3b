"""Export a model's inference function for serving outside JAX: a TF SavedModel, ONNX, or serialized StableHLO.

  bit.export(model, params, 'savedmodel', 'exports/flowers_tf', size=224, labels=names)
  bit-export --workdir runs/tf_flowers --format onnx --output exports/flowers_onnx

What is exported is the folded inference function (`models.Inference`: kernels standardized once, at export):
a batch of any size of `images` at a fixed side (NHWC RGB, float32 in [-1, 1], or uint8 0..255 with
`input='uint8'`, scaled inside) -> `logits` and `probabilities` (softmax). Each export is a directory:

  savedmodel/  saved_model.pb, variables/   `serving_default(images=...)` -> {'logits', 'probabilities'}
  onnx/        model.onnx                   inputs ['images'], outputs ['logits', 'probabilities']
  stablehlo/   model.stablehlo              `jax.export.deserialize(bytes).call(images)` -> dict
  + export.json (size, input convention, source checkpoint and its sha256, how to call it), labels.txt

- SavedModel: `jax2tf` (native serialization: the StableHLO runs inside TF's XlaCallModule op, lowered for
  CPU and CUDA), params as TF variables, a polymorphic batch. Loads with `tf.saved_model.load`, no JAX.
- ONNX: `jax2onnx` straight from the JAX function (tf2onnx cannot read a jax2tf SavedModel: its one
  XlaCallModule op has no ONNX equivalent, and jax2tf no longer emits plain TF ops). Standard ops of the
  default domain at `ONNX_OPSET`, a symbolic batch. Needs the `[export]` extra.
- StableHLO: `jax.export` bytes for CPU and CUDA, the exact form; reload with `jax.export.deserialize`.

The directory is built next to `path` and renamed into place; an existing `path` is refused unless
`overwrite=True`, which replaces only a previous export (a directory with export.json), never anything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bit import files, models
from bit.errors import BitError
from bit.types import ExportManifest, Format, Input, Params, PathLike

FORMATS = ('savedmodel', 'onnx', 'stablehlo')
INPUTS = ('float32', 'uint8')
ONNX_OPSET = 21
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


def check_size(size) -> int:
  if not isinstance(size, (int, np.integer)) or int(size) < models.MIN_IMAGE_SIZE:
    raise BitError(f'size must be an integer of at least {models.MIN_IMAGE_SIZE} pixels, got {size!r}.')
  return int(size)


def _check_input(input: str) -> str:
  if input not in INPUTS:
    raise BitError(f'Unknown input convention {input!r}: use float32 (values in [-1, 1]) or uint8 (0..255).')
  return input


def _import_onnx_converter():
  try:
    import jax2onnx
    import onnx
  except ImportError as e:
    raise BitError(f"format 'onnx' needs jax2onnx and onnx ({e.name} is not installed): {EXTRA}.") from None
  return jax2onnx, onnx


def serving_function(model, prepared, input: str = 'float32'):
  """images (NHWC, float32 in [-1, 1] or uint8) -> {'logits', 'probabilities'}, with `prepared` params
  (`models.Inference(model).prepare(params)`) as its first argument: `fn(prepared, images)`."""
  inference = models.Inference(model)

  def fn(prepared, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0 if input == 'uint8' else images
    logits = inference(prepared, x)
    return {'logits': logits, 'probabilities': jax.nn.softmax(logits, axis=-1)}

  return fn


def _image_dtype(input):
  return jnp.uint8 if input == 'uint8' else jnp.float32


def _write_savedmodel(fn, prepared, size, input, out: pathlib.Path) -> dict:
  import tensorflow as tf
  from jax.experimental import jax2tf

  tf.config.set_visible_devices([], 'GPU')  # TF must not take the accelerator JAX uses
  converted = jax2tf.convert(
    fn,
    polymorphic_shapes=[None, f'(batch, {size}, {size}, 3)'],
    with_gradient=False,
    native_serialization_platforms=PLATFORMS,
  )
  module = tf.Module()
  # Variables, not constants: a graph over 2 GB (R152x4) cannot be a protobuf.
  module.params = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a), trainable=False), prepared)
  spec = tf.TensorSpec([None, size, size, 3], tf.uint8 if input == 'uint8' else tf.float32, name='images')

  @tf.function(autograph=False, input_signature=[spec])
  def serve(images):
    return converted(module.params, images)

  module.serve = serve
  tf.saved_model.save(module, str(out), signatures={'serving_default': serve})
  return {'signature': 'serving_default', 'platforms': list(PLATFORMS)}


def _write_onnx(fn, prepared, size, input, out: pathlib.Path) -> dict:
  jax2onnx, onnx = _import_onnx_converter()
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'batch, {size}, {size}, 3'), _image_dtype(input))

  def tupled(images):
    result = fn(prepared, images)
    return result['logits'], result['probabilities']

  # onnx_ir warns about every shape value it leaves untyped; the graph is checked by onnxruntime instead.
  quiet = logging.getLogger('onnx_ir')
  level = quiet.level
  quiet.setLevel(logging.ERROR)
  with _jax2onnx_symbolic_pad():
    proto = jax2onnx.to_onnx(
      tupled,
      [spec],
      model_name='bit',
      opset=ONNX_OPSET,
      input_names=['images'],
      output_names=['logits', 'probabilities'],
    )
  quiet.setLevel(level)
  # The 2 GB protobuf limit: large models keep their weights in a file beside the graph.
  external = proto.ByteSize() > 1_800_000_000 if hasattr(proto, 'ByteSize') else False
  onnx.save_model(proto, str(out / FILES['onnx']), save_as_external_data=external, location='model.onnx.data')
  return {'opset': ONNX_OPSET, 'converter': f'jax2onnx {_version("jax2onnx")}'}


class _jax2onnx_symbolic_pad:
  """jax2onnx 0.17's lax.pad lowering builds its output shape with `onnx_ir.Shape(dims)`, which calls int() on
  a symbolic batch dimension and fails; its own helper (`_ir_shapes._to_ir_dim_for_shape`) turns such a
  dimension into a named ONNX dimension. This routes that one call through the helper while converting."""

  def __enter__(self):
    import types

    import onnx_ir

    try:
      from jax2onnx.plugins import _ir_shapes
      from jax2onnx.plugins.jax.lax import pad
    except ImportError:  # a jax2onnx laid out differently: nothing to route
      self.module = None
      return self
    if getattr(pad, 'ir', None) is not onnx_ir:
      self.module = None
      return self

    class Proxy(types.ModuleType):
      def __getattr__(self, name):
        return getattr(onnx_ir, name)

    proxy = Proxy('onnx_ir')
    proxy.Shape = lambda dims, *a, **k: onnx_ir.Shape(
      [_ir_shapes._to_ir_dim_for_shape(d) for d in dims], *a, **k
    )
    self.module, self.original = pad, onnx_ir
    pad.ir = proxy
    return self

  def __exit__(self, *exc):
    if self.module is not None:
      self.module.ir = self.original


def _write_stablehlo(fn, prepared, size, input, out: pathlib.Path) -> dict:
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'batch, {size}, {size}, 3'), _image_dtype(input))
  exported = jax.export.export(jax.jit(lambda images: fn(prepared, images)), platforms=PLATFORMS)(spec)
  (out / FILES['stablehlo']).write_bytes(exported.serialize())
  return {
    'platforms': list(exported.platforms),
    'calling_convention_version': exported.calling_convention_version,
  }


WRITERS = {'savedmodel': _write_savedmodel, 'onnx': _write_onnx, 'stablehlo': _write_stablehlo}


def _version(package):
  from importlib import metadata

  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return 'unknown'


def sha256_file(path) -> str:
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
  export takes (>= 32); the batch is free. `input`: 'float32' (values in [-1, 1]) or 'uint8' (0..255, scaled
  inside). `labels`: class names for labels.txt. `source`: the checkpoint file the params came from (its
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
    _import_onnx_converter()  # before any work: say which extra is missing
  prepared = jax.device_get(models.Inference(model).prepare(params))
  fn = serving_function(model, prepared, input)
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
      'input': {
        'name': 'images',
        'dtype': input,
        'shape': [None, size, size, 3],
        'layout': 'NHWC, RGB',
        'range': [0, 255] if input == 'uint8' else [-1.0, 1.0],
        'preprocessing': f'resize to {size}x{size} (bilinear)'
        + ('' if input == 'uint8' else ', then x / 127.5 - 1'),
      },
      'outputs': {'logits': [None, model.num_classes], 'probabilities': [None, model.num_classes]},
      'labels': 'labels.txt' if labels is not None else None,
      'source': str(source_path) if source_path else None,
      'source_sha256': sha256_file(source_path) if source_path and source_path.is_file() else None,
      'how_to_call': HOW_TO_CALL[format].replace('DIR', repr(str(path))),
      'exported_with': {'bit': _version('bit-jax'), 'jax': jax.__version__},
      **details,
    }
    files.write_json(tmp / 'export.json', manifest)
    if path.exists():  # a previous export (checked above): moved aside, then removed once the new one is in
      old = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.old'))
      os.replace(path, old / path.name)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def read_manifest(path: PathLike) -> ExportManifest:
  return json.loads((pathlib.Path(path) / 'export.json').read_text())


def load_source(*, workdir=None, model=None, num_classes=None, keep_head=False):
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
  size, path = 224, None
  try:
    cfg = checkpoints.get_pretrained_cfg(str(model))
    size = cfg.resolution or size
    path = checkpoints.cache_path(cfg.url)
  except BitError:
    path = pathlib.Path(model).expanduser()
  return net, params, names, int(size), path


class _CallableModule(type(sys.modules[__name__])):
  """`bit.export` is both this module and the function: importing a submodule binds the package attribute
  to the module (`import bit.export` after `bit.export` was resolved), so the module calls `export`."""

  def __call__(self, *args, **kwargs):
    return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
