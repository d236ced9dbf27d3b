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
from bit.export import ONNX_OPSET, sha256_file
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


def test_onnx(workdir, images, tmp_path, capsys, monkeypatch):
  pytest.importorskip('jax2onnx', reason="the [export] extra (pip install -e '.[export]') is not installed")
  root, floats, _ = images
  out = tmp_path / 'onnx'
  argv = ['bit-export', '--workdir', workdir, '--format', 'onnx', '--output', out]
  code, _, err = run_cli(cli.export_main, argv, capsys, monkeypatch)
  assert code == 0, err
  m = _manifest(out, 'onnx', 'float32')
  assert m['opset'] == ONNX_OPSET
  import onnx

  graph = onnx.load(str(out / 'model.onnx')).graph
  assert {n.domain for n in graph.node} <= {''}  # standard ops only
  assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch
  _check(_consume('onnx', out, 'float32', [root / 'floats.npy']), _flax_logits(workdir, floats))


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
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # as without the [export] extra
  assert '[export]' in fails('--workdir', workdir, '--format', 'onnx', *out)
  assert not (tmp_path / 'x').exists()


def test_overwrite_replaces_only_an_export(workdir, tmp_path, monkeypatch):
  from bit import export as export_module  # noqa: F401 (binds bit.export to the module: it stays callable)

  module = sys.modules['bit.export']
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
  from bit.export import load_source

  model, _, names, size, source = load_source(model=str(workdir / 'model.npz'), keep_head=True)
  assert (model.num_classes, names, size, source) == (len(CLASSES), list(CLASSES), 224, workdir / 'model.npz')
  model, params, names, _, _ = load_source(model=str(workdir / 'model.npz'), num_classes=3)
  assert model.num_classes == 3 and names is None and not np.any(params['head']['kernel'])
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
