"""The offline distillation demo (configs/demo_distill.py): teacher, distilled student and labels-only student
on scikit-learn's digits, per seed; `bit-distill --config configs/demo_distill.py --workdir W`.

Stages (each its own resumable workdir; a finished one, with its `result.json`, is skipped on a rerun):
1. The offline demo's stages (`bit.tools.demo`): pretraining, then per seed the 10-shot fine-tune (the teacher) and
   the scratch run on the same shots (the labels-only student), in `distill_demo.demo_workdir` or W/demo.
2. W/distill/<k>shot-seed<s>/: `bit.distill.distill` of that seed's fine-tune into the student, from random
   init, on the same shots plus the rest of the digits 5-9 training scans as unlabeled images.
3. W/distill.json ({"seeds", "teacher_top1", "distilled_top1", "labels_only_top1"}, one entry per seed) and
   W/distill.md.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time
from typing import Any

from bit import files
from bit.errors import ConfigError
from bit.tools import demo

SUMMARY_JSON = 'distill.json'
SUMMARY_MD = 'distill.md'


def demo_workdir(config: Any, workdir: str | os.PathLike[str]) -> pathlib.Path:
  d = config.distill_demo.demo_workdir
  return pathlib.Path(d).expanduser() if d else pathlib.Path(workdir).expanduser() / 'demo'


def distill_config(config: Any, teacher: Any, transfer: str, seed: int) -> Any:
  """The bit.distill config of one seed: `config.distill_demo.recipe` with `teacher` (a fine-tune workdir),
  the digits 5-9 folder `transfer` (its train split also as unlabeled images), the shots and the seed."""
  import ml_collections

  c = ml_collections.ConfigDict(config.distill_demo.recipe.to_dict())
  c.teacher = str(teacher)
  c.dataset = str(transfer)
  c.examples_per_class = int(config.examples_per_class)
  c.unlabeled = str(pathlib.Path(transfer) / 'train')  # every training scan, read without its label
  c.seed = int(seed)
  return c


def run_distill_stage(config: Any, workdir: str | os.PathLike[str], *, name: str = '') -> dict[str, Any]:
  """`bit.distill.distill(config, workdir)` unless it finished before (`result.json`); returns its result."""
  from bit import distill

  workdir = pathlib.Path(workdir).expanduser()
  done = demo.finished_result(workdir, config)
  if done is not None:
    print(
      f'[{name}] finished before (top-1 {done["metrics"]["top1"]:.1%}): skipped, see {workdir}', flush=True
    )
    return {**done, 'skipped': True}
  print(f'[{name}] {config.teacher} -> {config.student} -> {workdir}', flush=True)
  start = time.perf_counter()
  metrics = distill.distill(config, workdir)
  result = {
    'metrics': metrics,
    'config': demo.fingerprint(config),
    'seconds': round(time.perf_counter() - start, 1),
  }
  files.write_json(workdir / demo.RESULT_FILE, result, sort_keys=True)
  return {**result, 'skipped': False}


def run_distill_demo(config: Any, workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Runs the demo's stages (skipping finished ones), then the distillation per seed; writes distill.json and
  distill.md; returns the summary (distill.json's keys)."""
  if 'demo' not in config or 'distill_demo' not in config:
    raise ConfigError(
      'run_distill_demo needs configs/demo_distill.py (a `demo` and a `distill_demo` section).'
    )
  if config.examples_per_class is None:
    raise ConfigError('the demo is few-shot: set --config.examples_per_class (e.g. 10).')
  workdir = pathlib.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  demo.enable_compilation_cache()
  base = demo_workdir(config, workdir)
  stages = demo.stage_configs(config, base)
  transfer = demo.export_for(config, base)['transfer']
  seeds = demo.seeds(config)
  total = len(stages) + len(seeds)
  results = {}
  for i, (name, c) in enumerate(stages.items(), 1):
    results[name] = demo.run_stage(c, base / name, name=f'{i}/{total} demo {name}')
  rows = []
  for i, seed in enumerate(seeds, len(stages) + 1):
    run = demo._run_name(config, seed)
    c = distill_config(config, base / 'finetune' / run, transfer, seed)
    r = run_distill_stage(c, workdir / 'distill' / run, name=f'{i}/{total} distill {run}')
    rows.append(
      {
        'seed': seed,
        'teacher': results[f'finetune/{run}']['metrics']['top1'],
        'distilled': r['metrics']['top1'],
        'labels_only': results[f'scratch/{run}']['metrics']['top1'],
        'seconds': r.get('seconds'),
      }
    )
  summary = {
    'seeds': [r['seed'] for r in rows],
    'teacher_top1': [r['teacher'] for r in rows],
    'distilled_top1': [r['distilled'] for r in rows],
    'labels_only_top1': [r['labels_only'] for r in rows],
  }
  files.write_json(workdir / SUMMARY_JSON, summary)
  text = format_summary(summary, config, base, time.perf_counter() - start, rows)
  files.write_text(workdir / SUMMARY_MD, text)
  print('\n' + text, flush=True)
  return summary


def format_summary(summary: dict[str, Any], config: Any, base: Any, seconds: float, rows: Any) -> str:
  """distill.md: the three test accuracies per seed, their medians and the two targets."""
  r = config.distill_demo.recipe
  k = int(config.examples_per_class)
  lines = [
    f'# Distillation on scikit-learn digits 5-9 ({k} labeled scans per class)',
    '',
    f'Teacher: the {config.model} fine-tuned from the digits 0-4 checkpoint on the {k} shots ({base}/finetune). '
    f'Student: {r.student} from random init, distilled for {r.schedule[-1]} steps of batch {r.batch_size} on the '
    f'{k} shots plus every other digits 5-9 training scan without its label. Labels only: the same '
    f'architecture from scratch on the {k} shots ({base}/scratch).',
    '',
    '| seed | teacher | distilled student | labels only | distilled - labels only | teacher - distilled |',
    '| ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for s, t, dd, lo in zip(
    summary['seeds'],
    summary['teacher_top1'],
    summary['distilled_top1'],
    summary['labels_only_top1'],
    strict=True,
  ):
    lines.append(
      f'| {s} | {t:.1%} | {dd:.1%} | {lo:.1%} | {(dd - lo) * 100:+.1f} pts | {(t - dd) * 100:+.1f} pts |'
    )
  t, dd, lo = (statistics.median(summary[k]) for k in ('teacher_top1', 'distilled_top1', 'labels_only_top1'))
  lines.append(
    f'| median | {t:.1%} | {dd:.1%} | {lo:.1%} | {(dd - lo) * 100:+.1f} pts | {(t - dd) * 100:+.1f} pts |'
  )
  gain_ok, gap_ok = dd - lo >= 0.05, t - dd <= 0.03
  lines += [
    '',
    f'Target 1, distilled >= labels only + 5 points (medians): {"met" if gain_ok else "NOT met"}.',
    f'Target 2, distilled within 3 points of the teacher (medians): {"met" if gap_ok else "NOT met"}.',
    f'Wall time: {seconds:.0f} s for this run; the distillation stages took '
    f'{sum(r["seconds"] or 0 for r in rows):.0f} s (a rerun skips finished stages).',
    '',
  ]
  return '\n'.join(lines)
