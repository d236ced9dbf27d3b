"""Distillation (bit.distill, bit-distill): the KL loss (zero for student = teacher, its gradient against a
hand-written one), the teacher never changes and sees the student's very view, resume after SIGKILL equals a
straight run, and the bad inputs of the issue.

One tiny setup (R26x1 teacher from a random official-layout npz, R26x1 student from scratch, 32 px, batch 8,
10 steps, 1 device) shared by every test that trains, so the step compiles once in this process.
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from helpers import kill_after_checkpoint, make_folder, make_npz, run_cli  # noqa: E402

from bit import checkpoints, config, data_sources, distill, models, train, train_setup  # noqa: E402
from bit.errors import ConfigError, DataError  # noqa: E402
from bit.metrics_log import read_metrics  # noqa: E402
from bit.tools import cli  # noqa: E402

distill_configs = config.load_module(HERE.parent / 'configs' / 'distill.py')

NUM_CLASSES = 10
FLAGS = [
  '--config.student=R26x1',
  '--config.batch_size=8',
  '--config.resize=40',
  '--config.crop=32',
  '--config.schedule=[2,4,6,8,10]',
  '--config.mixup_alpha=1.0',
  '--config.num_devices=1',
  '--config.checkpoint_every=2',
  '--config.log_every=1',
]


def make_config(teacher, folder, unlabeled=None, **overrides):
  """The shared tiny config: the same values as FLAGS."""
  c = distill_configs.get_config('R26x1')
  c.teacher, c.dataset, c.unlabeled = str(teacher), str(folder), unlabeled and str(unlabeled)
  c.batch_size, c.resize, c.crop, c.schedule, c.mixup_alpha = 8, 40, 32, (2, 4, 6, 8, 10), 1.0
  c.num_devices, c.checkpoint_every, c.log_every = 1, 2, 1
  for k, v in overrides.items():
    c[k] = v
  return c


def sha(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp('distill')
  folder = make_folder(root / 'folder')
  unlabeled = root / 'unlabeled'
  make_folder(unlabeled / 'nested', classes=3, train_per_class=2, test_per_class=1, seed=5)  # any layout
  return {
    'folder': folder,
    'unlabeled': unlabeled,
    'teacher': make_npz(root / 'teacher.npz', classes=NUM_CLASSES),
    'root': root,
    'teacher_sha256': sha(root / 'teacher.npz'),
  }


@pytest.fixture(scope='module')
def straight(assets):
  """The uninterrupted run, in this process: (workdir, metrics)."""
  workdir = assets['root'] / 'straight'
  metrics = distill.distill(make_config(assets['teacher'], assets['folder'], assets['unlabeled']), workdir)
  return workdir, metrics


# --- the loss -----------------------------------------------------------------------------------------------


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 5)) * 3
  for t in (1.0, 2.5):
    assert float(distill.kl_divergence(logits, logits, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill.kl_divergence(logits, logits[::-1], t)) > 0.05


def test_gradient_equals_the_hand_written_one():
  rng = np.random.default_rng(0)
  s = rng.normal(0, 2, (4, 5)).astype(np.float32)
  t = rng.normal(0, 2, (4, 5)).astype(np.float32)
  labels = np.zeros((4, 5), np.float32)
  labels[0, 1], labels[1, 3] = 1.0, 1.0
  labels[2] = 0.3 * np.eye(5)[4]  # MixUp of a labeled and an unlabeled example; row 3 has no label

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  teacher = distill.models.create_model('R26x1', 5)
  for temperature, w in ((1.0, 0.0), (2.5, 0.0), (2.0, 0.4)):
    loss_fn = distill.DistillLoss(teacher, temperature, w)
    # The step's loss with the teacher's logits given (its forward pass is stubbed out).
    object.__setattr__(loss_fn, 'teacher_logits', lambda params, images: jnp.asarray(t))
    grad = np.asarray(jax.grad(lambda x, f=loss_fn: f(x, labels, None, None))(jnp.asarray(s)))
    # d/ds of T^2 * mean_i KL(p_i || q_i) is T * (q - p) / B; of the label term, (mass_i * softmax(s) - y) / mass.
    kl_grad = temperature * (softmax(s / temperature) - softmax(t / temperature)) / len(s)
    mass = labels.sum(-1, keepdims=True)
    ce_grad = (mass * softmax(s) - labels) / labels.sum()
    np.testing.assert_allclose(grad, (1 - w) * kl_grad + w * ce_grad, rtol=1e-4, atol=1e-6)


# --- in the step ----------------------------------------------------------------------------------------------


def _objective(teacher_spec, records=None, **kw):
  t = distill.load_teacher(str(teacher_spec), NUM_CLASSES)
  loss = distill.DistillLoss(t.model, kw.get('temperature', 1.0), kw.get('label_weight', 0.0))
  objective = train.Objective(loss_fn=loss, extra=t.standardized, key=loss.key, train_records=records)
  return t, objective


def test_teacher_sees_the_students_view_and_never_changes(assets, tmp_path):
  # The student starts as the teacher itself: the KL is zero only when both run on the very same (cropped,
  # flipped, MixUp-mixed) images of the step; any other view of the teacher's gives a positive loss.
  records = distill.combine(
    data_sources.load_split(str(assets['folder']), 'train', None),
    distill.unlabeled_folder(assets['unlabeled']),
  )
  teacher, objective = _objective(assets['teacher'], records)
  loaded = []
  objective = dataclasses.replace(objective, check_model=lambda model, params: loaded.append(model))
  c = distill.train_config(
    make_config(assets['teacher'], assets['folder'], assets['unlabeled']), (2, 4, 6, 8, 10)
  )
  setup = train_setup.setup(c, tmp_path / 'w', objective)  # the step `fit` runs (compiled once, cached)
  setup.manager.close()
  assert [m.architecture for m in loaded] == ['R26x1']  # the objective's hook saw the student
  dp = setup.dp
  batch = next(train_setup.train_iterator(setup))
  assert not np.allclose(batch['image'], np.roll(batch['image'], 1, axis=0))
  assert 0 < np.count_nonzero(batch['label'].sum(-1) < 0.999)  # MixUp with unlabeled rows is in it
  dteacher = dp.replicate(teacher.standardized)
  state = setup.state.replace(params=teacher.params)
  _, metrics = setup.p_train(dp.replicate(state), dp.shard(batch), dteacher)
  assert float(dp.unreplicate(metrics)['loss']) == pytest.approx(0.0, abs=1e-5)
  # Control: the teacher on another view of the same examples (flipped) is not matched.
  flipped = dict(batch, image=batch['image'][:, :, ::-1])
  loss_fn = objective.loss_fn
  student = loss_fn.teacher_logits(teacher.standardized, jnp.asarray(batch['image']))
  assert float(loss_fn(student, batch['label'], jnp.asarray(flipped['image']), teacher.standardized)) > 1e-3
  # The step donates the state, never the teacher (on a GPU a donated input is gone after the call) ...
  dstate = dp.replicate(setup.state)
  args, _ = setup.p_train.lower(dstate, dp.shard(batch), dteacher).args_info  # (positional, keyword)
  assert all(a.donated for a in jax.tree.leaves(args[0]))
  assert not any(a.donated for a in jax.tree.leaves(args[2]))
  # ... and several steps later the replicated teacher input is bit for bit the same.
  for _ in range(3):
    dstate, _ = setup.p_train(dstate, dp.shard(batch), dteacher)
  for a, b in zip(
    jax.tree.leaves(dp.unreplicate(dteacher)), jax.tree.leaves(teacher.standardized), strict=True
  ):
    assert np.array_equal(a, b)
  assert not np.array_equal(dp.unreplicate(dstate.params)['head']['kernel'], 0)  # the student did train


def test_a_run_trains_the_student_and_reports_the_teacher(straight, assets):
  workdir, metrics = straight
  assert sha(assets['teacher']) == assets['teacher_sha256']  # the teacher file is untouched
  assert metrics['step'] == 10 and 0 <= metrics['top1'] <= 1 and 0 <= metrics['teacher_top1'] <= 1
  teacher = json.loads((workdir / 'teacher.json').read_text())
  assert teacher['top1'] == metrics['teacher_top1'] and teacher['num_examples'] == 2 * NUM_CLASSES
  model, params = checkpoints.load(str(workdir / 'model.npz'), keep_head=True)
  assert model.architecture == 'R26x1' and model.num_classes == NUM_CLASSES
  losses = [m['loss'] for m in read_metrics(workdir) if 'loss' in m]
  assert len(losses) == 10 and all(np.isfinite(losses))
  assert (workdir / 'curves.png').is_file() and (workdir / 'labels.txt').is_file()
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model'] == 'R26x1' and saved['teacher'] == str(assets['teacher'])


# --- resume after kill -9 ------------------------------------------------------------------------------------


def _command(workdir, assets):
  return [
    sys.executable,
    '-c',
    'from bit.tools.cli import distill_main; distill_main()',
    '--config',
    str(HERE.parent / 'configs' / 'distill.py'),
    '--workdir',
    str(workdir),
    f'--config.teacher={assets["teacher"]}',
    f'--config.dataset={assets["folder"]}',
    f'--config.unlabeled={assets["unlabeled"]}',
    *FLAGS,
  ]


def test_resume_after_sigkill_gives_the_same_student(straight, assets, tmp_path):
  workdir = tmp_path / 'w'
  cmd = _command(workdir, assets)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'))
  kill_after_checkpoint(cmd, workdir, env, cwd=HERE.parent)

  done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  marker = [m for m in read_metrics(workdir) if 'resumed_from_step' in m]
  assert len(marker) == 1 and marker[0]['resumed_from_step'] >= 2
  printed = json.loads(done.stdout.strip().splitlines()[-1])
  assert printed['step'] == 10 and 'teacher_top1' in printed
  resumed, expected = np.load(workdir / 'model.npz'), np.load(straight[0] / 'model.npz')
  assert resumed.files == expected.files
  for name in expected.files:
    np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


# --- bad input ----------------------------------------------------------------------------------------------


def test_a_teacher_with_other_classes_is_refused(assets):
  other = make_npz(assets['root'] / 'five.npz', classes=5)
  with pytest.raises(ConfigError, match=r'five\.npz.* 5-class head but the dataset has 10 classes'):
    distill.distill(make_config(other, assets['folder']), assets['root'] / 'never')
  assert not (assets['root'] / 'never').exists()


def test_an_unlabeled_folder_without_images_is_refused_and_bad_files_are_skipped(tmp_path, caplog):
  empty = tmp_path / 'empty'
  (empty / 'sub').mkdir(parents=True)
  (empty / 'sub' / 'notes.txt').write_text('no images here')
  with pytest.raises(DataError, match=r"config\.unlabeled='.*empty' holds no image files"):
    distill.unlabeled_records(str(empty))
  (empty / 'sub' / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(DataError, match=r'none of its 1 image files is readable'):
    distill.unlabeled_records(str(empty))
  make_folder(empty / 'a' / 'b', classes=1, train_per_class=2, test_per_class=0)
  with caplog.at_level(logging.WARNING):
    records = distill.unlabeled_records(str(empty))
  assert len(records) == 2 and set(records.labels) == {distill.UNLABELED}
  assert 'broken.png' in caplog.text and '1 unreadable file(s) skipped' in caplog.text


def test_no_teacher_is_a_config_error_naming_the_key(capsys, monkeypatch, assets):
  argv = ['bit-distill', '--config', str(HERE.parent / 'configs' / 'distill.py'), '--workdir', '/tmp/x']
  code, _, err = run_cli(
    cli.distill_main, argv + [f'--config.dataset={assets["folder"]}'], capsys, monkeypatch
  )
  assert code == 2
  assert err.startswith('bit-distill: error: config.teacher is not set: pass --config.teacher=WORKDIR')
  assert len(err.strip().splitlines()) == 1


def test_a_student_wider_than_its_teacher_is_warned(assets, monkeypatch, caplog):
  # bit.distill hands train.fit an objective whose hook (run once the student is loaded, see the view test
  # above) warns; the student is not built here, only its shape is needed.
  seen = []

  def fit(config, workdir, objective):
    seen.append((config, objective))
    raise KeyboardInterrupt('stop before training')

  monkeypatch.setattr(train, 'fit', fit)
  with pytest.raises(KeyboardInterrupt):
    distill.distill(
      make_config(assets['teacher'], assets['folder'], student='R26x2'), assets['root'] / 'unused'
    )
  ((cfg, objective),) = seen
  assert cfg.model == 'R26x2'
  with caplog.at_level(logging.WARNING):
    assert objective.check_model(models.create_model('R26x2', NUM_CLASSES), None)
  assert 'The student R26x2 is wider than the teacher R26x1' in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert not objective.check_model(models.create_model('R26x1', NUM_CLASSES), None)
    assert objective.check_model(models.create_model('R50x1', NUM_CLASSES), None)
  assert 'The student R50x1 is deeper than the teacher R26x1' in caplog.text
