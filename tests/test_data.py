"""The input pipeline on generated image folders and on tfds.testing.mock_data."""

import io
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from bit import data, data_sources
from bit.errors import ConfigError, DataError

# Created in this order on purpose: the labels must follow the sorted names, not the creation order.
CLASSES = {'zebra': 2, 'apple': 0, 'mango': 1}
COLORS = {0: (220, 30, 30), 1: (30, 220, 30), 2: (30, 30, 220)}  # label -> dominant RGB
TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 5


def _photo(rng, label, h, w):
  base = np.array(COLORS[label], np.int16)
  noise = rng.integers(-20, 20, (h, w, 3))
  return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """ROOT/{train,test}/<class>/: colored JPEGs of varying size; train also holds the awkward files."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for name, label in CLASSES.items():
    for split, count in (('train', TRAIN_PER_CLASS), ('test', TEST_PER_CLASS)):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        _photo(rng, label, 40 + 4 * i, 48).save(root / split / name / f'{i}.jpg')
  apple = root / 'train' / 'apple'
  Image.fromarray(np.full((40, 40), 77, np.uint8), 'L').save(apple / 'gray.png')
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 200, 255
  Image.fromarray(rgba, 'RGBA').save(apple / 'rgba.png')
  _photo(rng, 0, 36, 36).save(apple / 'x.bmp')
  _photo(rng, 0, 36, 36).save(apple / 'x.gif')
  (apple / 'corrupt.jpg').write_bytes(b'this is not an image')
  (apple / 'notes.txt').write_text('ignored: not an image extension')
  return root


TRAIN_READABLE = 3 * TRAIN_PER_CLASS + 4  # the corrupt file is skipped


@pytest.fixture(scope='module')
def asym(tmp_path_factory):
  """One class of images dark on the left, bright on the right: a flip is visible."""
  root = tmp_path_factory.mktemp('asym')
  (root / 'train' / 'only').mkdir(parents=True)
  for i in range(8):
    im = np.zeros((32, 32, 3), np.uint8)
    im[:, 16:] = 250
    im[:, :16] = 5 + i
    Image.fromarray(im).save(root / 'train' / 'only' / f'{i}.png')
  return root


def _train(ds, **kw):
  args = dict(split='train', global_batch_size=8, resize=40, crop=32, num_classes=3)
  args.update(kw)
  return data.train_iterator(ds, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_get_info_folder(folder, caplog):
  with caplog.at_level(logging.WARNING):
    info = data.get_info(str(folder))
  assert info.class_names == ('apple', 'mango', 'zebra') and info.num_classes == 3
  assert info.train_size == TRAIN_READABLE and info.test_size == 3 * TEST_PER_CLASS
  assert not info.holdout
  assert 40 <= info.image_size[0] <= 60 and info.image_size[1] in (40, 48)
  # The corrupt file is reported by its path, and the run goes on.
  assert str(folder / 'train' / 'apple' / 'corrupt.jpg') in caplog.text


def test_train_batches_shape_range_labels(folder):
  batches = _take(_train(str(folder)), 4)
  for b in batches:
    assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['label'].shape == (8, 3) and b['label'].dtype == np.float32
    assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0
    np.testing.assert_array_equal(b['label'].sum(1), 1.0)
  # 32 examples cover all 22 train images at least once: every class shows up.
  labels = np.concatenate([b['label'].argmax(1) for b in batches])
  assert set(labels) == {0, 1, 2}


def test_eval_covers_split_labels_follow_sorted_folders(folder):
  batches = list(data.eval_iterator(str(folder), split='test', global_batch_size=4, crop=32))
  assert len(batches) == 4  # 15 examples -> 4 batches, the last padded
  for b in batches:
    assert b['image'].shape == (4, 32, 32, 3) and b['label'].dtype == np.int32 and b['mask'].dtype == bool
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 3 * TEST_PER_CLASS and not mask[-1]
  labels = np.concatenate([b['label'] for b in batches])[mask]
  assert np.bincount(labels).tolist() == [TEST_PER_CLASS] * 3
  # The image content says which folder it came from: its dominant color.
  images = np.concatenate([b['image'] for b in batches])[mask]
  np.testing.assert_array_equal(images.mean(axis=(1, 2)).argmax(1), labels)
  padded = np.concatenate([b['image'] for b in batches])[~mask]
  assert np.all(padded == 0)


def test_eval_decodes_gray_rgba_bmp_gif_as_rgb(folder):
  batches = list(data.eval_iterator(str(folder), split='train', global_batch_size=8, crop=32))
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == TRAIN_READABLE
  images = np.concatenate([b['image'] for b in batches])[mask]
  gray = 77 / 127.5 - 1
  assert np.any(np.all(np.abs(images - gray) < 1e-5, axis=(1, 2, 3)))  # the grayscale PNG, on 3 channels
  red = np.array([200, 0, 0]) / 127.5 - 1
  assert np.any(np.all(np.abs(images - red) < 1e-5, axis=(1, 2, 3)))  # the RGBA PNG, alpha dropped


@pytest.mark.parametrize('global_batch', [4, 8])
def test_eval_two_processes_cover_every_example_once(folder, global_batch):
  single = list(data.eval_iterator(str(folder), split='test', global_batch_size=global_batch, crop=32))
  parts = [
    list(
      data.eval_iterator(
        str(folder), split='test', global_batch_size=global_batch, crop=32, process_index=i, process_count=2
      )
    )
    for i in range(2)
  ]
  assert len(parts[0]) == len(parts[1]) == len(single)  # same number of batches on every process
  union = np.concatenate([b['mask'] for p in parts for b in p])
  assert union.sum() == 3 * TEST_PER_CLASS
  for s, b0, b1 in zip(single, *parts, strict=True):
    assert b0['image'].shape == (global_batch // 2, 32, 32, 3)
    np.testing.assert_array_equal(np.concatenate([b0['label'], b1['label']]), s['label'])
    np.testing.assert_array_equal(np.concatenate([b0['mask'], b1['mask']]), s['mask'])


@pytest.fixture(scope='module')
def framed(tmp_path_factory):
  """40x40 images: a 4-pixel red frame around a green centre, so a centre crop is visible."""
  root = tmp_path_factory.mktemp('framed')
  (root / 'test' / 'only').mkdir(parents=True)
  im = np.zeros((40, 40, 3), np.uint8)
  im[..., 0] = 250
  im[4:36, 4:36] = (0, 250, 0)
  for i in range(2):
    Image.fromarray(im).save(root / 'test' / 'only' / f'{i}.png')
  return root


def test_eval_center_crop_option(framed):
  def batch(**kw):
    it = data.eval_iterator(str(framed), split='test', global_batch_size=2, crop=32, **kw)
    return next(it)['image']

  centre = batch(resize=40, center_crop=True)
  assert centre.shape == (2, 32, 32, 3)
  # Resized to 40 (its own size) and cut to the central 32: exactly the green centre, no red frame.
  green = 250 / 127.5 - 1
  np.testing.assert_allclose(centre[..., 1], green, atol=1e-5)
  np.testing.assert_allclose(centre[..., 0], -1, atol=1e-5)
  # The official transform resizes the whole image to 32: the frame is still there at the edges.
  whole = batch()
  assert whole[:, 0, :, 0].min() > 0.5 and whole[:, 16, 16, 1].min() > 0.9


def test_resume_gives_the_same_batches(folder):
  full = _take(_train(str(folder), mixup_alpha=0.2), 5)
  resumed = _take(_train(str(folder), mixup_alpha=0.2, start_step=3), 2)
  for a, b in zip(full[3:], resumed, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other_seed = _take(_train(str(folder), mixup_alpha=0.2, seed=1), 1)[0]
  assert not np.array_equal(other_seed['image'], full[0]['image'])


def test_two_processes_read_their_slices_of_the_global_batch(folder):
  whole = _take(_train(str(folder), global_batch_size=8, start_step=2), 2)
  parts = [
    _take(_train(str(folder), global_batch_size=8, start_step=2, process_index=i, process_count=2), 2)
    for i in range(2)
  ]
  for step in range(2):
    assert parts[0][step]['image'].shape == (4, 32, 32, 3)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
        np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key]
      )


@pytest.fixture(scope='module')
def grays(tmp_path_factory):
  """12 flat train images, each its own gray level (10, 30, ..., 230): an image's mean says which file it is."""
  root = tmp_path_factory.mktemp('grays')
  for i in range(12):
    cls = root / 'train' / f'c{i % 2}'
    cls.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), 10 + 20 * i, np.uint8)).save(cls / f'{i}.png')
  for c in ('c0', 'c1'):  # a test split of its own, so that no train file is held out
    (root / 'test' / c).mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / 'test' / c / 'x.png')
  return root


def _which_gray(batch) -> list[int]:
  # Flat images survive resize, crop and flip unchanged, so the mean gives back the file's level.
  levels = (batch['image'].mean((1, 2, 3)) + 1) * 127.5
  return [int(round((v - 10) / 20)) for v in levels]


def test_epoch_is_a_permutation(grays):
  # 12 examples, batches of 4: the first 3 batches are one epoch (every file exactly once), and so are the next 3.
  it = _train(str(grays), global_batch_size=4, resize=32, crop=32, num_classes=2)
  seen = [i for b in _take(it, 6) for i in _which_gray(b)]
  assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:]) == list(range(12))
  assert seen[:12] != list(range(12)) and seen[:12] != seen[12:]  # shuffled, and anew each epoch


def test_flip_is_random(asym):
  batch = _take(_train(str(asym), global_batch_size=32, resize=32, crop=32, num_classes=1), 1)[0]
  left, right = batch['image'][:, :, :16].mean((1, 2, 3)), batch['image'][:, :, 16:].mean((1, 2, 3))
  flipped = int(np.sum(left > right))
  assert np.all(np.abs(left - right) > 1.0)  # every image is either as stored or mirrored
  assert 0 < flipped < 32, flipped


def test_mixup_mixes_images_and_labels_with_the_batch_reversed(folder):
  plain = _take(_train(str(folder), global_batch_size=16), 3)
  mixed = _take(_train(str(folder), global_batch_size=16, mixup_alpha=0.4), 3)
  fractional = 0
  for p, m in zip(plain, mixed, strict=True):
    np.testing.assert_allclose(m['label'].sum(1), 1.0, rtol=1e-6)
    assert m['image'].min() >= -1.0 and m['image'].max() <= 1.0
    y, y_rev = p['label'].argmax(1), p['label'][::-1].argmax(1)
    i = int(np.flatnonzero(y != y_rev)[0])
    lam = m['label'][i, y[i]]  # one lambda for the whole batch
    np.testing.assert_allclose(m['label'], lam * p['label'] + (1 - lam) * p['label'][::-1], atol=1e-6)
    np.testing.assert_allclose(m['image'], lam * p['image'] + (1 - lam) * p['image'][::-1], atol=1e-5)
    fractional += int(0.001 < lam < 0.999)
  assert fractional >= 1


def test_per_example_mixup(folder):
  b = _take(_train(str(folder), global_batch_size=16, mixup_alpha=1.0, per_example_mixup=True), 1)[0]
  np.testing.assert_allclose(b['label'].sum(1), 1.0, rtol=1e-6)
  top = b['label'].max(1)
  assert len(np.unique(np.round(top, 5))) > 2  # lambdas differ between examples


def test_few_shot_counts_and_determinism(folder, grays):
  info = data.get_info(str(folder), examples_per_class=2, seed=3)
  assert info.train_size == 6 and info.test_size == 3 * TEST_PER_CLASS
  labels = np.array([0] * 10 + [1] * 7 + [2] * 30)
  a = data.few_shot_indices(labels, 5, seed=1)
  assert np.bincount(labels[a]).tolist() == [5, 5, 5] and len(set(a)) == 15
  np.testing.assert_array_equal(a, data.few_shot_indices(labels, 5, seed=1))
  assert not np.array_equal(a, data.few_shot_indices(labels, 5, seed=2))
  # Drawn from the whole split, not only its beginning.
  draws = np.concatenate([data.few_shot_indices(labels, 5, seed=s) for s in range(20)])
  assert draws[labels[draws] == 2].max() > 40
  with pytest.raises(DataError, match='class 1 has only 7'):
    data.few_shot_indices(labels, 8)
  # The training stream only ever shows the few-shot examples.
  it = _train(str(grays), examples_per_class=2, seed=3, resize=32, crop=32, num_classes=2)
  seen = [i for b in _take(it, 4) for i in _which_gray(b)]
  assert len(set(seen)) == 4 and all(seen.count(i) == 8 for i in set(seen))  # 2 files per class, 8 times each
  assert {i % 2 for i in set(seen)} == {0, 1}


def test_holdout_when_there_is_no_test_split(tmp_path):
  rng = np.random.default_rng(1)
  for name, label in CLASSES.items():
    (tmp_path / 'train' / name).mkdir(parents=True)
    for i in range(20):
      _photo(rng, label, 32, 32).save(tmp_path / 'train' / name / f'{i}.png')
  info = data.get_info(str(tmp_path))
  assert info.holdout and info.train_size == 54 and info.test_size == 6
  train = data_sources.load_split(str(tmp_path), 'train')
  test = data_sources.load_split(str(tmp_path), 'test')
  assert not set(train.payload) & set(test.payload)
  assert np.bincount(test.labels).tolist() == [2, 2, 2]  # stratified
  data_sources.clear_cache()
  assert set(data_sources.load_split(str(tmp_path), 'test').payload) == set(test.payload)  # fixed seed
  mask = np.concatenate(
    [b['mask'] for b in data.eval_iterator(str(tmp_path), split='test', global_batch_size=4, crop=32)]
  )
  assert mask.sum() == 6


@pytest.mark.parametrize('cache_gb', ['0', '1'])
def test_truncated_image_is_skipped_and_reported(tmp_path, caplog, monkeypatch, cache_gb):
  monkeypatch.setenv('BIT_DECODED_CACHE_GB', cache_gb)  # skipped the same way with the decoded cache
  rng = np.random.default_rng(2)
  (tmp_path / 'test' / 'a').mkdir(parents=True)
  for i in range(5):
    _photo(rng, 0, 40, 40).save(tmp_path / 'test' / 'a' / f'{i}.jpg')
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, 'JPEG')
  (tmp_path / 'test' / 'a' / 'trunc.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  with caplog.at_level(logging.WARNING):
    batches = list(data.eval_iterator(str(tmp_path), split='test', global_batch_size=4, crop=32))
  assert len(batches) == 2 and all(b['image'].shape == (4, 32, 32, 3) for b in batches)
  assert sum(b['mask'].sum() for b in batches) == 5
  assert 'trunc.jpg' in caplog.text
  if cache_gb == '1':  # the one undecodable image has an empty slot in the cache
    assert (_decoded_entries()[0].shapes == 0).all(axis=1).sum() == 1


def test_folder_errors(tmp_path):
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  (tmp_path / 'train' / 'empty').mkdir()
  Image.new('RGB', (32, 32)).save(tmp_path / 'train' / 'a' / '0.png')
  with pytest.raises(DataError, match=r'train/empty.*holds no images'):
    data.get_info(str(tmp_path))
  (tmp_path / 'test').mkdir()
  (tmp_path / 'train' / 'empty').rmdir()
  with pytest.raises(DataError, match=r'test.*no class folders'):
    data.get_info(str(tmp_path))
  with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
    data_sources.load_split(str(tmp_path), 'validation')
  with pytest.raises(DataError, match='does not exist'):
    data.get_info(str(tmp_path / 'missing'))


def test_tfds_mock_cifar10():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=10):
    info = data.get_info('cifar10')
    assert info.num_classes == 10 and info.image_size == (32, 32)
    assert info.train_size == 10 and info.test_size == 10
    b = next(
      data.train_iterator('cifar10', split='train', global_batch_size=4, resize=40, crop=32, num_classes=10)
    )
    assert b['image'].shape == (4, 32, 32, 3) and b['label'].shape == (4, 10)
    assert b['image'].min() >= -1 and b['image'].max() <= 1
    batches = list(data.eval_iterator('cifar10', split='test', global_batch_size=4, crop=32))
    assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 10


def test_tfds_mock_tf_flowers_single_split_holdout(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  # Mock data carries no split list; tf_flowers really has only 'train'.
  monkeypatch.setattr(data_sources, 'tfds_split_names', lambda builder: ['train'])
  with tfds.testing.mock_data(num_examples=40):
    info = data.get_info('tf_flowers')
    assert info.holdout and info.num_classes == 5
    assert info.train_size + info.test_size == 40 and info.test_size >= 1
    assert info.image_size[0] > 0 and info.image_size[1] > 0
    b = next(
      data.train_iterator('tf_flowers', split='train', global_batch_size=4, resize=48, crop=32, num_classes=5)
    )
    assert b['image'].shape == (4, 32, 32, 3)
    with pytest.raises(DataError, match='no split'):
      data.get_info('tf_flowers', test_split='validation')


def test_benchmark_prints_json_last(capsys):
  import json

  from bit.tools import input_speed

  input_speed.main(
    [
      '--steps',
      '2',
      '--warmup',
      '1',
      '--batch-size',
      '4',
      '--num-images',
      '12',
      '--image-size',
      '48x64',
      '--crop',
      '32',
    ]
  )
  last = capsys.readouterr().out.strip().splitlines()[-1]
  result = json.loads(last)
  assert result['images_per_sec'] > 0 and result['crop'] == 32 and result['resize'] == 160


# ---------------------------------------------------------------------------------------------- streaming


def _cifar(**kw):
  args = dict(split='train', global_batch_size=4, resize=32, crop=32, num_classes=10)
  args.update(kw)
  return data.train_iterator('cifar10', **args)


def _row_means(images):
  """Per-row color sums: a fingerprint of an image that a horizontal flip does not change."""
  pixels = np.rint((np.asarray(images) + 1) * 127.5).astype(np.int64)  # back to the exact stored values
  return sorted(im.sum(axis=1).tobytes() for im in pixels)


def test_streaming_tfds_split_train(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv('BIT_MAX_MEMORY_GB', '0')  # every TFDS split is over budget: the streaming path
  with tfds.testing.mock_data(num_examples=20):
    records = data_sources.load_split('cifar10', 'train')
    assert records.streaming and len(records) == 20 and records.labels is None
    info = data.get_info('cifar10')
    assert info.train_size == 20 and info.test_size == 20 and info.image_size == (32, 32)
    full = _take(_cifar(mixup_alpha=0.3, seed=5), 7)
    for b in full:
      assert b['image'].shape == (4, 32, 32, 3) and b['label'].shape == (4, 10)
      assert b['image'].min() >= -1 and b['image'].max() <= 1
      np.testing.assert_allclose(b['label'].sum(1), 1.0, rtol=1e-6)
    # The batch of step s is a function of (seed, s): the same when started at s.
    resumed = _take(_cifar(mixup_alpha=0.3, seed=5, start_step=5), 2)
    for a, b in zip(full[5:], resumed, strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    assert not np.array_equal(_take(_cifar(mixup_alpha=0.3, seed=6), 1)[0]['image'], full[0]['image'])
    # Two processes: each its own slice of the global batch.
    parts = [_take(_cifar(start_step=3, process_index=i, process_count=2), 2) for i in range(2)]
    whole = _take(_cifar(start_step=3), 2)
    for step in range(2):
      assert parts[0][step]['image'].shape == (2, 32, 32, 3)
      np.testing.assert_array_equal(
        np.concatenate([parts[0][step]['image'], parts[1][step]['image']]), whole[step]['image']
      )
    # Each epoch (5 steps of 4) is the split once, as in memory; only the order differs.
    streamed = [np.concatenate([b['image'] for b in _take(_cifar(start_step=e * 5), 5)]) for e in (0, 1)]
    monkeypatch.setenv('BIT_MAX_MEMORY_GB', '8')
    data_sources.clear_cache()
    assert not data_sources.load_split('cifar10', 'train').streaming
    in_memory = np.concatenate([b['image'] for b in _take(_cifar(), 5)])
    assert _row_means(streamed[0]) == _row_means(in_memory) == _row_means(streamed[1])
    assert not np.array_equal(streamed[0], streamed[1])  # a new order every epoch


@pytest.mark.parametrize('process_count', [1, 2])
def test_streaming_tfds_split_eval_covers_every_example_once(monkeypatch, process_count):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=10):
    expected = list(data.eval_iterator('cifar10', split='test', global_batch_size=4, crop=32))
    data_sources.clear_cache()
    monkeypatch.setenv('BIT_MAX_MEMORY_GB', '0')
    parts = [
      list(
        data.eval_iterator(
          'cifar10', split='test', global_batch_size=4, crop=32, process_index=i, process_count=process_count
        )
      )
      for i in range(process_count)
    ]
    assert data_sources.load_split('cifar10', 'test').streaming
  assert all(len(p) == 3 for p in parts)  # ceil(10 / 4) batches on every process, the last one padded
  for step, e in enumerate(expected):
    got = {k: np.concatenate([p[step][k] for p in parts]) for k in ('image', 'label', 'mask')}
    assert got['image'].shape == (4, 32, 32, 3)
    for k in ('image', 'label', 'mask'):  # file order: the same rows as the in-memory path
      np.testing.assert_array_equal(got[k], e[k])
  assert sum(b['mask'].sum() for p in parts for b in p) == 10


def test_streaming_few_shot_reads_labels_and_matches_in_memory(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  kw = dict(examples_per_class=1, seed=2, mixup_alpha=0.2)
  with tfds.testing.mock_data(num_examples=80):
    in_memory = _take(_cifar(**kw), 3)
    data_sources.clear_cache()
    monkeypatch.setenv('BIT_MAX_MEMORY_GB', '0')
    assert data.get_info('cifar10', examples_per_class=1).train_size == 10  # not read: k x classes
    streamed = _take(_cifar(**kw), 3)
    with pytest.raises(DataError, match='fewer than examples_per_class=50'):
      _cifar(examples_per_class=50)
  # The same k per class drawn from the same labels in the same file order: the same batches.
  for a, b in zip(in_memory, streamed, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_streaming_holdout_and_budget_errors(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(data_sources, 'tfds_split_names', lambda builder: ['train'])
  monkeypatch.setenv('BIT_MAX_MEMORY_GB', '0')
  with tfds.testing.mock_data(num_examples=20):
    with pytest.raises(DataError, match='explicit test split'):
      data.get_info('tf_flowers')
  monkeypatch.setenv('BIT_MAX_MEMORY_GB', 'lots')
  with pytest.raises(ConfigError, match="BIT_MAX_MEMORY_GB.*'lots'"):
    data_sources.max_memory_bytes()
  assert data_sources.max_memory_bytes(2) == 2e9  # the argument wins over the environment


# ---------------------------------------------------------------------------------------------- decoded cache


def _decoded_entries():
  return [v[1] for k, v in data_sources._CACHE.items() if k[0] == 'decoded']


def test_decoded_cache_gives_the_same_batches(folder, monkeypatch):
  kw = dict(global_batch_size=8, mixup_alpha=0.3, seed=4)
  monkeypatch.setenv('BIT_DECODED_CACHE_GB', '0')
  plain = _take(_train(str(folder), **kw), 4)
  plain_eval = list(data.eval_iterator(str(folder), split='train', global_batch_size=8, crop=32))
  assert not _decoded_entries()
  data_sources.clear_cache()
  monkeypatch.setenv('BIT_DECODED_CACHE_GB', '1')
  cached = _take(_train(str(folder), **kw), 4)
  cached_eval = list(data.eval_iterator(str(folder), split='train', global_batch_size=8, crop=32))
  (entry,) = _decoded_entries()  # decoded once, shared by training and evaluation
  assert entry is not None and entry.flat.dtype == np.uint8
  for a, b in zip(plain + plain_eval, cached + cached_eval, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_decoded_cache_skips_jpegs_that_would_be_downscaled(tmp_path, monkeypatch):
  rng = np.random.default_rng(5)
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  for i in range(4):
    _photo(rng, 0, 96, 96).save(tmp_path / 'train' / 'a' / f'{i}.jpg')
  kw = dict(global_batch_size=4, resize=40, crop=32, num_classes=1)
  monkeypatch.setenv('BIT_DECODED_CACHE_GB', '0')
  plain = _take(_train(str(tmp_path), **kw), 2)
  data_sources.clear_cache()
  monkeypatch.setenv('BIT_DECODED_CACHE_GB', '1')
  # 96 px JPEGs are decoded at half size for a 40 px resize: the full-size cache would change the pixels.
  cached = _take(_train(str(tmp_path), **kw), 2)
  assert _decoded_entries()[0].jpeg_short_side == 96
  for a, b in zip(plain, cached, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
  # With a resize the JPEGs are decoded at full size for, the cache serves them, and still the same pixels.
  big = dict(kw, resize=96)
  data_sources.clear_cache()
  with_cache = _take(_train(str(tmp_path), **big), 1)[0]
  monkeypatch.setenv('BIT_DECODED_CACHE_GB', '0')
  data_sources.clear_cache()
  np.testing.assert_array_equal(with_cache['image'], _take(_train(str(tmp_path), **big), 1)[0]['image'])


def test_streaming_with_the_real_tfds_reader_and_size_metadata(tmp_path):
  """A tiny dataset prepared on disk: the real TFDS metadata (num_bytes) and file reader, not mock data."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class BitTinyShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      features = {
        'image': tfds.features.Image(shape=(16, 16, 3)),
        'label': tfds.features.ClassLabel(num_classes=3),
      }
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(30, 0), 'test': self._generate_examples(7, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {'image': rng.integers(0, 255, (16, 16, 3), np.uint8), 'label': i % 3}

  BitTinyShapes(data_dir=str(tmp_path)).download_and_prepare()
  num_bytes = tfds.builder('bit_tiny_shapes', data_dir=str(tmp_path)).info.splits['train'].num_bytes
  kw = dict(
    split='train', global_batch_size=6, resize=16, crop=16, num_classes=3, data_dir=str(tmp_path), seed=1
  )
  small, large = num_bytes / 2 / 1e9, num_bytes * 2 / 1e9  # budgets in GB either side of the split's size
  assert data_sources.load_split('bit_tiny_shapes', 'train', str(tmp_path), max_memory_gb=small).streaming
  assert not data_sources.load_split('bit_tiny_shapes', 'train', str(tmp_path), max_memory_gb=large).streaming
  info = data.get_info('bit_tiny_shapes', data_dir=str(tmp_path), max_memory_gb=small)
  assert (info.train_size, info.test_size, info.image_size) == (30, 7, (16, 16))
  streamed = _take(data.train_iterator('bit_tiny_shapes', max_memory_gb=small, **kw), 12)
  resumed = _take(data.train_iterator('bit_tiny_shapes', max_memory_gb=small, start_step=10, **kw), 2)
  for a, b in zip(streamed[10:], resumed, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
  in_memory = np.concatenate(
    [b['image'] for b in _take(data.train_iterator('bit_tiny_shapes', max_memory_gb=large, **kw), 5)]
  )
  for epoch in range(2):
    images = np.concatenate([b['image'] for b in streamed[5 * epoch : 5 * epoch + 5]])
    assert _row_means(images) == _row_means(in_memory)
  parts = [
    list(
      data.eval_iterator(
        'bit_tiny_shapes',
        split='test',
        global_batch_size=4,
        crop=16,
        data_dir=str(tmp_path),
        max_memory_gb=small,
        process_index=i,
        process_count=2,
      )
    )
    for i in range(2)
  ]
  assert [len(p) for p in parts] == [2, 2] and sum(b['mask'].sum() for p in parts for b in p) == 7


def _damaged_folder(root, rng):
  """train/ with 2 classes of 6 images, 2 truncated JPEGs and a non-image .jpg; test/ with 2 clean images."""
  for c in ('a', 'b'):
    (root / 'train' / c).mkdir(parents=True)
    (root / 'test' / c).mkdir(parents=True)
    for i in range(6):
      _photo(rng, 0, 40, 40).save(root / 'train' / c / f'{i}.jpg')
    _photo(rng, 0, 40, 40).save(root / 'test' / c / '0.jpg')
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, 'JPEG')
    (root / 'train' / c / 'trunc.jpg').write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  (root / 'train' / 'a' / 'text.jpg').write_bytes(b'not an image at all')
  return root


@pytest.mark.parametrize('cache_gb', ['0', '1'])
def test_bad_files_never_shift_the_stream(tmp_path, caplog, monkeypatch, cache_gb):
  monkeypatch.setenv('BIT_DECODED_CACHE_GB', cache_gb)
  folder = str(_damaged_folder(tmp_path, np.random.default_rng(3)))
  kw = dict(global_batch_size=4, num_classes=2)
  with caplog.at_level(logging.WARNING):
    it = _train(folder, **kw)
    straight = _take(it, 12)  # 48 examples: 4 epochs of the 14 readable files
  assert sorted(pathlib.Path(f).name for f in it.skipped.files) == ['text.jpg', 'trunc.jpg', 'trunc.jpg']
  assert caplog.text.count('trunc.jpg') == 2  # each bad file named once, not at every epoch
  for start in (1, 5, 9):  # resumed anywhere: the very same batches
    resumed = _take(_train(folder, start_step=start, **kw), 12 - start)
    for a, b in zip(straight[start:], resumed, strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  halves = [_take(_train(folder, process_index=i, process_count=2, **kw), 12) for i in (0, 1)]
  for s in range(12):  # and each process's slice is its part of the same global batch
    np.testing.assert_array_equal(np.concatenate([h[s]['image'] for h in halves]), straight[s]['image'])
  deferred = _train(folder, defer_skip_warnings=True, **kw)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _take(deferred, 12)
    assert 'trunc.jpg' not in caplog.text
  assert 'trunc.jpg' in deferred.skipped.report() and deferred.skipped.report() is None


def _folder(root, layout):
  """layout: {split: {class: n_images}}."""
  rng = np.random.default_rng(4)
  for split, classes in layout.items():
    for c, n in classes.items():
      (root / split / c).mkdir(parents=True)
      for i in range(n):
        _photo(rng, 0, 32, 32).save(root / split / c / f'{i}.png')
  return str(root)


def test_the_evaluation_split_of_a_folder(tmp_path, caplog):
  train = {'a': 10, 'b': 10}
  cases = [
    ({'train': train, 'test': {'a': 1, 'b': 1}, 'validation': {'a': 2, 'b': 2}}, 'test', 2, 20),
    ({'train': train, 'validation': {'a': 2, 'b': 2}, 'val': {'a': 3, 'b': 3}}, 'validation', 4, 20),
    ({'train': train, 'val': {'a': 3, 'b': 3}}, 'val', 6, 20),
    ({'train': train}, 'holdout', 2, 18),  # only without any of them: the seeded 10% holdout of train
  ]
  for i, (layout, chosen, test_size, train_size) in enumerate(cases):
    folder = _folder(tmp_path / str(i), layout)
    info = data.get_info(folder)
    assert (info.test_split, info.test_size, info.train_size) == (chosen, test_size, train_size), layout
    assert data_sources.load_split(folder, 'test').split == chosen  # asking for 'test' reads it
    assert info.holdout == (chosen == 'holdout')
  with pytest.raises(DataError, match=r"no 'holdout' split.*without a test split"):
    data_sources.load_split(str(tmp_path / '1'), 'holdout')  # it has validation/: no holdout


def test_folder_classes_must_match_between_splits(tmp_path, caplog):
  folder = _folder(tmp_path / 'x', {'train': {'a': 2, 'b': 2}, 'validation': {'a': 1, 'c': 1}})
  with pytest.raises(DataError, match=r'class folder\(s\) c of validation/ are not in train/'):
    data.get_info(folder)
  with pytest.raises(DataError, match=r'class folder\(s\) c of .*validation are not in'):
    data_sources.load_split(folder, 'validation')  # also without get_info (bit.evaluate)
  folder = _folder(tmp_path / 'y', {'train': {'a': 2, 'b': 2}, 'test': {'a': 1}, 'extra': {'a': 1}})
  with caplog.at_level(logging.WARNING):
    info = data.get_info(folder)
  assert info.num_classes == 2 and info.class_names == ('a', 'b')
  assert 'class(es) b of train/ have no test/ images' in caplog.text
  assert 'extra/ is not a split' in caplog.text


def test_the_checked_decode_is_native_for_whole_files_and_reports_bad_ones(monkeypatch):
  """Training's decode (`_decode_checked`, fed to the bad-file policy) takes TensorFlow's kernels for a JPEG
  that ends with its EOI marker (Pillow is never called) with Pillow's exact pixels, and reports a truncated
  file, a non-image and an empty one as not ok instead of raising."""
  import io

  import tensorflow as tf

  from bit import images

  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8)).save(buf, 'JPEG', quality=90)
  jpeg = buf.getvalue()
  expected = images.decode(jpeg, 32)
  calls = []
  real = images.decode
  monkeypatch.setattr(images, 'decode', lambda *a, **k: calls.append(a) or real(*a, **k))
  image, ok = data._decode_checked(tf, tf.constant(jpeg), 32)
  assert bool(ok) and not calls
  np.testing.assert_array_equal(image.numpy(), expected)
  for bad in (jpeg[: len(jpeg) // 2], b'not an image at all', b''):
    image, ok = data._decode_checked(tf, tf.constant(bad), 32)
    assert not bool(ok) and image.shape == (0, 0, 3)
  assert len(calls) == 3  # each bad one went to Pillow, which said why


@pytest.mark.parametrize(
  'h, w, resize, crop',
  [
    (375, 500, 512, 224),  # upscaled, the geometry
    (1200, 1600, 512, 224),  # downscaled
    (500, 375, 384, 224),
    (100, 2000, 512, 320),  # a strip
    (7, 9, 160, 96),  # tiny: neighbouring output rows share source rows
    (1, 1, 160, 64),
    (512, 512, 512, 224),  # no scaling
    (333, 777, 1000, 700),  # a crop of exactly WINDOW_SHARE of the side
  ],
)
def test_the_resized_window_is_the_crop_of_the_resized_image(h, w, resize, crop):
  """Training resizes only the window it crops: bit for bit the crop of the whole resized image (TensorFlow's
  bilinear kernel, `stateless_random_crop`'s offset), in a tf.data map as in the pipeline, at many offsets."""
  tf = data_sources.tf_hidden()
  assert crop <= data.WINDOW_SHARE * resize  # these geometries take the window path
  image = tf.constant(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8))

  def both(p):
    seed = tf.stack([tf.constant(5, tf.int64), p])
    whole = tf.image.resize(image, [resize, resize], method='bilinear')
    return data._resized_window(tf, image, resize, crop, seed), tf.image.stateless_random_crop(
      whole, [crop, crop, 3], seed=seed
    )

  pairs = tf.data.Dataset.range(0, 40 * 7919, 7919).map(both).as_numpy_iterator()
  for p, (window, expected) in enumerate(pairs):
    assert window.shape == expected.shape and np.array_equal(window, expected), p


def test_the_plans_read_with_a_folder_give_the_batches_of_the_headers_read_in_the_pipeline(
  tmp_path, monkeypatch
):
  """An image folder's decode plans (its headers read with the split, `Records.headers`) give the very batches
  of the headers read in TensorFlow ops and Pillow, in training on the holdout's train side (a subset of the
  split's records, so a plan must follow its file) and in evaluation of the holdout."""
  rng = np.random.default_rng(0)
  for i in range(40):
    folder = tmp_path / 'train' / f'c{i % 2}'
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    if i % 5 == 4:
      photo.save(folder / f'{i:02d}.png')
    else:
      exif = Image.Exif()
      exif[0x0112] = (1, 6, 3, 8)[i % 4]  # upright, the camera turned, upside down, the other way
      photo.save(folder / f'{i:02d}.jpg', exif=exif.tobytes())

  def batches():
    data_sources.clear_cache()
    train = data.train_iterator(
      str(tmp_path), split='train', global_batch_size=8, resize=48, crop=32, num_classes=2, decoded_cache_gb=0
    )
    holdout = data.eval_iterator(
      str(tmp_path), split='holdout', global_batch_size=4, crop=32, decoded_cache_gb=0
    )
    return [next(train)['image'] for _ in range(5)] + [b['image'] for b in holdout]

  planned = batches()
  monkeypatch.setattr(data, '_plans', lambda tf, records, min_side: None)
  read_in_the_pipeline = batches()
  assert len(planned) == len(read_in_the_pipeline) == 6
  for a, b in zip(planned, read_in_the_pipeline, strict=True):
    np.testing.assert_array_equal(a, b)
