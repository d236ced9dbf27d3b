"""Long runs: SIGTERM stops after the step in flight with its checkpoint (one and two processes) and the
rerun ends bit for bit where a straight run does; checkpoints that fail to restore are moved aside, never
deleted; a save killed with SIGKILL leaves the last complete checkpoint; remat changes no number."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from helpers import base_config, make_folder, make_npz, start_two_processes, train_command  # noqa: E402

from bit import checkpoints, config, models, recovery, train, train_setup  # noqa: E402
from bit.errors import ConfigError  # noqa: E402
from bit.metrics_log import read_metrics  # noqa: E402

# --- checkpoints are never deleted ------------------------------------------------------------------------


def _tree(step):
  return {'step': np.asarray(step, np.int64), 'w': np.full(3, float(step), np.float32)}


def _manager(directory, steps):
  import orbax.checkpoint as ocp

  m = recovery.checkpoint_manager(pathlib.Path(directory), keep=0)
  for s in steps:
    m.save(s, args=ocp.args.StandardSave(_tree(s)))
  m.wait_until_finished()
  return m


def _damage(path):
  for f in path.rglob('*'):
    if f.is_file() and f.stat().st_size > 0 and 'METADATA' not in f.name:
      f.write_bytes(b'garbage')


def test_a_checkpoint_that_does_not_restore_is_moved_aside_with_its_reason(tmp_path):
  m = _manager(tmp_path, [2, 4, 6])
  ckpts = tmp_path / 'checkpoints'
  _damage(ckpts / '6')
  tree, step = recovery.restore_latest(m, _tree(0))
  assert step == 4 and float(tree['w'][0]) == 4
  assert sorted(p.name for p in ckpts.iterdir()) == ['2', '4', 'unreadable-6', 'unreadable-6.txt']
  assert 'step 6' in (ckpts / 'unreadable-6.txt').read_text()
  assert (ckpts / 'unreadable-6').is_dir() and list((ckpts / 'unreadable-6').rglob('*'))
  assert m.all_steps() == [2, 4]
  m.close()


def test_when_no_checkpoint_restores_the_run_stops_and_nothing_is_moved(tmp_path):
  m = _manager(tmp_path, [2, 4])
  before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*'))
  wrong = {'step': np.asarray(0, np.int64), 'w': np.zeros(5, np.float32)}  # e.g. a changed model
  with pytest.raises(recovery.CheckpointRestoreError, match=r'step 4: .*step 2: .*config\.restart=True'):
    recovery.restore_latest(m, wrong)
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*')) == before
  # On purpose: restart moves them aside (kept) and the run starts at step 0.
  moved = recovery.set_all_aside(m, primary=True)
  m.reload()
  assert moved.parent == tmp_path / 'checkpoints' and moved.name.startswith('restart-')
  assert sorted(p.name for p in moved.iterdir()) == ['2', '4']
  assert recovery.restore_latest(m, wrong) == (None, 0)
  m.close()


# Private (orbax's): its atomic rename is the one place to stop a save between writing the data and committing it.
KILLED_SAVE = r"""
import sys, time, pathlib, numpy as np, orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
from bit import recovery
real = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  if '4.orbax-checkpoint-tmp' in str(self.get()):
    print('saving', flush=True)
    time.sleep(600)  # killed here: the data of step 4 is written, the rename that commits it is not
  await real(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
m = recovery.checkpoint_manager(pathlib.Path(sys.argv[1]), keep=0)
for s in (2, 4):
  m.save(s, args=ocp.args.StandardSave({'step': np.asarray(s, np.int64), 'w': np.full(3, float(s), np.float32)}))
m.wait_until_finished()
"""


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
  proc = subprocess.Popen(
    [sys.executable, '-c', KILLED_SAVE, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
  )
  try:
    assert proc.stdout.readline().strip() == 'saving'
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  ckpts = tmp_path / 'checkpoints'
  tmp = [p.name for p in ckpts.iterdir() if '.orbax-checkpoint-tmp' in p.name]
  assert len(tmp) == 1 and tmp[0].startswith('4.'), sorted(p.name for p in ckpts.iterdir())
  m = recovery.checkpoint_manager(tmp_path, keep=0)
  tree, step = recovery.restore_latest(m, _tree(0))
  assert step == 2 and float(tree['w'][0]) == 2
  m.close()
  assert (ckpts / tmp[0]).is_dir()  # orbax's unfinished folder: not a checkpoint, and not deleted


# --- rematerialization ------------------------------------------------------------------------------------

# LLVM's optimization level 0: the same XLA program and numbers, compiled in about half the time on CPU.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def test_remat_gives_the_same_loss_and_gradients():
  from bit.train_state import cross_entropy

  model = models.create_model('R26x1', 4)
  params = models.init_params(model, image_size=32)
  params['head']['kernel'] = jax.random.normal(jax.random.PRNGKey(1), params['head']['kernel'].shape) * 0.1
  images = jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 3), minval=-1, maxval=1)
  labels = jax.nn.one_hot(jnp.array([0, 3]), 4)

  def loss_and_grads(remat):
    m = model.clone(remat=remat)
    f = jax.jit(jax.value_and_grad(lambda p: cross_entropy(m.apply({'params': p}, images), labels)))
    return f.lower(params).compile(FAST_COMPILE)(params)

  loss, grads = loss_and_grads('none')
  for remat in ('unit', 'stage'):
    loss_r, grads_r = loss_and_grads(remat)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for (path, g), g_r in zip(
      jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_r), strict=True
    ):
      np.testing.assert_allclose(
        g_r, g, rtol=1e-4, atol=1e-5 * float(np.abs(g).max()), err_msg=f'{remat} {jax.tree_util.keystr(path)}'
      )


def test_remat_unit_really_drops_the_activations():
  # XLA's own figure for the compiled program: with nn.remat it grew on CPU (the recomputation was merged
  # back into the forward pass), so this guards the saving itself, not only the numbers.
  x = jnp.zeros((8, 16, 16, 128))

  def temp(remat):
    block = models.ResidualBlock(units=3, features=32, remat=remat)
    params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)['params']
    loss = lambda p, x: jnp.sum(jnp.square(block.apply({'params': p}, x)))  # noqa: E731
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x)
    return lowered.compile(FAST_COMPILE).memory_analysis().temp_size_in_bytes

  none, unit = temp('none'), temp('unit')
  assert unit <= 0.65 * none, (unit, none)


def test_remat_is_checked_and_keeps_the_param_names():
  c = base_config('R26x1', '/nowhere', remat='layer')
  with pytest.raises(ConfigError, match=r"config.remat='layer' is not one of none, unit, stage"):
    config.check(c)
  model = models.create_model('R26x1', 3)
  shapes = models.param_shapes(model)
  for remat in ('unit', 'stage'):
    assert jax.tree.structure(models.param_shapes(model.clone(remat=remat))) == jax.tree.structure(shapes)


# --- preemption -------------------------------------------------------------------------------------------


def _command(workdir, npz, folder, *extra):
  return train_command(workdir, npz, folder, '--config.checkpoint_every=0', '--config.log_every=1', *extra)


def _wait_for_step(workdir, k, procs, timeout=300):
  deadline = time.time() + timeout
  while not any(m.get('step', 0) >= k and 'loss' in m for m in read_metrics(workdir)):
    for p in procs:
      assert p.poll() is None, p.communicate()[1][-3000:]
    assert time.time() < deadline, f'no step {k} after {timeout} s'
    time.sleep(0.02)


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp('long')
  return {'folder': make_folder(root / 'folder'), 'npz': make_npz(root / 'r26x1.npz')}


def test_sigterm_saves_the_step_in_flight_and_the_rerun_equals_a_straight_run(assets, tmp_path):
  workdir, k = tmp_path / 'w', 3
  cmd = _command(workdir, assets['npz'], assets['folder'], '--config.num_devices=1')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'))
  proc = subprocess.Popen(
    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent
  )
  _wait_for_step(workdir, k, [proc])
  sent = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  print(f'SIGTERM to exit: {time.perf_counter() - sent:.2f} s')
  assert proc.returncode == 143, err[-3000:]
  lines = read_metrics(workdir)
  stopped = [m for m in lines if m.get('preempted')]
  assert len(stopped) == 1 and stopped[0]['step'] >= k, lines
  step = stopped[0]['step']
  assert f'stopped by SIGTERM after step {step} of 10' in err
  assert (workdir / 'checkpoints' / str(step)).is_dir() and not (workdir / 'model.npz').exists()
  assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]

  done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = read_metrics(workdir)
  marker = lines.index({'step': step, 'resumed_from_step': step})
  assert [m['step'] for m in lines[marker:] if 'loss' in m] == list(range(step + 1, 11))
  # The same run without a signal, in this process: the same model, bit for bit.
  straight = train.fit(
    base_config(assets['npz'], assets['folder'], num_devices=1, checkpoint_every=0), tmp_path / 's'
  )
  resumed = np.load(workdir / 'model.npz')
  expected = np.load(tmp_path / 's' / 'model.npz')
  assert resumed.files == expected.files
  for name in expected.files:
    np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
  assert json.loads(done.stdout.strip().splitlines()[-1])['step'] == 10 == straight.metrics['step']


def test_sigterm_during_the_evaluation_or_the_export_keeps_the_checkpoint_and_redoes_the_export(
  assets, tmp_path, monkeypatch
):
  from bit import checkpoints as ckpt
  from bit.errors import Interrupted

  config = base_config(assets['npz'], assets['folder'], num_devices=1, schedule=(1, 2, 3, 4, 5))
  workdir = tmp_path / 'w'
  real_evaluator, real_save_npz = train_setup.evaluator, ckpt.save_npz

  def evaluator_signalled(setup):  # the signal arrives while the test split is being evaluated
    evaluate = real_evaluator(setup)

    def run(dstate):
      os.kill(os.getpid(), signal.SIGTERM)
      return evaluate(dstate)

    return run

  def save_npz_signalled(params, path):  # ... while model.npz is being written
    os.kill(os.getpid(), signal.SIGTERM)
    real_save_npz(params, path)

  # 1: during the evaluation of the last step: that step's checkpoint is saved, nothing exported.
  monkeypatch.setattr(train_setup, 'evaluator', evaluator_signalled)
  with pytest.raises(Interrupted, match='stopped by SIGTERM after step 5 of 5') as e:
    train.fit(config, workdir)
  assert e.value.exit_code == 143
  assert (workdir / 'checkpoints' / '5').is_dir() and not (workdir / 'model.npz').exists()
  # 2: the rerun evaluates again, then the signal comes during the export: model.npz is whole (written
  # atomically) and the pictures are not drawn.
  monkeypatch.setattr(train_setup, 'evaluator', real_evaluator)
  monkeypatch.setattr(ckpt, 'save_npz', save_npz_signalled)
  with pytest.raises(Interrupted, match='stopped by SIGTERM') as e:
    train.fit(config, workdir)
  assert e.value.exit_code == 143
  assert not (workdir / 'curves.png').exists() and not [p for p in workdir.iterdir() if '.tmp' in p.name]
  assert sorted(np.load(workdir / 'model.npz').files) == sorted(np.load(assets['npz']).files)
  # 3: the next rerun exports everything; the checkpoint was kept throughout.
  monkeypatch.setattr(ckpt, 'save_npz', real_save_npz)
  result = train.fit(config, workdir)
  assert result.metrics['step'] == 5 and (workdir / 'curves.png').is_file()
  assert [m['step'] for m in read_metrics(workdir) if m.get('preempted')] == [5, 5]
  assert (workdir / 'checkpoints' / '5').is_dir()


TWO_PROCESSES = r"""
import sys
from bit import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from bit import train
from bit.errors import Interrupted
from bit import config as common
c = common.get_config()
c.model, c.dataset, c.batch_size, c.resize, c.crop = sys.argv[3], sys.argv[4], 8, 40, 32
c.schedule, c.mixup_alpha, c.checkpoint_every, c.log_every = (2, 4, 6, 8, 10), 0.0, 0, 1
try:
  train.fit(c, sys.argv[5])
except Interrupted as e:
  print(e, file=sys.stderr, flush=True)
  sys.exit(e.exit_code)
"""


def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(assets, tmp_path):
  workdir, k = tmp_path / 'w', 3
  args = (assets['npz'], assets['folder'], workdir)
  procs = start_two_processes(TWO_PROCESSES, *args)
  try:
    _wait_for_step(workdir, k, procs)
    procs[0].send_signal(signal.SIGTERM)  # only process 0 is told; process 1 learns it at the next step
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for e in errs]
  said = {e.strip().splitlines()[-1] for e in errs}
  assert len(said) == 1 and 'stopped by SIGTERM after step' in said.pop()  # the same step in both
  stopped = [m for m in read_metrics(workdir) if m.get('preempted')]
  assert len(stopped) == 1 and stopped[0]['step'] >= k
  step = stopped[0]['step']
  assert (workdir / 'checkpoints' / str(step)).is_dir()

  procs = start_two_processes(TWO_PROCESSES, *args)
  outs = [p.communicate(timeout=420) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
  lines = read_metrics(workdir)
  marker = lines.index({'step': step, 'resumed_from_step': step})
  assert [m['step'] for m in lines[marker:] if 'loss' in m] == list(range(step + 1, 11))
  _, params = checkpoints.load(str(workdir / 'model.npz'), keep_head=True)
  assert not np.allclose(params['head']['kernel'], 0)


# --- the dry run ------------------------------------------------------------------------------------------


def test_dry_run_prints_the_memory_plan_without_data_or_workdir(capsys, monkeypatch, tmp_path):
  from helpers import run_cli

  from bit.tools import cli

  monkeypatch.chdir(tmp_path)
  argv = [
    'bit-train',
    '--config',
    str(HERE.parent / 'configs' / 'common.py'),
    '--config.model=R26x1',
    '--config.dataset=not_here_anywhere',
    '--config.batch_size=4',
    '--config.num_devices=2',
    '--dry_run',
  ]
  from bit import dry_run

  with pytest.raises(ConfigError, match=r'give num_classes=N and config.crop=PIXELS'):
    dry_run.plan(base_config('R26x1', 'not_here_anywhere', crop=None))
  code, out, err = run_cli(
    cli.train_main,
    argv + ['--num_classes=10', '--config.crop=32', '--device_memory_gb=64'],
    capsys,
    monkeypatch,
  )
  assert code == 0, err
  plan = json.loads(out.strip().splitlines()[-1])
  assert plan['architecture'] == 'R26x1' and plan['devices'] == 2 and plan['per_device_batch'] == 2
  assert plan['params_bytes'] == 4 * sum(
    int(np.prod(x.shape)) for x in jax.tree.leaves(models.param_shapes(models.create_model('R26x1', 10)))
  )
  assert plan['temp_bytes_per_device'] > 0 and plan['fits'] is True and plan['suggest'] is None
  parts = ('params_bytes', 'opt_state_bytes', 'batch_bytes', 'temp_bytes_per_device')
  assert plan['bytes_per_device'] == sum(plan[k] for k in parts)
  assert 'XLA temporaries' in out and list(tmp_path.iterdir()) == []  # nothing written


def test_the_dry_runs_suggestion_fits_when_applied():
  """A limit the step fits with four accumulation steps but not one: the plan suggests accumulation (or remat),
  and the config with the suggestion applied, planned again under the same limit, fits. (On the CPU backend
  accumulation saves little, ~2% of R26x1's 64 px batch of 16: the limit is the accumulated step's own.)"""
  from bit import dry_run

  settings = dict(batch_size=16, num_devices=1, crop=64)
  limit = dry_run.plan(
    base_config('R26x1', 'not_here_anywhere', accum_steps=4, **settings), num_classes=10, device_memory_gb=64
  )['bytes_per_device']
  gb = (limit + 0.5) / dry_run.GIB
  tight = dry_run.plan(
    base_config('R26x1', 'not_here_anywhere', **settings), num_classes=10, device_memory_gb=gb
  )
  assert tight['fits'] is False and isinstance(tight['suggest'], dict), tight['suggest']
  s = tight['suggest']
  applied = base_config(
    'R26x1', 'not_here_anywhere', accum_steps=s['accum_steps'], remat=s['remat'], **settings
  )
  again = dry_run.plan(applied, num_classes=10, device_memory_gb=gb)
  assert again['fits'] is True and again['bytes_per_device'] == s['bytes_per_device'] <= limit


def test_dry_run_suggests_the_smallest_accumulation_then_remat_that_fits(monkeypatch):
  from bit import dry_run

  temp = {'none': 1000, 'unit': 400, 'stage': 300}  # bytes at accum_steps=1; gradients 100 of them

  def fake(config, arch, num_classes, crop, *, remat='none', accum_steps=1):
    t = 100 + (temp[remat] - 100) // accum_steps
    return {
      'remat': remat,
      'accum_steps': accum_steps,
      'params_bytes': 100,
      'opt_state_bytes': 100,
      'batch_bytes': 0,
      'temp_bytes_per_device': t,
      'bytes_per_device': 200 + t,
      'per_device_batch': 8,
    }

  monkeypatch.setattr(dry_run, 'measure', fake)
  config = base_config('R50x1', 'not_here_anywhere', crop=224)

  def suggest(limit):
    return dry_run.plan(config, num_classes=10, device_memory_gb=(limit + 0.5) / dry_run.GIB)['suggest']

  assert suggest(760)['accum_steps'] == 2
  assert suggest(700)['accum_steps'] == 4
  assert suggest(420) == {
    'remat': 'none',
    'accum_steps': 8,
    'bytes_per_device': 412,
  }
  assert suggest(400) == {
    'remat': 'unit',
    'accum_steps': 4,
    'bytes_per_device': 375,
  }
  assert suggest(250) == 'nothing fits: use more devices or a smaller crop'
