"""The offline demo: transfer learning that pays off, on real data that ships with scikit-learn.

  bit-train --config configs/demo.py --workdir /tmp/bit_demo

No network at all. The demo runs the same code path as a real fine-tune (`bit.train.train_and_evaluate`:
official-layout checkpoint -> new head -> hyper-rule schedule -> data-parallel training -> eval -> plots):

1. Data: scikit-learn's handwritten digits (1,797 real 8x8 scans) are exported once into two image folders
   of upsampled PNGs, `ROOT/<split>/<class>/<image>`: a pretraining set (digits 0-4) and a transfer set
   (digits 5-9), each with a fixed, seeded train/test split.
2. pretrain/: a small BiT ResNet (config.model, R26x1) trained from scratch on digits 0-4; it ends as an
   official-layout `pretrain/model.npz`, exactly like a released BiT checkpoint.
3. finetune/<k>shot-seed<s>/: that checkpoint fine-tuned, with a new zero head, on a few examples per class of
   digits 5-9 (config.examples_per_class).
4. scratch/<k>shot-seed<s>/: the same architecture trained from random init on the same few examples, same recipe.
5. demo.json / demo.md: the two test accuracies side by side, per seed.

Every stage is its own workdir and resumable: a finished stage (its `result.json`) is skipped on a rerun,
an interrupted one resumes from its orbax checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import time
from typing import Any

import numpy as np

from bit import files, layout
from bit import workdir as workdir_lib
from bit.errors import ConfigError, DataError

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
TRANSFER_DIGITS = (5, 6, 7, 8, 9)
RESULT_FILE = 'result.json'  # written by `run_stage` when a stage has finished
SUMMARY_JSON = 'demo.json'
SUMMARY_MD = 'demo.md'


# --- data ------------------------------------------------------------------------------------------------


def digits_dir(
  root: str | os.PathLike[str],
  *,
  image_size: int = 32,
  test_fraction: float = 1 / 3,
  seed: int = 0,
  rotations: bool = True,
) -> pathlib.Path:
  """The directory that `export_digits` fills for these settings (one directory per setting)."""
  name = f'digits-{int(image_size)}px-test{round(test_fraction * 100)}-seed{seed}' + (
    '-rot' if rotations else ''
  )
  return pathlib.Path(root).expanduser() / name


def export_digits(
  root: str | os.PathLike[str],
  *,
  image_size: int = 32,
  test_fraction: float = 1 / 3,
  seed: int = 0,
  rotations: bool = True,
) -> dict[str, Any]:
  """Exports scikit-learn's digits as two image folders; returns {'pretrain': path, 'transfer': path}.

  `pretrain` holds digits 0-4 and `transfer` digits 5-9, each as `<split>/<class>/<index>.png` with splits
  `train` and `test`: per digit a seeded `test_fraction` of the scans is the test split (fixed, so few-shot
  sampling, which draws from `train` only, never touches it). Images are upsampled from 8x8 to
  `image_size` (bicubic), dark ink on white, RGB. The transfer classes are the digits ('5' .. '9').

  With `rotations`, the pretraining task is "which digit, which way up": every pretraining scan also
  appears turned by 90, 180 and 270 degrees, as the classes '<digit>_rot<angle>' (20 classes). A network
  that only has to tell five digits apart learns little that helps with five new ones; telling digits
  and orientations apart needs richer stroke features, and those transfer (see docs/benchmarks.md).

  The export is atomic (a temporary directory renamed into place) and done once: an existing export is
  reused.
  """
  if int(image_size) < 8:
    raise ConfigError(f'demo image_size={image_size} is too small: the digits are 8x8 scans; use e.g. 32.')
  if not 0 < test_fraction < 1:
    raise ConfigError(f'demo test_fraction={test_fraction} must be between 0 and 1 (e.g. 0.33).')
  final = digits_dir(root, image_size=image_size, test_fraction=test_fraction, seed=seed, rotations=rotations)
  out = {'pretrain': final / 'pretrain', 'transfer': final / 'transfer'}
  if final.is_dir():
    return out
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # a declared dependency, but say what to do if it went missing
    raise DataError('the demo needs scikit-learn for its data: pip install scikit-learn') from e
  from PIL import Image

  digits = load_digits()
  images, targets = digits.images, digits.target
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = files.temporary_dir(final.parent, prefix=f'.{final.name}.', suffix='')
  try:
    rng = np.random.default_rng(seed)
    for digit in range(10):
      part = 'pretrain' if digit in PRETRAIN_DIGITS else 'transfer'
      turns = (0, 1, 2, 3) if rotations and part == 'pretrain' else (0,)
      idx = np.flatnonzero(targets == digit)
      idx = idx[rng.permutation(len(idx))]
      n_test = int(round(len(idx) * test_fraction))
      for split, chosen in (('test', idx[:n_test]), ('train', idx[n_test:])):
        for turn in turns:
          folder = tmp / part / split / (f'{digit}_rot{90 * turn}' if len(turns) > 1 else str(digit))
          folder.mkdir(parents=True)
          for i in sorted(chosen):
            # 0..16 ink counts -> dark ink on white paper, as the scans were written.
            pixels = (255 - np.rot90(images[i], turn) * (255 / 16)).clip(0, 255).astype(np.uint8)
            im = Image.fromarray(pixels, 'L').resize((image_size, image_size), Image.BICUBIC).convert('RGB')
            im.save(folder / f'{i:04d}.png')
    info = {
      'source': 'sklearn.datasets.load_digits',
      'image_size': image_size,
      'test_fraction': test_fraction,
      'seed': seed,
      'pretrain_digits': PRETRAIN_DIGITS,
      'transfer_digits': TRANSFER_DIGITS,
      'pretrain_rotations': rotations,
    }
    (tmp / 'info.json').write_text(json.dumps(info, indent=2) + '\n')
    try:
      os.rename(tmp, final)
    except OSError:
      if not final.is_dir():  # not a concurrent export that got there first: a real error
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


# --- stages ------------------------------------------------------------------------------------------------


def fingerprint(config: Any) -> dict[str, Any]:
  """The settings that decide a stage's result (operational keys such as log_every may change freely)."""
  from bit.config import OPERATIONAL_KEYS

  c = json.loads(config.to_json()) if hasattr(config, 'to_json') else dict(config)
  return {k: v for k, v in sorted(c.items()) if k not in OPERATIONAL_KEYS}


def finished_result(workdir: str | os.PathLike[str], config: Any = None) -> dict[str, Any] | None:
  """The result of a finished stage/cell in `workdir`, or None if it has not finished.

  With `config`, a result made with different settings is an error (ConfigError naming the keys), not a
  silent reuse.
  """
  path = pathlib.Path(workdir).expanduser() / RESULT_FILE
  if not path.is_file():
    return None
  try:
    result = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None  # a damaged marker: the stage reruns (its checkpoints make that cheap)
  if config is not None:
    old, new = result.get('config', {}), fingerprint(config)
    diff = workdir_lib.differences(old, new)
    if diff:
      details = workdir_lib.describe(old, new, diff)
      raise ConfigError(
        f'{path.parent} holds a finished run with other settings ({details}): use a new '
        f'--workdir, or delete {path.parent} to run it again.'
      )
  return result


def _atomic_json(path: pathlib.Path, obj) -> None:
  files.write_json(path, obj, sort_keys=True)


def run_stage(config: Any, workdir: str | os.PathLike[str], *, name: str = '') -> dict[str, Any]:
  """Runs `train_and_evaluate(config, workdir)` unless it has finished before; returns its result.

  The result is {'metrics': the final metrics, 'config': the settings, 'seconds': wall time, 'skipped':
  bool}. A finished run leaves `workdir/result.json` (atomic), which makes a rerun skip it; an unfinished
  one resumes from its orbax checkpoint inside `train_and_evaluate`.
  """
  from bit.train import train_and_evaluate

  workdir = pathlib.Path(workdir).expanduser()
  done = finished_result(workdir, config)
  if done is not None:
    print(
      f'[{name or workdir.name}] finished before (top-1 {done["metrics"]["top1"]:.1%}): skipped, '
      f'see {workdir}',
      flush=True,
    )
    return {**done, 'skipped': True}
  print(f'[{name or workdir.name}] {config.model} on {config.dataset} -> {workdir}', flush=True)
  start = time.perf_counter()
  metrics = train_and_evaluate(config, workdir)
  result = {
    'metrics': metrics,
    'config': fingerprint(config),
    'seconds': round(time.perf_counter() - start, 1),
  }
  _atomic_json(workdir / RESULT_FILE, result)
  return {**result, 'skipped': False}


def _stage_config(config, **overrides):
  """A plain training config (the keys of bit/config.py) from the demo config's keys plus `overrides`."""
  from bit import config as config_module

  c = config_module.get_config()
  for key in c:
    if key in config and key not in overrides:
      c[key] = config[key]
  for key, value in overrides.items():
    c[key] = value
  return c


def scaled_schedule(steps: int) -> tuple[int, ...]:
  """The hyper-rule's small-data schedule [100, 200, 300, 400, 500] shrunk to `steps` total steps."""
  from bit import hyperrule

  steps = int(steps)
  if steps < 5:
    raise ConfigError(f'demo steps={steps} is too few: the schedule needs at least 5 steps.')
  supports = hyperrule.schedule(1)
  out, last = [], -1
  for s in supports:
    last = max(last + 1, round(s * steps / supports[-1]))
    out.append(last)
  return tuple(out)


def export_for(config: Any, workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """`export_digits` with the settings of `config.demo`, under `config.demo.data_dir` or WORKDIR/data."""
  d = config.demo
  root = (
    pathlib.Path(d.data_dir).expanduser()
    if d.get('data_dir')
    else pathlib.Path(workdir).expanduser() / 'data'
  )
  return export_digits(
    root,
    image_size=d.image_size,
    test_fraction=d.test_fraction,
    seed=d.split_seed,
    rotations=d.pretrain_rotations,
  )


def pretrain_config(config: Any, dataset: Any) -> Any:
  """The pretraining stage's training config: config.model from scratch on `dataset` (digits 0-4), all of it."""
  d = config.demo
  return _stage_config(
    config,
    model=config.model,
    dataset=str(dataset),
    examples_per_class=None,
    batch_size=int(d.pretrain_batch_size),
    base_lr=float(d.pretrain_lr),
    schedule=scaled_schedule(d.pretrain_steps),
    seed=int(d.pretrain_seed),
  )


def stage_configs(config: Any, workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """{'pretrain': config, 'finetune/<k>shot-seed<s>': config, 'scratch/...': config} for a demo config.

  The keys are the stages' sub-workdirs. Exports the digits first (once).
  """
  workdir = pathlib.Path(workdir).expanduser()
  data = export_for(config, workdir)
  stages = {'pretrain': pretrain_config(config, data['pretrain'])}
  pretrained = str(workdir / 'pretrain' / layout.MODEL_FILE)
  for seed in seeds(config):
    for kind, model in (('finetune', pretrained), ('scratch', config.model)):
      stages[f'{kind}/{_run_name(config, seed)}'] = _stage_config(
        config, model=model, dataset=str(data['transfer']), seed=seed
      )
  return stages


def _run_name(config, seed: int) -> str:
  # Shots in the name: another --config.examples_per_class on the same workdir reuses the pretraining.
  return f'{int(config.examples_per_class)}shot-seed{seed}'


def seeds(config: Any) -> list[int]:
  """The seeds the demo runs: config.seed, config.seed + 1, ... (config.demo.num_seeds of them)."""
  return [int(config.seed) + i for i in range(max(1, int(config.demo.num_seeds)))]


def enable_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache under the bit cache (unless one is configured already).

  The demo's and the bench's stages compile the same train and eval steps again and again (same model, batch
  and image size, new params); with the cache only the first stage pays for the compilation.
  """
  import jax

  from bit.checkpoints import cache_dir

  if jax.config.jax_compilation_cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  jax.config.update('jax_compilation_cache_dir', str(cache_dir() / 'jax_compilation_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def run_demo(config: Any, workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Runs every stage of the demo (skipping finished ones) and writes demo.json and demo.md; returns the summary.

  `config` is a demo config (configs/demo.py): the keys of bit/config.py, used for the few-shot fine-tune and
  the scratch baseline, plus `config.demo` for the data and the pretraining stage.
  """
  if 'demo' not in config:
    raise ConfigError('run_demo needs a demo config with a `demo` section, e.g. configs/demo.py.')
  if config.examples_per_class is None:
    raise ConfigError('the demo is few-shot: set --config.examples_per_class (e.g. 10).')
  workdir = pathlib.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  enable_compilation_cache()
  stages = stage_configs(config, workdir)
  results = {}
  for i, (name, c) in enumerate(stages.items(), 1):
    results[name] = run_stage(c, workdir / name, name=f'{i}/{len(stages)} {name}')
  summary = _summary(config, workdir, results, time.perf_counter() - start)
  _atomic_json(workdir / SUMMARY_JSON, summary)
  text = format_summary(summary)
  files.write_text(workdir / SUMMARY_MD, text)
  print('\n' + text, flush=True)
  return summary


def _summary(config, workdir, results, seconds) -> dict:
  d = config.demo
  rows = []
  for seed in seeds(config):
    name = _run_name(config, seed)
    ft, sc = results[f'finetune/{name}'], results[f'scratch/{name}']
    rows.append(
      {
        'seed': seed,
        'pretrained_top1': ft['metrics']['top1'],
        'scratch_top1': sc['metrics']['top1'],
        'finetune_workdir': str(workdir / 'finetune' / name),
        'scratch_workdir': str(workdir / 'scratch' / name),
      }
    )
  pre, scr = [r['pretrained_top1'] for r in rows], [r['scratch_top1'] for r in rows]
  return {
    'model': config.model,
    'image_size': int(d.image_size),
    'examples_per_class': int(config.examples_per_class),
    'pretrain_task': ('digit and orientation, 20 classes' if d.pretrain_rotations else 'the 5 digits'),
    'pretrain_top1': results['pretrain']['metrics']['top1'],
    'pretrain_checkpoint': str(workdir / 'pretrain' / layout.MODEL_FILE),
    'seeds': rows,
    'pretrained_median': statistics.median(pre),
    'scratch_median': statistics.median(scr),
    'pretrained_wins_every_seed': all(p > s for p, s in zip(pre, scr, strict=True)),
    'seconds': round(seconds, 1),
    'stage_seconds': {k: r.get('seconds') for k, r in results.items()},
  }


def format_summary(summary: dict[str, Any]) -> str:
  """The demo's result as a short Markdown report (also printed at the end of the run)."""
  k, model, size = summary['examples_per_class'], summary['model'], summary['image_size']
  lines = [
    f'# Pretrained vs scratch: {model} on scikit-learn digits ({size}x{size} px)',
    '',
    f'Pretrained from scratch on digits 0-4 ({summary["pretrain_task"]}; test top-1 '
    f'{summary["pretrain_top1"]:.1%}), saved as '
    f'`{summary["pretrain_checkpoint"]}`;',
    f'then trained on digits 5-9 with {k} examples per class, tested on the held-out digits 5-9 scans.',
    '',
    '| seed | fine-tuned from the pretrained checkpoint | from scratch | gain |',
    '| ---: | ---: | ---: | ---: |',
  ]
  for r in summary['seeds']:
    gain = r['pretrained_top1'] - r['scratch_top1']
    lines.append(
      f'| {r["seed"]} | {r["pretrained_top1"]:.1%} | {r["scratch_top1"]:.1%} | {gain * 100:+.1f} pts |'
    )
  lines.append(
    f'| median | {summary["pretrained_median"]:.1%} | {summary["scratch_median"]:.1%} | '
    f'{(summary["pretrained_median"] - summary["scratch_median"]) * 100:+.1f} pts |'
  )
  verdict = (
    'The pretrained model wins on every seed.'
    if summary['pretrained_wins_every_seed']
    else 'The pretrained model does NOT win on every seed: train longer (config.demo.pretrain_steps).'
  )
  train = sum(s or 0 for s in summary['stage_seconds'].values())
  lines += [
    '',
    verdict,
    f'Wall time: {summary["seconds"]:.0f} s for this run; the stages took {train:.0f} s to train '
    '(a rerun skips finished stages).',
    '',
  ]
  return '\n'.join(lines)
