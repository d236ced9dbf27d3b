"""End-to-end fine-tuning on tiny data: loss falls, the same params on 1 device, 4 devices and with gradient
accumulation, exact resume (in-process and after SIGKILL of the CLI), NaN stop, workdir checks, mock TFDS.

The runs are module-scoped and share one config (R26x1 from a random official-layout npz, 32 px, batch 8,
10 steps) so the compiled steps are reused between tests (`bit.train` caches them per setup).
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from helpers import (
  NUM_CLASSES,
  ROOT,
  SCHEDULE,
  assert_params_close,
  base_config,
  flat,
  kill_after_checkpoint,
  make_folder,
  make_npz,
  train_command,
)

from bit import checkpoints, train
from bit.errors import ConfigError
from bit.metrics_log import read_metrics


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp('assets')
  return {'folder': make_folder(root / 'folder'), 'npz': make_npz(root / 'r26x1.npz'), 'root': root}


@pytest.fixture(scope='module')
def runs(assets, tmp_path_factory):
  """name -> (workdir, FitResult), run on first use."""
  done = {}
  setups = {
    'one': dict(num_devices=1, eval_every=5),
    'accum2': dict(num_devices=0, accum_steps=2),
  }

  def get(name):
    if name not in done:
      workdir = tmp_path_factory.mktemp(name)
      done[name] = workdir, train.fit(base_config(assets['npz'], assets['folder'], **setups[name]), workdir)
    return done[name]

  return get


def test_tiny_run_loss_falls_and_workdir_is_complete(runs, assets):
  workdir, result = runs('one')
  lines = read_metrics(workdir)
  train_lines = [m for m in lines if 'loss' in m]
  assert [m['step'] for m in train_lines] == list(range(1, 11))
  for m in train_lines:
    assert {'loss', 'lr', 'images_per_sec'} <= m.keys() and m['images_per_sec'] > 0
  losses = [m['loss'] for m in train_lines]
  assert losses[0] == pytest.approx(np.log(NUM_CLASSES), abs=1e-4)  # zero head: uniform predictions
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
  # The hyper-rule schedule in-graph: warmup from 0, then a decay by 10 after each boundary.
  assert train_lines[0]['lr'] == 0 and train_lines[2]['lr'] == pytest.approx(0.003)
  assert train_lines[6]['lr'] == pytest.approx(0.0003) and train_lines[8]['lr'] == pytest.approx(0.00003)
  evals = [m for m in lines if 'top1' in m]
  assert [m['step'] for m in evals] == [5, 10]
  assert result.metrics['top1'] == evals[-1]['top1'] and 0 <= result.metrics['top1'] <= 1
  assert result.metrics['num_examples'] == 2 * NUM_CLASSES
  # The resolved config, the exported model and its labels.
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['schedule'] == list(SCHEDULE) and saved['crop'] == 32 and saved['mixup_alpha'] == 0.1
  model, params = checkpoints.load(str(workdir / 'model.npz'), keep_head=True)
  assert model.num_classes == NUM_CLASSES
  assert_params_close(params, result.params, atol=0, rtol=0)
  assert (workdir / 'labels.txt').read_text().split() == [f'class_{i}' for i in range(NUM_CLASSES)]
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [6, 8, 10]  # keep 3
  assert list(workdir.glob('events.out.tfevents.*'))


def test_same_params_on_four_devices_with_gradient_accumulation(runs):
  # 4 devices with shard_map, each device's 2 examples as 2 micro-batches of 1, against 1 device with the
  # whole batch at once. (4 devices with pmap: the CLI test below; each factor alone: test_parallel.py.)
  _, one = runs('one')
  workdir, acc = runs('accum2')
  assert_params_close(one.params, acc.params)
  assert not np.allclose(flat(one.params)['head/kernel'], 0)  # it trained
  assert json.loads((workdir / 'config.json').read_text())['accum_steps'] == 2


def test_rerun_of_a_finished_run_resumes_and_a_different_run_is_refused(runs, assets):
  workdir, first = runs('one')
  again = train.fit(base_config(assets['npz'], assets['folder'], num_devices=1, eval_every=5), workdir)
  assert again.metrics['top1'] == first.metrics['top1']
  assert_params_close(again.params, first.params, atol=0, rtol=0)
  lines = read_metrics(workdir)
  assert lines[-2] == {'step': 10, 'resumed_from_step': 10} and 'top1' in lines[-1]
  with pytest.raises(ConfigError, match='seed'):
    train.fit(base_config(assets['npz'], assets['folder'], num_devices=1, seed=1), workdir)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(runs, assets, tmp_path, caplog):
  src, first = runs('one')
  workdir = tmp_path / 'w'
  shutil.copytree(src, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '10')  # as if the run died after saving step 8
  for f in (workdir / 'checkpoints' / '8').rglob('*'):
    if f.is_file() and f.stat().st_size > 0 and 'METADATA' not in f.name:
      f.write_bytes(b'garbage')
  resumed = train.fit(base_config(assets['npz'], assets['folder'], num_devices=1, eval_every=5), workdir)
  assert 'damaged' in caplog.text
  lines = read_metrics(workdir)
  marker = max(i for i, m in enumerate(lines) if 'resumed_from_step' in m)
  assert lines[marker]['resumed_from_step'] == 6
  assert [m['step'] for m in lines[marker + 1 :] if 'loss' in m] == [7, 8, 9, 10]
  assert_params_close(resumed.params, first.params, atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_with_step_and_last_good_checkpoint(assets, tmp_path, monkeypatch):
  from bit import data

  real = data.train_iterator

  def poisoned(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step + 1):
      if step == 5:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  monkeypatch.setattr(data, 'train_iterator', poisoned)
  with pytest.raises(train.NonFiniteLossError, match=r'at step 5;.*last good checkpoint is step 4'):
    train.fit(base_config(assets['npz'], assets['folder'], num_devices=1, eval_every=5), tmp_path / 'w')


def test_mock_tfds_dataset(assets, tmp_path):
  import tensorflow_datasets as tfds

  from bit import data

  with tfds.testing.mock_data(num_examples=16):
    result = train.fit(base_config(assets['npz'], 'cifar10', num_devices=1, eval_every=5), tmp_path / 'w')
    names = data.get_info('cifar10').class_names
  assert result.metrics['num_examples'] == 16 and len(names) == 10
  assert (tmp_path / 'w' / 'labels.txt').read_text().split() == list(names)
  assert all(np.isfinite(m['loss']) for m in read_metrics(tmp_path / 'w') if 'loss' in m)


def cli_command(workdir, model, dataset):
  """bit-train with the values of `base_config`, as a user types it."""
  return train_command(
    workdir,
    model,
    dataset,
    '--config.seed=0',
    '--config.eval_every=0',
    '--config.checkpoint_every=2',
    '--config.log_every=1',
    '--config.parallelism=pmap',
  )


def test_cli_sigkill_then_rerun_resumes_with_the_same_result(runs, assets, tmp_path):
  workdir = tmp_path / 'w'
  cmd = cli_command(workdir, assets['npz'], assets['folder'])
  # The second process reuses the first one's compiled step from the persistent cache.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'))
  kill_after_checkpoint(cmd, workdir, env, cwd=ROOT)
  before = read_metrics(workdir)

  done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = read_metrics(workdir)
  assert lines[: len(before)] == before  # appended, never truncated
  marker = [m for m in lines if 'resumed_from_step' in m]
  assert len(marker) == 1 and marker[0]['resumed_from_step'] >= 2
  start = marker[0]['resumed_from_step']
  after = lines[lines.index(marker[0]) + 1 :]
  assert [m['step'] for m in after if 'loss' in m] == list(range(start + 1, 11))  # earlier steps not redone
  assert json.loads(done.stdout.strip().splitlines()[-1])['step'] == 10
  # Resumed pmap run on 4 devices == uninterrupted run on 1 device.
  _, one = runs('one')
  _, params = checkpoints.load(str(workdir / 'model.npz'), keep_head=True)
  assert_params_close(params, one.params)
