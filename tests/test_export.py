"""bit-export: each format, reloaded in a process that does not import bit, gives the Flax model's logits."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

import bit
from bit import checkpoints, prediction
from bit.errors import BitError
from bit.exporter import ONNX_OPSET, sha256_file
from bit.testing import random_checkpoint
from bit.tools import cli

CLASSES = ('ant', 'bee', 'cow', 'doe', 'eel')
SIZE = 32
BATCHES = (1, 5)  # batch 1 and an odd batch: the exported batch dimension is symbolic

# The consumers: plain TF / onnxruntime / JAX. Each reads its images, runs batch 1 and batch 5, prints JSON.
LOAD_IMAGES = """
import json, sys, numpy as np
assert 'bit' not in sys.modules
path, kind = sys.argv[1], sys.argv[2]
if kind == 'uint8':  # decoded here, from the folder's PNG files, without bit
    from PIL import Image
    x = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in sys.argv[3:]])
else:
    x = np.load(sys.argv[3])
out = {}
"""
CONSUMERS = {
  'savedmodel': """
import tensorflow as tf
m = tf.saved_model.load(path)
for n in (1, 5):
    r = m.signatures['serving_default'](images=tf.constant(x[:n]))
    out[n] = {k: v.numpy().tolist() for k, v in r.items()}
""",
  'onnx': """
import onnxruntime as ort
s = ort.InferenceSession(path + '/model.onnx', providers=['CPUExecutionProvider'])
for n in (1, 5):
    logits, probs = s.run(['logits', 'probabilities'], {'images': x[:n]})
    out[n] = {'logits': logits.tolist(), 'probabilities': probs.tolist()}
""",
  'stablehlo': """
import jax
f = jax.export.deserialize(open(path + '/model.stablehlo', 'rb').read())
for n in (1, 5):
    out[n] = {k: np.asarray(v).tolist() for k, v in f.call(x[:n]).items()}
""",
}
END = """
assert 'bit' not in sys.modules
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """Real image files: 5 PNGs at 40x48 (resized by the eval preprocessing) and 5 at 32x32 (read as uint8)."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  big, small = [], []
  for i in range(5):
    big.append(root / f'big{i}.png')
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(big[-1])
    small.append(root / f'small{i}.png')
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(small[-1])
  floats = np.stack([prediction.load_image(f, SIZE) for f in big]).astype(np.float32)
  np.save(root / 'floats.npy', floats)
  return root, floats, small


def _pixels(paths):
  return np.stack([np.asarray(Image.open(f).convert('RGB')) for f in paths]).astype(np.float32)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, images):
  """A finished run: an R26x1 checkpoint (random GroupNorm too), labels.txt, config.json with crop 32.

  The head's bias is set so that the test images' mean logit is 0 in every class: a random network's pooled
  features of different images point much the same way, and would give them all one top-1 class.
  """
  w = tmp_path_factory.mktemp('work')
  weights = random_checkpoint(depth=26, width=1, classes=len(CLASSES), seed=3)
  np.savez(w / 'model.npz', **weights)
  _, floats, small = images
  x = np.concatenate([floats, _pixels(small) / 127.5 - 1.0]).astype(np.float32)
  weights['resnet/head/conv2d/bias'] -= _flax_logits(w, x).mean(0)
  np.savez(w / 'model.npz', **weights)
  (w / 'labels.txt').write_text(''.join(f'{c}\n' for c in CLASSES))
  (w / 'config.json').write_text(json.dumps({'dataset': 'unused', 'crop': SIZE, 'model': 'R26x1'}))
  return w


def _flax_logits(workdir, x):
  model, params = checkpoints.load(workdir / 'model.npz', keep_head=True)
  return np.asarray(jax.jit(model.apply)({'params': params}, x))


def _consume(fmt, path, kind, inputs):
  code = LOAD_IMAGES + CONSUMERS[fmt] + END
  proc = subprocess.run(
    [sys.executable, '-c', code, str(path), kind, *map(str, inputs)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {
    int(k): {n: np.asarray(v, np.float32) for n, v in r.items()} for k, r in json.loads(proc.stdout).items()
  }


def _check(out, reference):
  for n in BATCHES:
    logits, probs = out[n]['logits'], out[n]['probabilities']
    assert logits.shape == (n, len(CLASSES))
    np.testing.assert_allclose(logits, reference[:n], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(logits.argmax(-1), reference[:n].argmax(-1))
  assert len(set(reference.argmax(-1))) > 1  # the images are told apart: top-1 equality means something


def _manifest(path, fmt, dtype):
  m = json.loads((path / 'export.json').read_text())
  assert (m['format'], m['size'], m['input']['dtype'], m['num_classes']) == (fmt, SIZE, dtype, len(CLASSES))
  assert m['input']['layout'].startswith('NHWC') and 'antialias' in m['input']['warning']
  assert (path / 'labels.txt').read_text().split() == list(CLASSES)
  return m


def test_savedmodel_from_the_cli(workdir, images, tmp_path, capsys, monkeypatch):
  root, floats, _ = images
  out = tmp_path / 'sm'
  argv = ['bit-export', '--workdir', workdir, '--format', 'savedmodel', '--output', out]
  code, stdout, err = run_cli(cli.export_main, argv, capsys, monkeypatch)
  assert code == 0, err
  assert 'wrote' in stdout
  m = _manifest(out, 'savedmodel', 'float32')
  assert m['source_sha256'] == sha256_file(workdir / 'model.npz')
  assert m['signature'] == 'serving_default'
  _check(_consume('savedmodel', out, 'float32', [root / 'floats.npy']), _flax_logits(workdir, floats))
  # An existing output is refused, and the export in it left alone.
  code, _, err = run_cli(cli.export_main, argv, capsys, monkeypatch)
  assert code == 2 and '--overwrite' in err and len(err.strip().splitlines()) == 1
  assert (out / 'saved_model.pb').is_file()


def test_stablehlo_uint8_from_python(workdir, images, tmp_path):
  _, _, small = images
  model, params = checkpoints.load(workdir / 'model.npz', keep_head=True)
  out = bit.export(model, params, 'stablehlo', tmp_path / 'hlo', size=SIZE, input='uint8', labels=CLASSES)
  m = _manifest(out, 'stablehlo', 'uint8')
  assert m['input']['range'] == [0, 255] and 'cpu' in m['platforms']
  reference = _flax_logits(workdir, _pixels(small) / 127.5 - 1.0)
  _check(_consume('stablehlo', out, 'uint8', small), reference)


def _onnx_graph_is_plain(path):
  import onnx

  graph = onnx.load(str(path / 'model.onnx')).graph
  ops = {n.op_type for n in graph.node}
  assert {n.domain for n in graph.node} <= {''}  # standard ops only
  assert not ops & {'Shape', 'Gather', 'Concat'}  # no shape arithmetic around the norms
  assert 'InstanceNormalization' in ops and 'Conv' in ops
  assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch
  return graph


def test_onnx(workdir, images, tmp_path, capsys, monkeypatch):
  root, floats, _ = images
  out = tmp_path / 'onnx'
  argv = ['bit-export', '--workdir', workdir, '--format', 'onnx', '--output', out]
  code, _, err = run_cli(cli.export_main, argv, capsys, monkeypatch)
  assert code == 0, err
  m = _manifest(out, 'onnx', 'float32')
  assert m['opset'] == ONNX_OPSET and 'NCHW' in m['input']['layout']
  _onnx_graph_is_plain(out)
  _check(_consume('onnx', out, 'float32', [root / 'floats.npy']), _flax_logits(workdir, floats))


def test_onnx_uint8_from_python(workdir, images, tmp_path):
  _, _, small = images
  model, params = checkpoints.load(workdir / 'model.npz', keep_head=True)
  out = bit.export(model, params, 'onnx', tmp_path / 'onnx', size=SIZE, input='uint8', labels=CLASSES)
  assert _manifest(out, 'onnx', 'uint8')['input']['range'] == [0, 255]
  _onnx_graph_is_plain(out)
  _check(_consume('onnx', out, 'uint8', small), _flax_logits(workdir, _pixels(small) / 127.5 - 1.0))


# --- input='raw': uint8 photos at their own size, resized inside as bit.preprocess does ----------------------

RAW_SIZES = (
  (2, 40, 48),
  (1, 20, 75),
  (3, 150, 100),
  (1, SIZE, SIZE),
)  # (batch, height, width): down, up, same
# The consumers of raw exports: each .npy a batch of one size -> probabilities; then a float32 batch and a
# batch of the wrong rank, whose errors are printed.
RAW = """
import json, sys, numpy as np
assert 'bit' not in sys.modules
path, files = sys.argv[1], sys.argv[2:]
batches = [np.load(f) for f in files if f.endswith('.npy')]
encoded = [open(f, 'rb').read() for f in files if not f.endswith('.npy')]
bad = [batches[0].astype(np.float32), batches[0][:, :, :, 0]]
out = {'probabilities': [], 'errors': []}
"""
RAW_CONSUMERS = {
  'savedmodel': """
import tensorflow as tf
m = tf.saved_model.load(path)
f = m.signatures['serving_default']
out['probabilities'] = [f(images=tf.constant(x))['probabilities'].numpy().tolist() for x in batches]
out['bytes'] = m.signatures['serving_bytes'](images=tf.constant(encoded))['probabilities'].numpy().tolist()
call = lambda x: f(images=tf.constant(x))
""",
  'onnx': """
import onnxruntime as ort
s = ort.InferenceSession(path + '/model.onnx', providers=['CPUExecutionProvider'])
out['probabilities'] = [s.run(['probabilities'], {'images': x})[0].tolist() for x in batches]
call = lambda x: s.run(None, {'images': x})
""",
  'stablehlo': """
import jax
f = jax.export.deserialize(open(path + '/model.stablehlo', 'rb').read())
out['probabilities'] = [np.asarray(f.call(x)['probabilities']).tolist() for x in batches]
call = f.call
""",
}
RAW_END = """
for x in bad:
    try:
        call(x)
        out['errors'].append(None)
    except Exception as e:
        out['errors'].append(str(e))
assert 'bit' not in sys.modules
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  """uint8 batches of several sizes (.npy), and photo-like JPEGs that bit's decoder reads at 1/4, 1/2, 1/8 and
  full scale for a 32 px model (short sides 150, 67, 257, 40), and a PNG."""
  root = tmp_path_factory.mktemp('raw')
  rng = np.random.default_rng(1)
  batches = []
  for i, (n, h, w) in enumerate(RAW_SIZES):
    batches.append(root / f'batch{i}.npy')
    np.save(batches[-1], rng.integers(0, 256, (n, h, w, 3), np.uint8))
  encoded = []
  for i, (h, w) in enumerate([(150, 200), (100, 67), (300, 257), (40, 90)]):
    yy, xx = np.mgrid[:h, :w]
    noise = rng.integers(0, 256, (h, w))
    photo = np.stack([np.sin(xx / (3 + i)) * 127 + 128, np.cos(yy / 5) * 127 + 128, noise], -1).astype(
      np.uint8
    )
    encoded.append(root / f'photo{i}.jpg')
    Image.fromarray(photo).save(encoded[-1], quality=90)
  encoded.append(root / 'pixels.png')
  Image.fromarray(rng.integers(0, 256, (50, 60, 3), np.uint8)).save(encoded[-1])
  return batches, encoded


def _consume_raw(fmt, path, inputs):
  code = RAW + RAW_CONSUMERS[fmt] + RAW_END
  proc = subprocess.run(
    [sys.executable, '-c', code, str(path), *map(str, inputs)], capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# What each format's refusal of a batch without its channel axis says (the expected rank or shape).
RANK_ERRORS = {
  'savedmodel': 'images must be a uint8 tensor of shape [batch, height, width, 3]',
  'onnx': 'Expected: 4',
  'stablehlo': 'expected (batch, height, width, 3)',
}


def _check_raw(fmt, out, model, params, batches, manifest):
  assert len(out['probabilities']) == len(batches)
  for got, f in zip(out['probabilities'], batches, strict=True):
    x = np.load(f)
    want = prediction.predict(model, params, x, size=SIZE)  # bit's own preprocessing of the same uint8 array
    assert np.asarray(got).shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
  # A float32 batch, and a batch without its channel axis: each refused with the expected dtype/shape named.
  dtype_error, rank_error = out['errors']
  assert dtype_error and 'uint8' in dtype_error, dtype_error
  assert rank_error and RANK_ERRORS[fmt] in rank_error, rank_error
  assert manifest['input']['wrong_shape_or_dtype'].startswith('refused before the model runs')


@pytest.mark.parametrize('fmt', ['onnx', 'stablehlo'])
def test_raw_photos_of_any_size(fmt, workdir, raw, tmp_path):
  batches, _ = raw
  model, params = checkpoints.load(workdir / 'model.npz', keep_head=True)
  out = bit.export(model, params, fmt, tmp_path / fmt, size=SIZE, input='raw', labels=CLASSES)
  m = _manifest(out, fmt, 'uint8')
  assert (m['input']['convention'], m['input']['shape']) == ('raw', [None, None, None, 3])
  assert any('half_pixel' in r for r in m['input']['reproduced_by']) and 'PIL' in m['input']['warning']
  if fmt == 'onnx':
    graph = _onnx_graph_is_plain(out)
    resize = next(n for n in graph.node if n.op_type == 'Resize')
    attrs = {a.name: a for a in resize.attribute}
    assert attrs['coordinate_transformation_mode'].s == b'half_pixel' and attrs['antialias'].i == 0
  _check_raw(fmt, _consume_raw(fmt, out, batches), model, params, batches, m)


def test_raw_savedmodel_and_jpeg_bytes_from_the_cli(workdir, raw, tmp_path, capsys, monkeypatch):
  batches, encoded = raw
  out = tmp_path / 'sm'
  argv = ['bit-export', '--workdir', workdir, '--format', 'savedmodel', '--input', 'raw', '--output', out]
  code, stdout, err = run_cli(cli.export_main, argv, capsys, monkeypatch)
  assert code == 0, err
  m = _manifest(out, 'savedmodel', 'uint8')
  assert (
    m['signatures'] == ['serving_default', 'serving_bytes']
    and 'EXIF' in m['input']['serving_bytes']['decoding']
  )
  result = _consume_raw('savedmodel', out, [*batches, *encoded])
  model, params = checkpoints.load(workdir / 'model.npz', keep_head=True)
  _check_raw('savedmodel', result, model, params, batches, m)
  # Encoded files, each at its own size: what bit.predict gives for the file (its reduced-scale JPEG decode).
  want = prediction.predict(model, params, encoded, size=SIZE)
  np.testing.assert_allclose(result['bytes'], want, atol=1e-4)


def test_bad_input(workdir, tmp_path, capsys, monkeypatch):
  def fails(*args):
    code, _, err = run_cli(cli.export_main, ['bit-export', *args], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err

  out = ['--output', tmp_path / 'x']
  (tmp_path / 'empty').mkdir()
  assert 'model.npz is missing' in fails('--workdir', tmp_path / 'empty', '--format', 'stablehlo', *out)
  assert "'tflite'" in fails('--workdir', workdir, '--format', 'tflite', *out)
  assert 'at least 32' in fails('--workdir', workdir, '--format', 'stablehlo', '--size', '16', *out)
  assert "'raw8'" in fails('--workdir', workdir, '--format', 'stablehlo', '--input', 'raw8', *out)
  with pytest.raises(BitError, match="'raw8'"):
    bit.export(
      *checkpoints.load(workdir / 'model.npz', keep_head=True), 'stablehlo', tmp_path / 'y', input='raw8'
    )
  monkeypatch.setitem(sys.modules, 'onnx', None)  # as without the [export] extra
  assert '[export]' in fails('--workdir', workdir, '--format', 'onnx', *out)
  assert not (tmp_path / 'x').exists()


def test_overwrite_replaces_only_an_export(workdir, tmp_path, monkeypatch):
  from bit import exporter as module

  monkeypatch.setitem(
    module.WRITERS, 'stablehlo', lambda fn, p, size, i, out: (out / 'model.stablehlo').write_text(i) and {}
  )
  model, params = checkpoints.load(workdir / 'model.npz', keep_head=True)
  out = bit.export(model, params, 'stablehlo', tmp_path / 'hlo', size=SIZE)
  with pytest.raises(BitError, match=r'give another path=, or overwrite=True'):
    bit.export(model, params, 'stablehlo', out, size=SIZE, input='uint8')
  bit.export(model, params, 'stablehlo', out, size=SIZE, input='uint8', overwrite=True)
  assert (out / 'model.stablehlo').read_text() == 'uint8'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hlo']  # built aside, renamed: nothing left over
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep')
  with pytest.raises(BitError, match='not a bit export'):
    bit.export(model, params, 'stablehlo', tmp_path / 'mine', size=SIZE, overwrite=True)
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep'

  def broken(*args):
    raise RuntimeError('converter crashed')

  monkeypatch.setitem(module.WRITERS, 'stablehlo', broken)
  with pytest.raises(RuntimeError):
    bit.export(model, params, 'stablehlo', out, size=SIZE, overwrite=True)
  assert (out / 'model.stablehlo').read_text() == 'uint8'  # a failed export leaves the old one whole
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hlo', 'mine']


def test_model_flag_follows_bit_load(workdir):
  from bit.exporter import load_source

  # The run's model.npz keeps its head: the export is made at the run's crop (config.json beside it).
  model, _, names, size, source = load_source(model=str(workdir / 'model.npz'), keep_head=True)
  assert (model.num_classes, names, size, source) == (
    len(CLASSES),
    list(CLASSES),
    SIZE,
    workdir / 'model.npz',
  )
  model, params, names, size, _ = load_source(model=str(workdir / 'model.npz'), num_classes=3)
  assert model.num_classes == 3 and names is None and not np.any(params['head']['kernel'])
  assert size == 224  # a new head is a new task: BiT's usual size unless --size says otherwise
  with pytest.raises(BitError, match='num_classes'):
    load_source(model=str(workdir / 'model.npz'))
  with pytest.raises(BitError, match='not both'):
    load_source(workdir=workdir, model='R26x1')


def test_an_export_is_readable_by_others_under_umask_022(workdir, tmp_path):
  import os
  import stat

  model, params = checkpoints.load(workdir / 'model.npz', keep_head=True)
  old = os.umask(0o022)
  try:
    out = bit.export(model, params, 'stablehlo', tmp_path / 'hlo', size=SIZE, labels=CLASSES)
  finally:
    os.umask(old)
  modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob('*')]}
  assert modes[out] == 0o755 and modes[out / 'labels.txt'] == 0o644
  assert all(m & 0o004 for m in modes.values()), modes  # world-readable, every file and folder
