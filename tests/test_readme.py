"""Every ```python block of README.md and docs/*.md runs as written; every relative link resolves; the
architecture and memory tables of docs/ match the real models' shapes.

A block runs in a fresh namespace, in an empty working folder. The HTML comment right above it,
`<!-- readme-test: NAME, NAME -->`, names what it needs from FIXTURES below: a local checkpoint bucket on
127.0.0.1 (`$BIT_MODELS_URL`, `$BIT_CACHE`) serving a tiny random official-layout R26x1 under every registry
name, a finished demo run, photos, a mock CIFAR-10 with a tiny schedule, exports, or a fresh process. The
fixtures make the blocks fast (tiny models, 32 px); the code run is the page's, character for character.
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
PAGES = [README, *sorted((ROOT / 'docs').glob('*.md'))]  # the pages whose python blocks run
LINKED = [*PAGES, ROOT / 'CHANGELOG.md']  # the pages whose relative links must resolve
BLOCK = re.compile(
  r'(?:<!--\s*readme-test:\s*(?P<needs>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```', re.S
)
CLASSES = 10
DEMO_RUN = 'runs/demo/finetune/10shot-seed0'


def snippets(pages=PAGES):
  out = []
  for page in pages:
    text = page.read_text()
    name = page.relative_to(ROOT).as_posix()
    for m in BLOCK.finditer(text):
      line = text.count('\n', 0, m.start('code')) + 1
      needs = [n.strip() for n in (m.group('needs') or '').split(',') if n.strip()]
      out.append(pytest.param(m.group('code'), needs, f'{name}:{line}', id=f'{name}:{line}'))
  return out


def test_the_pages_have_python_blocks():
  # The extraction finds them (a changed fence would silently test nothing): the README's library and
  # training blocks, and the docs' (configure_cpu, the three exports).
  assert len(snippets([README])) >= 4
  assert len(snippets()) >= 8


# --- links: every relative link of the README, the CHANGELOG and docs/ points at a file and a heading ------

LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^```.*?^```', re.S | re.M)


def anchors(path: pathlib.Path) -> set:
  """GitHub's heading ids: lowercase, punctuation dropped, spaces to hyphens, repeats numbered -1, -2, ..."""
  seen, out = {}, set()
  for line in FENCE.sub('', path.read_text()).splitlines():
    m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
    if not m:
      continue
    slug = re.sub(r'[^\w\- ]', '', m.group(1).lower()).replace(' ', '-')
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f'{slug}-{n}')
  return out


def broken_links(page: pathlib.Path) -> list:
  bad = []
  for target in LINK.findall(FENCE.sub('', page.read_text())):
    if re.match(r'[a-z]+:', target):  # https:, mailto: - not checked here (no network)
      continue
    file, _, anchor = target.partition('#')
    path = (page.parent / file).resolve() if file else page
    if not path.exists():
      bad.append(f'{target}: no file {path}')
    elif anchor and (path.suffix != '.md' or anchor not in anchors(path)):
      bad.append(f'{target}: no heading #{anchor} in {path.name}')
  return bad


@pytest.mark.parametrize('page', LINKED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
  assert page.exists()
  assert not broken_links(page), broken_links(page)


def test_the_link_check_finds_broken_links(tmp_path):
  (tmp_path / 'a.md').write_text('# Top\n\n## Some `code()`: here\n\n## Top\n')
  page = tmp_path / 'p.md'
  page.write_text(
    '[ok](a.md#some-code-here) [ok](a.md#top-1) [ok](#x) [web](https://example.com/none)\n\n# X\n'
    '[gone](b.md) [no anchor](a.md#nowhere)\n```\n[in code](c.md)\n```\n'
  )
  assert broken_links(page) == [
    f'b.md: no file {tmp_path / "b.md"}',
    'a.md#nowhere: no heading #nowhere in a.md',
  ]


# --- sizes: the snippets run tiny models, so the pages' architecture and memory tables are checked here ----


def table(page: pathlib.Path, header: str) -> list:
  """The rows of the markdown table whose header line starts with `header`, as dicts of stripped cells."""
  lines = page.read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  names = [c.strip() for c in lines[start].strip('|').split('|')]
  rows = []
  for line in lines[start + 2 :]:
    if not line.startswith('|'):
      break
    rows.append(dict(zip(names, (c.strip() for c in line.strip('|').split('|')), strict=True)))
  return rows


def test_the_architecture_table_is_the_models():
  # Shapes only (jax.eval_shape of init): nothing is compiled or allocated, so real architectures are cheap.
  rows = table(ROOT / 'docs' / 'library.md', '| architecture | depth | width |')
  assert [r['architecture'] for r in rows] == ['R50x1', 'R50x3', 'R101x1', 'R101x3', 'R152x2', 'R152x4']
  counts = {}
  for row in rows:
    model = models.create_model(row['architecture'], 1000)
    assert (model.depth, model.width) == (int(row['depth']), int(row['width']))
    shapes = models.param_shapes(model)
    n = models.count_params(shapes)
    backbone = n - models.count_params(shapes['head'])
    total, _, rest = row['params (1,000-class head)'].partition(' ')
    assert total == f'{n / 1e6:.2f}M', row
    if rest:
      assert rest == f'(backbone {backbone / 1e6:.1f}M)', row
    features = shapes['head']['kernel'].shape[0]  # what pre_logits=True gives: the head's input
    assert features == int(row['feature size']) == 2048 * model.width, row
    counts[row['architecture']] = n
  for row in table(ROOT / 'docs' / 'long-runs.md', '| model | crop |'):  # params + SGD momentum, float32, GiB
    assert row['params + optimizer state'] == f'{counts[row["model"]] * 8 / 2**30:.2f}', row


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


@pytest.mark.parametrize('code, needs, where', snippets())
def test_snippet_runs(code, needs, where, tmp_path, monkeypatch, capsys):
  unknown = [n for n in needs if n not in FIXTURES]
  assert not unknown, f'{where} names unknown fixtures {unknown}; known: {sorted(FIXTURES)}'
  monkeypatch.chdir(tmp_path)
  if 'fresh_process' in needs:
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f'{where} failed:\n{done.stderr[-3000:]}'
    return
  ns = {'__name__': '__readme__'}
  with contextlib.ExitStack() as stack:
    for name in needs:
      FIXTURES[name](stack, monkeypatch, ns)
    exec(compile(code, where, 'exec'), ns)  # noqa: S102 - the page's own code, as written
