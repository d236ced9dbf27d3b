"""bit-bench: a grid of fine-tunes (model x dataset x examples per class x seed) against the official figures.

  bit-bench --config configs/bench_demo.py --workdir /tmp/bench      # offline, on the demo's digits
  bit-bench --config configs/bench_paper.py --workdir /tmp/bench     # the paper's settings (GPUs/TPUs, network)

A bench config holds `base` (a training config: the keys of bit/config.py), `grids` (named grids, each
with `models`, `datasets`, `examples_per_class` (0 = the full train split), `seeds` and `overrides` of base
keys) and, for the demo's names, a `demo` section as in configs/demo.py. Every cell runs
`bit.train.train_and_evaluate` in its own workdir `WORKDIR/cells/<cell>`:

- a finished cell (its `result.json`) is skipped on a rerun; an interrupted one resumes from its orbax
  checkpoint; cells that were not measured are tried again.
- a cell that cannot run (its checkpoint or dataset cannot be downloaded, no such dataset) is marked
  `unavailable` with the reason; a cell that fails otherwise is marked `failed` (traceback in its
  `error.txt`). Neither is ever given a number, and neither stops the grid.

`WORKDIR/results.csv` (one row per cell) and `WORKDIR/results.md` (min <- median -> max over seeds next to
the official figure for the same setting, where one exists) are rewritten atomically after every cell.

Demo names: model `demo:pretrained` is the demo's R26x1 pretrained on digits 0-4 (trained once, in
`WORKDIR/pretrain`), dataset `demo:digits5-9` / `demo:digits0-4` the demo's image folders.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import os
import pathlib
import re
import statistics
import time
import traceback
from typing import Any

from bit import files, layout
from bit.errors import ConfigError, DataError, DownloadError
from bit.tools import demo

CELLS_DIR = 'cells'
STATUS_FILE = 'status.json'  # the last outcome of a cell that has not been measured
DEMO_MODEL = 'demo:pretrained'
DEMO_DATASETS = {'demo:digits0-4': 'pretrain', 'demo:digits5-9': 'transfer'}

# Official top-1 (%) for (model, dataset, examples per class; 0 = full): value and where it comes from.
# The CIFAR rows are the Jax column of google-research/big_transfer's README ("Expected results", BiT-M-R50x1,
# median of at least five runs, batch 128 / lr 0.001, which the README reports as nearly identical to the
# hyper-rule's 512 / 0.003); Pets and Flowers are the paper's BiT-M-R152x4 figures (Kolesnikov et al. 2020,
# Table 1, BiT-HyperRule).
_README = 'official README (Jax, median)'
_PAPER = 'BiT paper, Table 1 (BiT-M)'
OFFICIAL = {
  ('BiT-M-R50x1', 'cifar10', 1): (54.1, _README),
  ('BiT-M-R50x1', 'cifar10', 5): (82.4, _README),
  ('BiT-M-R50x1', 'cifar10', 0): (97.3, _README),
  ('BiT-M-R50x1', 'cifar100', 1): (35.2, _README),
  ('BiT-M-R50x1', 'cifar100', 5): (64.8, _README),
  ('BiT-M-R50x1', 'cifar100', 0): (86.4, _README),
  ('BiT-M-R152x4', 'oxford_iiit_pet', 0): (94.47, _PAPER),
  ('BiT-M-R152x4', 'oxford_flowers102', 0): (99.30, _PAPER),
}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One fine-tune of the grid."""

  grid: str
  model: str
  dataset: str
  examples_per_class: int  # 0 = the full train split
  seed: int

  @property
  def name(self) -> str:
    shots = f'{self.examples_per_class}shot' if self.examples_per_class else 'full'
    raw = f'{self.grid}-{_short(self.model)}-{_short(self.dataset)}-{shots}-seed{self.seed}'
    return re.sub(r'[^A-Za-z0-9_.+-]+', '_', raw)


def _short(spec: str) -> str:
  # A local path is named by its last parts (a folder dataset by its own name, an .npz by its file name).
  spec = str(spec)
  if '/' in spec or os.sep in spec:
    p = pathlib.PurePath(spec)
    return p.stem if p.suffix else p.name
  return spec.replace(':', '-')


def official(model: str, dataset: str, examples_per_class: int) -> Any:
  """(top-1 %, source) of the official figure for this setting, or None. TFDS versions are ignored."""
  return OFFICIAL.get((str(model), str(dataset).split(':')[0], int(examples_per_class or 0)))


def cells(config: Any) -> list[Cell]:
  """The cells of a bench config, grid by grid, in a stable order."""
  if 'grids' not in config or not config.grids:
    raise ConfigError(
      'the bench config has no `grids`: give at least one grid with models, datasets, '
      'examples_per_class and seeds (see configs/bench_demo.py).'
    )
  out = []
  for gname, g in config.grids.items():
    for key in ('models', 'datasets', 'examples_per_class', 'seeds'):
      if key not in g or g[key] is None or len(g[key]) == 0:
        raise ConfigError(f'bench grid {gname!r} needs a non-empty `{key}` (config.grids.{gname}.{key}).')
    for m, d, k, s in itertools.product(g.models, g.datasets, g.examples_per_class, g.seeds):
      if int(k) < 0:
        raise ConfigError(
          f'config.grids.{gname}.examples_per_class has {k}: use k > 0, or 0 for the full split.'
        )
      out.append(Cell(gname, str(m), str(d), int(k), int(s)))
  names = [c.name for c in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ConfigError(f'the bench grids name the same cell twice ({dup[0]}): remove the duplicate.')
  return out


def _demo_config(config):
  """The bench's base keys plus its `demo` section: what bit.tools.demo needs to export and pretrain."""
  if 'demo' not in config:
    raise ConfigError(
      'a bench grid uses the demo names (demo:...), so the bench config needs a `demo` '
      'section as in configs/demo.py.'
    )
  c = demo._stage_config(config.base)
  with c.unlocked():
    c.demo = config.demo
  return c


class _Resolver:
  """Maps the demo names to real paths, doing the demo's export / pretraining once, on first use."""

  def __init__(self, config: Any, workdir: pathlib.Path) -> None:
    self.config, self.workdir = config, workdir
    self._data = None
    self._pretrained = None

  def dataset(self, spec: str) -> str:
    if spec not in DEMO_DATASETS:
      return spec
    if self._data is None:
      self._data = demo.export_for(_demo_config(self.config), self.workdir)
    return str(self._data[DEMO_DATASETS[spec]])

  def model(self, spec: str) -> str:
    if spec != DEMO_MODEL:
      return spec
    if self._pretrained is None:
      dc = _demo_config(self.config)
      path = self.workdir / 'pretrain'
      demo.run_stage(
        demo.pretrain_config(dc, self.dataset('demo:digits0-4')), path, name='pretrain (demo:pretrained)'
      )
      self._pretrained = str(path / layout.MODEL_FILE)
    return self._pretrained


def cell_config(config: Any, cell: Cell, resolver: _Resolver) -> Any:
  """The training config of one cell: base, then the grid's overrides, then the cell's own keys."""
  overrides = dict(config.grids[cell.grid].get('overrides') or {})
  c = demo._stage_config(config.base, **overrides)
  c.model = resolver.model(cell.model)
  c.dataset = resolver.dataset(cell.dataset)
  if cell.examples_per_class:
    c.examples_per_class = cell.examples_per_class
  c.seed = cell.seed
  return c


def _unavailable_reason(e: BaseException) -> str | None:
  """Why a cell cannot run here (network, missing dataset), or None for a real failure."""
  text = (str(e).splitlines() or [''])[0]  # TFDS appends the list of every dataset it knows
  if isinstance(e, DownloadError):
    return f'checkpoint cannot be downloaded: {text}'
  if isinstance(e, DataError):
    if 'download' in text or 'neither an image folder nor a TFDS dataset' in text or 'does not exist' in text:
      return f'dataset cannot be read: {text}'
  if isinstance(e, (ConnectionError, TimeoutError)):
    return f'no network: {text}'
  return None


def shorten(text: str, limit: int) -> str:
  """`text` cut in the middle to at most `limit` characters: its start says what failed and its end (e.g. a
  download error's 'fetch it on a machine that has it ... put it at PATH') what to do."""
  if len(text) <= limit:
    return text
  head = (limit - 5) // 2
  return f'{text[:head]} ... {text[len(text) - (limit - 5 - head) :]}'


def run_cell(config: Any, cell: Cell, workdir: pathlib.Path, resolver: _Resolver) -> dict[str, Any]:
  """Runs (or skips, or marks) one cell; returns its row for results.csv."""
  cdir = workdir / CELLS_DIR / cell.name
  row = {**_pending_row(cell, workdir), 'status': '', 'reason': ''}
  try:
    c = cell_config(config, cell, resolver)
    result = demo.run_stage(c, cdir, name=cell.name)
  except KeyboardInterrupt:
    raise
  except Exception as e:  # noqa: BLE001 - one cell's failure is recorded and the grid goes on
    reason = _unavailable_reason(e)
    row['status'] = 'unavailable' if reason else 'failed'
    first = (str(e).splitlines() or [''])[0]
    row['reason'] = shorten(' '.join((reason or f'{type(e).__name__}: {first}').split()), 500)
    cdir.mkdir(parents=True, exist_ok=True)
    (cdir / 'error.txt').write_text(traceback.format_exc())
    demo._atomic_json(cdir / STATUS_FILE, {'status': row['status'], 'reason': row['reason']})
    print(f'[{cell.name}] {row["status"]}: {shorten(row["reason"], 200)}', flush=True)
    return row
  (cdir / STATUS_FILE).unlink(missing_ok=True)
  row.update(
    status='measured',
    top1=round(100 * result['metrics']['top1'], 2),
    top5=round(100 * result['metrics']['top5'], 2),
    seconds=result.get('seconds', ''),
  )
  return row


def run_bench(config: Any, workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Runs every cell of the bench config (skipping finished ones); writes results.csv and results.md.

  Returns the rows of results.csv. Bad configs raise ConfigError before any cell runs.
  """
  if 'base' not in config:
    raise ConfigError('the bench config has no `base` training config (see configs/bench_demo.py).')
  workdir = pathlib.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  todo = cells(config)
  for gname, g in config.grids.items():  # a typo in an override fails before hours of other cells
    unknown = sorted(set(g.get('overrides') or {}) - set(config.base))
    if unknown:
      raise ConfigError(
        f'config.grids.{gname}.overrides has unknown keys {unknown}; the keys of config.base '
        '(bit/config.py) can be overridden.'
      )
  demo.enable_compilation_cache()
  resolver = _Resolver(config, workdir)
  rows = []
  start = time.perf_counter()
  for i, cell in enumerate(todo, 1):
    print(f'--- cell {i}/{len(todo)}: {cell.name}', flush=True)
    rows.append(run_cell(config, cell, workdir, resolver))
    write_results(rows + [_pending_row(c, workdir) for c in todo[i:]], workdir)
  counts = {s: sum(r['status'] == s for r in rows) for s in ('measured', 'unavailable', 'failed')}
  print(
    f'bit-bench: {counts["measured"]} measured, {counts["unavailable"]} unavailable, {counts["failed"]} failed '
    f'in {time.perf_counter() - start:.0f} s; see {workdir / "results.md"}',
    flush=True,
  )
  return rows


def _pending_row(cell: Cell, workdir: pathlib.Path) -> dict:
  ref = official(cell.model, cell.dataset, cell.examples_per_class)
  return {
    **dataclasses.asdict(cell),
    'status': 'pending',
    'top1': '',
    'top5': '',
    'official_top1': ref[0] if ref else '',
    'official_source': ref[1] if ref else '',
    'seconds': '',
    'reason': 'not run yet',
    'workdir': str(workdir / CELLS_DIR / cell.name),
  }


CSV_FIELDS = [
  'grid',
  'model',
  'dataset',
  'examples_per_class',
  'seed',
  'status',
  'top1',
  'top5',
  'official_top1',
  'official_source',
  'seconds',
  'reason',
  'workdir',
]


def write_results(rows: list[dict[str, Any]], workdir: str | os.PathLike[str]) -> None:
  """Writes results.csv (one row per cell) and results.md (one row per setting), atomically."""
  workdir = pathlib.Path(workdir)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator='\n')
  writer.writeheader()
  for r in rows:
    writer.writerow({k: r.get(k, '') for k in CSV_FIELDS})
  files.write_text(workdir / 'results.csv', buf.getvalue())
  files.write_text(workdir / 'results.md', format_markdown(rows))


def _spread(values: list[float]) -> str:
  if not values:
    return '-'
  if len(values) == 1:
    return f'**{values[0]:.1f}**'
  return f'{min(values):.1f} ← **{statistics.median(values):.1f}** → {max(values):.1f}'


def format_markdown(rows: list[dict[str, Any]]) -> str:
  """results.md: per setting, measured top-1 (min <- median -> max over seeds) next to the official figure."""
  groups: dict = {}
  for r in rows:
    groups.setdefault((r['grid'], r['model'], r['dataset'], r['examples_per_class']), []).append(r)
  lines = [
    '# bit-bench results',
    '',
    'Top-1 accuracy (%) on the test split, min ← **median** → max over the measured seeds. "Official" is the '
    'published figure for the same model, dataset and examples per class (source in the last column); '
    'cells that could not run are listed below and never given a number.',
    '',
    '| model | dataset | ex/cls | measured top-1 | seeds | official top-1 | source |',
    '| :--- | :--- | :---: | :---: | :---: | :---: | :--- |',
  ]
  notes = []
  for (_grid, model, dataset, k), rs in groups.items():
    measured = [float(r['top1']) for r in rs if r['status'] == 'measured']
    not_run = [r for r in rs if r['status'] != 'measured']
    ref = official(model, dataset, k)
    seeds = f'{len(measured)}/{len(rs)}'
    cell = (
      _spread(measured) if measured else f'not measured ({", ".join(sorted({r["status"] for r in not_run}))})'
    )
    lines.append(
      f'| {model} | {_short(dataset) if "/" in dataset else dataset} | {k or "full"} | {cell} | {seeds} | '
      f'{f"{ref[0]:.2f}".rstrip("0").rstrip(".") if ref else "-"} | {ref[1] if ref else "-"} |'
    )
    for r in not_run:
      notes.append(
        f'- `{r["grid"]}` {r["model"]} / {r["dataset"]} / {k or "full"} / seed {r["seed"]}: '
        f'**{r["status"]}**: {r["reason"]}'
      )
  if notes:
    lines += ['', '## Cells not measured', ''] + notes
  return '\n'.join(lines) + '\n'


def load_config(path_or_config: Any) -> Any:
  """A bench config from a ConfigDict or a configs/*.py path (`get_config()`)."""
  if not isinstance(path_or_config, (str, os.PathLike)):
    return path_or_config
  from bit import config

  path = pathlib.Path(path_or_config)
  if not path.is_file():
    raise ConfigError(f'bench config {str(path)!r} does not exist; give e.g. configs/bench_demo.py.')
  module = config.load_module(path)
  return module.get_config()


__all__ = [
  'OFFICIAL',
  'Cell',
  'cells',
  'official',
  'run_bench',
  'run_cell',
  'write_results',
  'format_markdown',
  'load_config',
]
