"""Every ```python block of README.md runs as written.

A block runs in a fresh namespace, in an empty working folder. The HTML comment right above it,
`<!-- readme-test: NAME, NAME -->`, names what it needs from FIXTURES below: a local checkpoint bucket on
127.0.0.1 (`$BIT_MODELS_URL`, `$BIT_CACHE`) serving a tiny random official-layout R26x1 under every registry
name, a finished demo run, photos, a mock CIFAR-10 with a tiny schedule, exports, or a fresh process. The
fixtures make the blocks fast (tiny models, 32 px); the code run is the README's, character for character.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import FileServer, checkpoint_bytes, fast_params
from PIL import Image

from bit import checkpoints, models

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
BLOCK = re.compile(
  r'(?:<!--\s*readme-test:\s*(?P<needs>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```', re.S
)
CLASSES = 10
DEMO_RUN = 'runs/demo/finetune/10shot-seed0'


def snippets():
  text = README.read_text()
  out = []
  for m in BLOCK.finditer(text):
    line = text.count('\n', 0, m.start('code')) + 1
    needs = [n.strip() for n in (m.group('needs') or '').split(',') if n.strip()]
    out.append(pytest.param(m.group('code'), needs, line, id=f'README.md:{line}'))
  return out


def test_the_readme_has_python_blocks():
  assert len(snippets()) >= 8  # the extraction finds them (a changed fence would silently test nothing)


# --- fixtures: each takes (stack, monkeypatch, namespace) and prepares the working folder -------------------


def _registry(stack, monkeypatch, ns):
  """Every registry name served from 127.0.0.1 as a tiny R26x1 with 10 classes (and its labels file)."""
  blob = checkpoint_bytes(depth=26, classes=CLASSES)
  labels = ''.join(f'class{i}\n' for i in range(CLASSES)).encode()
  files = {}
  for name, cfg in list(checkpoints.REGISTRY.items()):
    tiny = dataclasses.replace(cfg, architecture='R26x1', num_classes=CLASSES, sha256=None, size=None)
    monkeypatch.setitem(checkpoints.REGISTRY, name, tiny)
    files[cfg.file] = blob
    if cfg.labels_file:
      files[cfg.labels_file] = labels
  server = stack.enter_context(FileServer(files))
  monkeypatch.setenv('BIT_MODELS_URL', server.url)
  monkeypatch.setenv('BIT_CACHE', str(pathlib.Path('cache').resolve()))


def _small_models(stack, monkeypatch, ns):
  """Any architecture name builds an R26x1 (a scratch R50x1 compiles for as long as the rest together)."""
  parse = models.parse_architecture
  monkeypatch.setattr(models, 'parse_architecture', lambda name: parse(name) and (26, 1))


def _demo_run(stack, monkeypatch, ns):
  """What the offline demo leaves in its few-shot stage: model.npz, labels.txt, config.json (crop 32)."""
  run = pathlib.Path(DEMO_RUN)
  run.mkdir(parents=True)
  model = models.create_model('R26x1', CLASSES)
  checkpoints.save_npz(fast_params(model, head_std=0.05), run / 'model.npz')
  (run / 'labels.txt').write_text(''.join(f'class{i}\n' for i in range(CLASSES)))
  (run / 'config.json').write_text(json.dumps({'model': 'R26x1', 'dataset': 'demo', 'crop': 32}))


def _photos(stack, monkeypatch, ns):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (48, 40, 3), np.uint8)).save('cat.jpg')
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save('dog.png')
  pathlib.Path('photos').mkdir()
  for i in range(2):  # as many as the list predicted next: one compiled batch shape for both
    Image.fromarray(rng.integers(0, 255, (36, 44, 3), np.uint8)).save(f'photos/{i}.jpg')


def _images(stack, monkeypatch, ns):
  x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  ns.update(images=x, x=x)


def _tiny_training(stack, monkeypatch, ns):
  """A mock CIFAR-10 (tfds.testing.mock_data) and defaults shrunk to 32 px, batch 8, a 5-step schedule."""
  import tensorflow_datasets as tfds

  from bit import config

  small = {'batch_size': 8, 'resize': 36, 'crop': 32, 'schedule': (1, 2, 3, 4, 5), 'mixup_alpha': 0.0}
  for key, value in {**small, 'num_devices': 1, 'checkpoint_every': 0, 'log_every': 5}.items():
    monkeypatch.setitem(config.DEFAULTS, key, value)
  stack.enter_context(tfds.testing.mock_data(num_examples=8))


def _export(fmt, folder):
  def make(stack, monkeypatch, ns):
    from bit.export import export

    if fmt == 'onnx':
      pytest.importorskip('onnx', reason="the ONNX export needs pip install -e '.[export]'")
    model = models.create_model('R26x1', CLASSES)
    names = [f'class{i}' for i in range(CLASSES)]
    export(model, fast_params(model, head_std=0.05), fmt, f'exports/{folder}', size=32, labels=names)

  return make


FIXTURES = {
  'registry': _registry,
  'small_models': _small_models,
  'demo_run': _demo_run,
  'photos': _photos,
  'images': _images,
  'tiny_training': _tiny_training,
  'export_savedmodel': _export('savedmodel', 'flowers_tf'),
  'export_onnx': _export('onnx', 'flowers_onnx'),
  'export_stablehlo': _export('stablehlo', 'flowers_hlo'),
  'fresh_process': None,  # runs the block with `python -c` in a new process (process-wide settings)
}


@pytest.mark.parametrize('code, needs, line', snippets())
def test_readme_snippet_runs(code, needs, line, tmp_path, monkeypatch, capsys):
  unknown = [n for n in needs if n not in FIXTURES]
  assert not unknown, f'README.md:{line} names unknown fixtures {unknown}; known: {sorted(FIXTURES)}'
  monkeypatch.chdir(tmp_path)
  if 'fresh_process' in needs:
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f'README.md:{line} failed:\n{done.stderr[-3000:]}'
    return
  ns = {'__name__': '__readme__'}
  with contextlib.ExitStack() as stack:
    for name in needs:
      FIXTURES[name](stack, monkeypatch, ns)
    exec(compile(code, f'README.md:{line}', 'exec'), ns)  # noqa: S102 - the README's own code, as written
