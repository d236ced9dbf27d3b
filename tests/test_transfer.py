"""Transfer modes, early stopping, scratch runs and the end-of-training pictures, through the real
`train.fit` (= `train_and_evaluate`).

Tiny R26x1 from a random official-layout npz, 32 px colour images (see test_train.py), one device, five
steps. The runs are module-scoped and shared between tests; the early-stopping run and the scratch run use
the same optimizer, schedule and model shape, so they share one compiled step.
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import optax
import pytest
from PIL import Image

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from helpers import NUM_CLASSES, PALETTE, base_config, flat, make_folder, make_npz  # noqa: E402

from bit import checkpoints, train, train_state  # noqa: E402
from bit.errors import ConfigError  # noqa: E402
from bit.metrics_log import read_metrics  # noqa: E402

# Warmup 0: the very first step already moves the params (with warmup, step 1 has learning rate 0).
SCHEDULE = (0, 2, 3, 4, 5)
HEAD_KEYS = ('resnet/head/conv2d/kernel', 'resnet/head/conv2d/bias')


def make_swapped_folder(root, seed=0):
  """Train images of class c have colour c; test images of class c have colour c+1.

  Whatever the model learns on train makes it worse on test, so eval top-1 never improves on the first eval.
  """
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  for split, n, shift in (('train', 4, 0), ('test', 2, 1)):
    for c in range(NUM_CLASSES):
      d = root / split / f'class_{c}'
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        colour = PALETTE[(c + shift) % NUM_CLASSES]
        img = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f'{i}.png')
  return root


def config(assets, dataset='folder', model=None, **overrides):
  settings = dict(num_devices=1, schedule=SCHEDULE, mixup_alpha=0.0, eval_every=0, checkpoint_every=5)
  settings.update(overrides)
  return base_config(model or assets['npz'], assets[dataset], **settings)


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp('transfer_assets')
  return {
    'folder': make_folder(root / 'folder'),
    'swapped': make_swapped_folder(root / 'swapped'),
    'npz': make_npz(root / 'r26x1.npz'),
  }


SETUPS = {
  'head': dict(transfer='head'),
  'partial': dict(transfer='partial', unfreeze_stages=1, backbone_lr_scale=0.5),
  'early': dict(
    dataset='swapped', eval_every=1, early_stopping_patience=1, checkpoint_every=1, keep_checkpoints=0
  ),
  'scratch': dict(model='R26x1'),
}


@pytest.fixture(scope='module')
def runs(assets, tmp_path_factory):
  """name -> (workdir, FitResult), each run once on first use."""
  done = {}

  def get(name):
    if name not in done:
      workdir = tmp_path_factory.mktemp(name)
      done[name] = workdir, train.fit(config(assets, **SETUPS[name]), workdir)
    return done[name]

  return get


def npz(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def changed_keys(before, after):
  assert before.keys() == after.keys()
  return {k for k in before if not np.array_equal(before[k], after[k])}


def restore_checkpoint(workdir, step):
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / 'checkpoints' / str(step) / 'default')


def assert_checkpoint_keeps_frozen_params(workdir, assets, mode, **kwargs):
  """Every frozen array of the last checkpoint is bit-identical to the npz it came from, and the optimizer
  state holds momentum for the trainable params alone."""
  import jax

  from bit import freeze

  _, given = checkpoints.load(str(assets['npz']), num_classes=NUM_CLASSES)
  ckpt = restore_checkpoint(workdir, SCHEDULE[-1])
  mask, given, saved = flat(freeze.trainable_mask(given, mode, **kwargs)), flat(given), flat(ckpt['params'])
  frozen = [k for k, on in mask.items() if not on]
  assert frozen and saved.keys() == given.keys()
  for k in frozen:
    assert np.array_equal(saved[k], given[k]), k
  state_sizes = [np.size(x) for x in jax.tree.leaves(ckpt['opt_state']) if np.ndim(x)]
  assert sum(state_sizes) == sum(saved[k].size for k, on in mask.items() if on)


def test_head_mode_leaves_the_backbone_bit_for_bit(runs, assets):
  workdir, result = runs('head')
  given, saved = npz(assets['npz']), npz(workdir / 'model.npz')
  backbone = [k for k in given if k not in HEAD_KEYS]
  for k in backbone:
    assert np.array_equal(given[k], saved[k]), k
  head = saved['resnet/head/conv2d/kernel']
  assert head.shape == (1, 1, 2048, NUM_CLASSES) and np.abs(head).max() > 0  # the new zero head trained
  assert result.metrics['step'] == SCHEDULE[-1]
  # The trainable-parameter count logged at the start: the head alone.
  start = next(m for m in read_metrics(workdir) if 'trainable_params' in m)
  assert start['transfer'] == 'head' and start['trainable_params'] == 2048 * NUM_CLASSES + NUM_CLASSES
  assert start['total_params'] == sum(v.size for v in saved.values())
  assert_checkpoint_keeps_frozen_params(workdir, assets, 'head')


def test_partial_mode_trains_block4_norm_and_head_only(runs, assets):
  workdir, _ = runs('partial')
  given, saved = npz(assets['npz']), npz(workdir / 'model.npz')
  given.update({k: np.zeros_like(saved[k]) for k in HEAD_KEYS})  # the new head starts at zero
  top = {k for k in given if k.startswith(('resnet/block4/', 'resnet/group_norm/', 'resnet/head/'))}
  assert changed_keys(given, saved) == top
  start = next(m for m in read_metrics(workdir) if 'trainable_params' in m)
  assert start['trainable_params'] == sum(saved[k].size for k in top) < start['total_params']
  assert_checkpoint_keeps_frozen_params(workdir, assets, 'partial', unfreeze_stages=1)


def test_end_of_training_draws_curves_and_the_final_confusion_matrix(runs):
  workdir, result = runs('head')
  assert (workdir / 'curves.png').stat().st_size > 1000
  assert (workdir / 'confusion_test.png').stat().st_size > 1000
  rows = (workdir / 'confusion_test.csv').read_text().splitlines()
  assert rows[0].split(',')[:4] == ['index', 'class', 'examples', 'accuracy'] and len(rows) == NUM_CLASSES + 1
  matrix = np.array([[int(x) for x in r.split(',')[4:]] for r in rows[1:]])
  assert [r.split(',')[1] for r in rows[1:]] == [f'class_{i}' for i in range(NUM_CLASSES)]
  # It is the final eval's matrix: every test example once, its diagonal is the reported top-1.
  assert matrix.sum() == result.metrics['num_examples'] == 2 * NUM_CLASSES
  assert np.trace(matrix) / matrix.sum() == pytest.approx(result.metrics['top1'])
  report = json.loads((workdir / 'eval_test.json').read_text())
  assert report['top1'] == pytest.approx(result.metrics['top1']) and report['count'] == 2 * NUM_CLASSES


def test_early_stopping_stops_and_exports_the_best_eval(runs):
  workdir, result = runs('early')
  lines = read_metrics(workdir)
  evals = [m for m in lines if 'top1' in m]
  stop = [m for m in lines if 'early_stopping' in m]
  # Patience 1: the second eval did not beat the first, so the run ends at step 2 of 5.
  assert [m['step'] for m in evals] == [1, 2] and evals[1]['top1'] <= evals[0]['top1']
  assert stop == [
    {'step': 2, 'early_stopping': 'stopped', 'best_step': 1, 'best_top1': evals[0]['top1'], 'patience': 1}
  ]
  assert max(m['step'] for m in lines if 'loss' in m) == 2
  assert result.metrics['step'] == 2 and result.metrics['best_step'] == 1 and result.metrics['stopped_early']
  assert result.metrics['top1'] == evals[0]['top1']
  # model.npz holds the params of step 1 (the best eval), not those of step 2 (where it stopped).
  _, exported = checkpoints.load(str(workdir / 'model.npz'), keep_head=True)
  at1, at2 = (flat(restore_checkpoint(workdir, s)['params']) for s in (1, 2))
  exported = flat(exported)
  assert not changed_keys(at1, exported)
  assert changed_keys(at2, exported)  # it trained on between the two evals
  assert not changed_keys(flat(result.params), exported)
  # The confusion matrix is the best eval's too.
  rows = (workdir / 'confusion_test.csv').read_text().splitlines()[1:]
  matrix = np.array([[int(x) for x in r.split(',')[4:]] for r in rows])
  assert np.trace(matrix) / matrix.sum() == pytest.approx(evals[0]['top1'])


def test_early_stopping_resumes_exactly_and_a_stopped_run_stays_stopped(runs, assets, tmp_path):
  src, first = runs('early')
  workdir = tmp_path / 'w'
  shutil.copytree(src, workdir)
  # As if killed after the checkpoint of step 1: the resumed run must remember that step 1 was the best,
  # or it would count step 2 as a new best and train on to step 3.
  shutil.rmtree(workdir / 'checkpoints' / '2')
  for name in ('model.npz', 'confusion_test.csv', 'curves.png'):
    (workdir / name).unlink()
  resumed = train.fit(config(assets, **SETUPS['early']), workdir)
  assert resumed.metrics == first.metrics
  assert not changed_keys(npz(src / 'model.npz'), npz(workdir / 'model.npz'))
  assert (workdir / 'confusion_test.csv').read_text() == (src / 'confusion_test.csv').read_text()
  assert (workdir / 'curves.png').exists()
  lines = read_metrics(workdir)
  marker = max(i for i, m in enumerate(lines) if 'resumed_from_step' in m)
  assert lines[marker]['resumed_from_step'] == 1
  assert [m['step'] for m in lines[marker + 1 :] if 'loss' in m] == [2]
  # Rerunning the stopped run trains nothing more and returns the same result.
  again = train.fit(config(assets, **SETUPS['early']), workdir)
  lines = read_metrics(workdir)
  marker = max(i for i, m in enumerate(lines) if 'resumed_from_step' in m)
  assert lines[marker]['resumed_from_step'] == 2 and not [m for m in lines[marker + 1 :] if 'loss' in m]
  assert again.metrics['top1'] == first.metrics['top1'] and again.metrics['best_step'] == 1


def test_scratch_model_trains_every_parameter(runs):
  workdir, result = runs('scratch')
  losses = [m['loss'] for m in read_metrics(workdir) if 'loss' in m]
  assert len(losses) == SCHEDULE[-1] and all(np.isfinite(losses))
  start = next(m for m in read_metrics(workdir) if 'trainable_params' in m)
  assert start['trainable_params'] == start['total_params'] and start['transfer'] == 'full'
  model, params = checkpoints.load(str(workdir / 'model.npz'), keep_head=True)
  assert model.num_classes == NUM_CLASSES and result.metrics['num_examples'] == 2 * NUM_CLASSES
  assert not changed_keys(flat(params), flat(result.params))
  # Every array moved away from the random init the run started from (the run's seed is 0).
  _, init = checkpoints.load('R26x1', num_classes=NUM_CLASSES, seed=0)
  init, trained = flat(init), flat(params)
  assert changed_keys(init, trained) == set(init), sorted(set(init) - changed_keys(init, trained))


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(transfer='linear'), 'config.transfer'),
    (dict(unfreeze_stages=1), 'only apply to config.transfer=partial'),
    (dict(transfer='partial', unfreeze_stages=1, unfreeze_units=2), 'not both'),
    (dict(backbone_lr_scale=0.0), 'backbone_lr_scale'),
    (dict(early_stopping_patience=2), 'eval_every'),
    (dict(early_stopping_patience=-1, eval_every=1), 'early_stopping_patience'),
  ],
)
def test_bad_transfer_settings_are_refused_before_any_work(assets, tmp_path, overrides, match):
  with pytest.raises(ConfigError, match=match):
    train.fit(config(assets, **overrides), tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def test_make_optimizer_masks_and_scales_the_one_sgd():
  params = {
    'block4': {'unit01': {'conv1': {'kernel': np.ones(3, np.float32)}}},
    'norm_pre_head': {'scale': np.ones(2, np.float32)},
    'head': {'kernel': np.ones(2, np.float32)},
  }
  grads = {
    'block4': {'unit01': {'conv1': {'kernel': np.full(3, 2.0, np.float32)}}},
    'norm_pre_head': {'scale': np.full(2, 2.0, np.float32)},
    'head': {'kernel': np.full(2, 2.0, np.float32)},
  }
  lr = train_state.lr_schedule([0, 1, 2, 3, 4], 0.1)

  def first_update(**kwargs):
    tx = train_state.make_optimizer(lr, params=params, **kwargs)
    updates, _ = tx.update(grads, tx.init(params), params)
    return flat(updates)

  full = first_update()
  assert full['head/kernel'] == pytest.approx(-0.2) and full['block4/unit01/conv1/kernel'] == pytest.approx(
    -0.2
  )
  head = first_update(transfer='head')
  assert np.all(head['block4/unit01/conv1/kernel'] == 0) and np.all(head['norm_pre_head/scale'] == 0)
  assert head['head/kernel'] == pytest.approx(full['head/kernel'])
  scaled = first_update(transfer='partial', unfreeze_stages=1, backbone_lr_scale=0.1)
  assert scaled['block4/unit01/conv1/kernel'] == pytest.approx(-0.02)
  assert scaled['norm_pre_head/scale'] == pytest.approx(-0.02) and scaled['head/kernel'] == pytest.approx(
    -0.2
  )
  # The default is the plain official optimizer (no mask, no extra state).
  tx = train_state.make_optimizer(lr)
  assert jax_tree_equal(
    tx.init(params), optax.chain(optax.trace(0.9), optax.scale_by_learning_rate(lr)).init(params)
  )


def jax_tree_equal(a, b):
  import jax

  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.array_equal(x, y) for x, y in zip(la, lb, strict=True)
  )
