"""Evaluation over a whole split: every example counted once, metrics and confusion matrix right."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fast_params, run_cli
from PIL import Image

from bit import checkpoints, data, evaluation, models
from bit.errors import DataError
from bit.tools import cli

CLASSES = ('cat', 'dog', 'emu')
COLORS = {'cat': (220, 40, 40), 'dog': (40, 220, 40), 'emu': (40, 40, 220)}


def make_folder(root, counts={'train': 4, 'test': (5, 3, 3)}):  # noqa: B006
  """ROOT/<split>/<class>/<i>.png: 36x36 images tinted by class, with noise."""
  rng = np.random.default_rng(0)
  for split, n in counts.items():
    per_class = n if isinstance(n, tuple) else (n,) * len(CLASSES)
    for name, k in zip(CLASSES, per_class, strict=True):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(k):
        pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f'{i}.png')
  return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('ds'))


@pytest.fixture(scope='module')
def tiny():
  model = models.create_model('R26x1', num_classes=len(CLASSES))
  # A random head, so that predictions differ between images and the confusion matrix is not one column.
  params = fast_params(model, head_std=0.1)
  return model, params


def test_evaluate_batches_with_a_known_classifier():
  # The "model" predicts class = the argmax of the mean channel values: exact expected counts.
  def apply_fn(params, images):
    return jnp.mean(images, axis=(1, 2)) * params

  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 10).astype(np.int32)
  preds = labels.copy()
  preds[[1, 4, 7]] = (labels[[1, 4, 7]] + 1) % 3  # three mistakes
  images = np.full((10, 8, 8, 3), -1.0, np.float32)
  images[np.arange(10), :, :, preds] = 1.0
  batches = [  # a padded last batch, and a short batch without padding: both must count exactly
    {'image': images[:4], 'label': labels[:4], 'mask': np.ones(4, bool)},
    {
      'image': np.concatenate([images[4:7], np.zeros((1, 8, 8, 3), np.float32)]),
      'label': np.concatenate([labels[4:7], [2]]),
      'mask': np.array([True, True, True, False]),
    },
    {'image': images[7:], 'label': labels[7:]},
  ]
  r = evaluation.evaluate_batches(apply_fn, jnp.float32(1.0), batches, 3, devices=jax.devices()[:1])
  assert r['count'] == 10
  assert r['top1'] == pytest.approx(0.7)
  assert r['top5'] == 1.0  # three classes: the top-5 holds them all
  expected = np.zeros((3, 3), int)
  np.add.at(expected, (labels, preds), 1)
  np.testing.assert_array_equal(r['confusion'], expected)
  np.testing.assert_allclose(r['per_class_accuracy'], np.diag(expected) / expected.sum(1))


def test_the_result_keys_are_a_results_and_the_empty_result_has_its_shapes():
  """evaluation.RESULT_KEYS (what early stopping checkpoints) names every key of a result, and the empty result
  (what a checkpointed one is restored into) has the shapes and dtypes of a real one."""
  confusion = np.array([[2, 1, 0], [0, 3, 0], [1, 0, 0]])
  r = evaluation.metrics_from_counts(confusion, hits5=6, loss_sum=3.0)
  assert set(r) == set(evaluation.RESULT_KEYS)
  empty = evaluation.empty_result(3)
  assert set(empty) == set(r)
  for k in evaluation.RESULT_KEYS:
    assert np.asarray(empty[k]).shape == np.asarray(r[k]).shape, k
    assert np.asarray(empty[k]).dtype == np.asarray(r[k]).dtype, k
  assert set(evaluation.summary({**r, 'split': 'test'})) == {*evaluation.SCALAR_KEYS, 'split'}
  assert evaluation.eval_line(r) == {
    'top1': pytest.approx(5 / 7),
    'top5': pytest.approx(6 / 7),
    'eval_loss': pytest.approx(3 / 7),
    'mean_per_class_accuracy': pytest.approx((2 / 3 + 1 + 0) / 3),
    'num_examples': 7,
  }


def test_evaluate_batches_rejects_labels_outside_the_head():
  batch = {'image': np.zeros((2, 8, 8, 3), np.float32), 'label': np.array([0, 5])}
  with pytest.raises(DataError, match='outside'):
    evaluation.evaluate_batches(lambda p, x: jnp.zeros((len(x), 3)), None, [batch], 3)


def test_evaluate_counts_every_example(folder, tiny):
  model, params = tiny
  # 11 test images in batches of 4 (over the 4 test devices): the last batch holds 3 real rows and 1 pad.
  r = evaluation.evaluate(model, params, str(folder), split='test', batch_size=4, crop=32)
  assert r['count'] == 11
  np.testing.assert_array_equal(r['class_counts'], [5, 3, 3])
  assert r['class_names'] == list(CLASSES)
  # The same numbers from one unpadded batch of the whole split, computed directly.
  (batch,) = data.eval_iterator(str(folder), split='test', global_batch_size=11, crop=32)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, batch['image']))
  pred = logits.argmax(-1)
  expected = np.zeros((3, 3), int)
  np.add.at(expected, (batch['label'], pred), 1)
  np.testing.assert_array_equal(r['confusion'], expected)
  assert r['top1'] == pytest.approx(np.mean(pred == batch['label']))
  assert len(np.unique(pred)) > 1, 'the random head should not predict one class for everything'
  logp = np.asarray(jax.nn.log_softmax(logits))
  assert r['loss'] == pytest.approx(float(-np.mean(logp[np.arange(11), batch['label']])), rel=1e-4)


def test_evaluate_rejects_a_model_with_too_few_outputs(folder):
  model = models.create_model('R26x1', num_classes=2)
  with pytest.raises(DataError, match='3 classes'):
    evaluation.evaluate(model, models.param_shapes(model), str(folder), split='test', crop=32)


def test_write_report(tmp_path):
  confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
  result = evaluation.metrics_from_counts(confusion, hits5=6, loss_sum=3.0)
  result.update(split='test', crop=32)
  paths = evaluation.write_report(result, tmp_path, ['a', 'b, with comma', 'c'], 'test')
  assert {p.name for p in paths.values()} == {'confusion_test.csv', 'confusion_test.png', 'eval_test.json'}
  rows = list(csv.reader(paths['csv'].open()))
  assert rows[0][:4] == ['index', 'class', 'examples', 'accuracy'] and rows[0][5] == 'pred:b, with comma'
  assert rows[1] == ['0', 'a', '4', '0.750000', '3', '1', '0']
  assert rows[3][3] == ''  # no examples: no accuracy
  assert paths['png'].read_bytes()[:4] == b'\x89PNG'
  summary = json.loads(paths['json'].read_text())
  assert summary['top1'] == pytest.approx(5 / 6) and summary['per_class_accuracy']['c'] is None
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, folder, tiny):
  """A finished-run workdir as bit-train leaves it: config.json, model.npz, labels.txt."""
  _, params = tiny
  w = tmp_path_factory.mktemp('work')
  checkpoints.save_npz(params, w / 'model.npz')
  (w / 'labels.txt').write_text(''.join(f'{c}\n' for c in CLASSES))
  (w / 'config.json').write_text(
    json.dumps({'dataset': str(folder), 'crop': 32, 'test_split': 'test', 'data_dir': None, 'model': 'R26x1'})
  )
  return w


def test_bit_eval_command(workdir, tiny, folder, capsys, monkeypatch):
  code, out, err = run_cli(
    cli.eval_main, ['bit-eval', '--workdir', workdir, '--batch_size=4'], capsys, monkeypatch
  )
  assert code == 0, err
  model, params = tiny
  expected = evaluation.evaluate(model, params, str(folder), split='test', batch_size=4, crop=32)
  assert f'top-1 {100 * expected["top1"]:.2f}%' in out and '11 examples' in out
  for c in CLASSES:
    assert c in out
  assert (workdir / 'confusion_test.png').is_file() and (workdir / 'confusion_test.csv').is_file()
  rows = list(csv.reader((workdir / 'confusion_test.csv').open()))
  np.testing.assert_array_equal(np.array([r[4:] for r in rows[1:]], int), expected['confusion'])
  code, out, err = run_cli(
    cli.eval_main,
    ['bit-eval', '--workdir', workdir, '--batch_size=4', '--split=train', '--json'],
    capsys,
    monkeypatch,
  )
  assert code == 0, err
  assert json.loads(out)['count'] == 12 and (workdir / 'confusion_train.png').is_file()


def test_bit_eval_errors_are_one_line(tmp_path, capsys, monkeypatch):
  (tmp_path / 'config.json').write_text('{"dataset": "x", "crop": 32}')
  code, out, err = run_cli(cli.eval_main, ['bit-eval', '--workdir', tmp_path], capsys, monkeypatch)
  assert code != 0 and 'Traceback' not in err
  assert err.strip().count('\n') == 0 and 'model.npz is missing' in err
  code, out, err = run_cli(cli.eval_main, ['bit-eval'], capsys, monkeypatch)
  assert code != 0 and '--workdir is required' in err
