"""bit-bench over configs/bench_demo.py at a tiny size: every cell ends up measured or marked, and a rerun
skips the finished cells.

The bench's own offline cells (the demo's pretrained R26x1 and the scratch R26x1 on the demo's digits 5-9)
run for 5 steps; BiT-M-R50x1 has to be downloaded from $BIT_MODELS_URL, here a dead port on 127.0.0.1, so
its cell is marked `unavailable`; a grid with a dataset that does not exist is marked too.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import free_port

from bit import config
from bit.errors import ConfigError
from bit.tools import accuracy_grid

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A tiny version of configs/bench_demo.py (4 devices in the test session: batches of 8).
TINY_CONFIG = f"""
from bit import config

bench_demo = config.load_module({str(ROOT / 'configs' / 'bench_demo.py')!r})

def get_config(arg=None):
  c = bench_demo.get_config()
  c.base.batch_size = 8
  c.base.schedule = (1, 2, 3, 4, 5)
  c.base.checkpoint_every = 0
  c.demo.pretrain_steps = 5
  c.demo.pretrain_batch_size = 8
  c.grids.digits.examples_per_class = (2,)
  c.grids.digits.seeds = (0,)
  with c.unlocked():
    c.grids.missing = dict(models=('R26x1',), datasets=('no_such_dataset_xyz',), examples_per_class=(2,),
                           seeds=(0,), overrides={{}})
  return c
"""


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture()
def offline(tmp_path, monkeypatch):
  env = {'BIT_MODELS_URL': f'http://127.0.0.1:{free_port()}/', 'BIT_CACHE': str(tmp_path / 'cache')}
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  # JAX's compilation cache setting is global to the process: keep the test session's untouched (the
  # command-line run below turns it on in its own process).
  monkeypatch.setattr(accuracy_grid.demo, 'enable_compilation_cache', lambda: None)
  return env


README_DATASETS = {
  'CIFAR-10': 'cifar10',
  'CIFAR-100': 'cifar100',
  'Oxford-IIIT Pets': 'oxford_iiit_pet',
  'Oxford Flowers-102': 'oxford_flowers102',
}


def readme_official_table() -> dict:
  """The README's table of official figures as {(model, dataset, examples per class): top-1}."""
  lines = (ROOT / 'README.md').read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('| model | dataset | examples per class'))
  header = [h.strip() for h in lines[start].strip('|').split('|')]
  out = {}
  for line in lines[start + 2 :]:
    if not line.startswith('|'):
      break
    row = dict(zip(header, (c.strip() for c in line.strip('|').split('|')), strict=True))
    shots = [0 if s.strip() == 'full' else int(s) for s in row['examples per class'].split('/')]
    figures = [float(f) for f in row['official top-1'].split('/')]
    for k, v in zip(shots, figures, strict=True):
      out[(row['model'], README_DATASETS[row['dataset']], k)] = v
  return out


def test_official_figures():
  # Two records of the same published figures, the one the grid reports and the one the README shows
  # users: they must agree in both directions, figure for figure.
  table = readme_official_table()
  assert table == {key: value for key, (value, _) in accuracy_grid.OFFICIAL.items()}
  for (model, dataset, k), value in table.items():
    assert accuracy_grid.official(model, f'{dataset}:3.0.2', k)[0] == value  # TFDS versions are ignored
  assert accuracy_grid.official('BiT-M-R50x1', 'oxford_iiit_pet', 0) is None  # no figure: never made up


def test_paper_config_is_the_official_setting():
  c = accuracy_grid.load_config(ROOT / 'configs' / 'bench_paper.py')
  cells = accuracy_grid.cells(c)
  assert {(x.model, x.dataset, x.examples_per_class) for x in cells} >= {
    ('BiT-M-R50x1', 'cifar10', 1),
    ('BiT-M-R50x1', 'cifar100', 0),
    ('BiT-M-R152x4', 'oxford_flowers102', 0),
  }
  assert all(accuracy_grid.official(x.model, x.dataset, x.examples_per_class) for x in cells)
  assert c.grids.paper.overrides.crop == 480 and c.grids.paper.overrides.batch_size == 512
  assert c.grids.cifar.overrides.batch_size == 128 and c.grids.cifar.overrides.base_lr == 0.001


def test_bad_grid_is_refused(tmp_path):
  bench_demo = config.load_module(ROOT / 'configs' / 'bench_demo.py')
  c = bench_demo.get_config()
  c.grids.digits.seeds = ()
  with pytest.raises(ConfigError, match='seeds'):
    accuracy_grid.cells(c)
  c = bench_demo.get_config()
  with c.unlocked():
    c.grids.digits.overrides.bach_size = 8
  with pytest.raises(ConfigError, match='bach_size'):
    accuracy_grid.run_bench(c, tmp_path / 'bench')
  assert not (tmp_path / 'bench' / 'cells').exists()  # refused before any cell ran


def test_bench_demo_tiny(tmp_path, offline):
  config_file = tmp_path / 'bench_tiny.py'
  config_file.write_text(TINY_CONFIG)
  workdir = tmp_path / 'bench'
  rows = accuracy_grid.run_bench(accuracy_grid.load_config(config_file), workdir)

  by = {(r['grid'], r['model']): r for r in rows}
  assert len(rows) == 4
  for model in ('demo:pretrained', 'R26x1'):
    r = by[('digits', model)]
    assert r['status'] == 'measured', r
    assert 0 <= r['top1'] <= 100
    result = json.loads((pathlib.Path(r['workdir']) / 'result.json').read_text())
    assert r['top1'] == round(100 * result['metrics']['top1'], 2)
  ft = json.loads((pathlib.Path(by[('digits', 'demo:pretrained')]['workdir']) / 'config.json').read_text())
  assert ft['model'] == str(workdir / 'pretrain' / 'model.npz')  # the demo's pretraining ran, once
  assert (workdir / 'pretrain' / 'model.npz').is_file()
  unreachable = by[('digits', 'BiT-M-R50x1')]
  assert unreachable['status'] == 'unavailable' and unreachable['top1'] == ''
  assert '127.0.0.1' in unreachable['reason'] and 'download' in unreachable['reason']
  assert 'BIT_CACHE' in unreachable['reason']  # what to do survives the shortening
  missing = by[('missing', 'R26x1')]
  assert missing['status'] == 'unavailable' and 'no_such_dataset_xyz' in missing['reason']

  table = read_csv(workdir / 'results.csv')
  assert [(r['model'], r['status']) for r in table] == [(r['model'], r['status']) for r in rows]
  md = (workdir / 'results.md').read_text()
  assert f'**{by[("digits", "R26x1")]["top1"]:.1f}**' in md
  assert 'not measured (unavailable)' in md and 'Cells not measured' in md

  # The second run, through the command line: finished cells are skipped, the unavailable ones tried again.
  mtimes = {p: p.stat().st_mtime_ns for p in workdir.glob('**/model.npz')}
  assert len(mtimes) == 3  # pretrain + two measured cells
  cmd = [
    sys.executable,
    '-c',
    'from bit.tools.cli import bench_main; bench_main()',
    '--config',
    str(config_file),
    '--workdir',
    str(workdir),
  ]
  env = {**os.environ, **offline, 'PYTHONPATH': str(ROOT)}
  second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count('finished before') == 3, second.stdout  # pretrain and the two measured cells
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  assert [(r['model'], r['status'], r['top1']) for r in read_csv(workdir / 'results.csv')] == [
    (r['model'], r['status'], str(r['top1'])) for r in table
  ]


def test_long_reasons_are_cut_in_the_middle():
  text = 'Cannot download URL: ' + 'x' * 1000 + ' put it at /cache/file.npz (set $BIT_CACHE)'
  short = accuracy_grid.shorten(text, 200)
  assert len(short) <= 200 and short.startswith('Cannot download') and short.endswith('(set $BIT_CACHE)')
  assert accuracy_grid.shorten('short', 200) == 'short'
