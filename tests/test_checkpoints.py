"""bit.checkpoints: the registry, the strict official-npz <-> params mapping, bit.load and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FileServer, checkpoint_bytes

import bit
from bit import checkpoints as ck
from bit import models
from bit.errors import BitError, CheckpointError
from bit.testing import random_checkpoint

ARCHS = ['R50x1', 'R50x3', 'R101x1', 'R101x3', 'R152x2', 'R152x4']


@pytest.fixture(scope='module')
def weights():
  return random_checkpoint(depth=26, width=1, classes=10, seed=0)


@pytest.fixture(scope='module')
def npz(weights, tmp_path_factory):
  path = tmp_path_factory.mktemp('ckpt') / 'r26x1.npz'
  np.savez(path, **weights)
  return path


def write(path, arrays):
  np.savez(path, **arrays)
  return path


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_has_every_release(monkeypatch):
  monkeypatch.delenv('BIT_MODELS_URL', raising=False)
  base = 'https://storage.googleapis.com/bit_models/'
  for arch in ARCHS:
    for name, classes, labels in (
      (f'BiT-S-{arch}', 1000, 'ilsvrc2012_wordnet_lemmas.txt'),
      (f'BiT-M-{arch}', 21843, 'imagenet21k_wordnet_lemmas.txt'),
      (f'BiT-M-{arch}-ILSVRC2012', 1000, 'ilsvrc2012_wordnet_lemmas.txt'),
    ):
      cfg = ck.REGISTRY[name]
      assert (cfg.url, cfg.architecture, cfg.num_classes) == (f'{base}{name}.npz', arch, classes)
      assert cfg.labels_url == base + labels
  for res in (224, 160):
    cfg = ck.REGISTRY[f'BiT-R50x1-distilled-{res}']
    assert (cfg.url, cfg.architecture, cfg.num_classes, cfg.resolution) == (
      f'{base}distill/R50x1_{res}.npz',
      'R50x1',
      1000,
      res,
    )
  names = bit.list_models()
  assert len(names) == len(set(names)) >= 20
  for name in names:
    cfg = ck.REGISTRY[name]
    assert cfg.name == name and models.parse_architecture(cfg.architecture)
  assert bit.list_models('BiT-S-*') == [f'BiT-S-{a}' for a in ARCHS]


def test_models_url_env_points_the_registry_at_a_mirror(monkeypatch):
  monkeypatch.setenv('BIT_MODELS_URL', 'http://127.0.0.1:9/mirror')
  assert ck.REGISTRY['BiT-M-R50x1'].url == 'http://127.0.0.1:9/mirror/BiT-M-R50x1.npz'
  assert ck.REGISTRY['BiT-S-R50x1'].labels_url == 'http://127.0.0.1:9/mirror/ilsvrc2012_wordnet_lemmas.txt'


def test_unknown_name_suggests_close_matches():
  with pytest.raises(BitError) as e:
    bit.load('BiT-M-R50x2', num_classes=10)
  msg = str(e.value)
  assert "'BiT-M-R50x2'" in msg and "'BiT-M-R50x1'" in msg and 'bit.list_models()' in msg
  with pytest.raises(BitError, match='bit.list_models'):
    ck.label_names('nonsense')
  assert ck.get_pretrained_cfg('bit-m-r50x1') is ck.REGISTRY['BiT-M-R50x1']


# --- the mapping ------------------------------------------------------------------------------------------


def test_round_trip_is_exact(weights, npz, tmp_path):
  depth, width, classes, params = ck.npz_to_params(ck.load_npz(npz), source=str(npz))
  assert (depth, width, classes) == (26, 1, 10)
  out = ck.save_npz(params, tmp_path / 'out.npz')
  back = ck.load_npz(out)
  assert sorted(back) == sorted(weights)
  for k, v in weights.items():
    assert back[k].dtype == np.float32 and np.array_equal(back[k], v), k
  assert [p.name for p in tmp_path.iterdir()] == ['out.npz']  # no temp file left behind


def test_params_tree_is_the_models(weights):
  _, _, _, params = ck.npz_to_params(weights, source='mem')
  want = models.param_shapes(models.create_model('R26x1', 10))
  got_shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
  assert got_shapes == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), want)
  # Spot-check the places where the names or shapes differ between the layouts.
  unit = params['block2']['unit01']
  np.testing.assert_array_equal(unit['gn1']['scale'], weights['resnet/block2/unit01/a/group_norm/gamma'])
  np.testing.assert_array_equal(unit['gn3']['bias'], weights['resnet/block2/unit01/c/group_norm/beta'])
  np.testing.assert_array_equal(
    unit['conv2']['kernel'], weights['resnet/block2/unit01/b/standardized_conv2d/kernel']
  )
  np.testing.assert_array_equal(
    unit['conv_proj']['kernel'], weights['resnet/block2/unit01/a/proj/standardized_conv2d/kernel']
  )
  np.testing.assert_array_equal(params['norm_pre_head']['scale'], weights['resnet/group_norm/gamma'])
  np.testing.assert_array_equal(params['head']['kernel'], weights['resnet/head/conv2d/kernel'][0, 0])


def test_load_matches_golden_logits(tmp_path, data_dir):
  # tests/data/r26x1_s64 was computed by timm's own BiT loader for this random checkpoint.
  path = write(tmp_path / 'golden.npz', random_checkpoint(depth=26, width=1, classes=5, seed=1))
  model, params = bit.load(str(path), keep_head=True)
  assert (model.depth, model.width, model.num_classes) == (26, 1, 5)
  images = np.load(data_dir / 'r26x1_s64' / 'images.npy')
  logits = jax.jit(model.apply)({'params': params}, images)
  np.testing.assert_allclose(logits, np.load(data_dir / 'r26x1_s64' / 'logits.npy'), atol=1e-4, rtol=0)


# --- bit.load ---------------------------------------------------------------------------------------------


def test_load_local_file_with_a_new_zero_head(weights, npz):
  model, params = bit.load(npz, num_classes=3, dtype=jnp.bfloat16)
  assert (model.architecture, model.num_classes, model.dtype) == ('R26x1', 3, jnp.bfloat16)
  assert params['head']['kernel'].shape == (2048, 3) and not np.any(params['head']['kernel'])
  assert params['head']['bias'].shape == (3,) and not np.any(params['head']['bias'])
  assert params['root_block']['conv_root']['kernel'].dtype == jnp.float32  # params stay float32
  np.testing.assert_array_equal(
    params['root_block']['conv_root']['kernel'], weights['resnet/root_block/standardized_conv2d/kernel']
  )


def test_load_head_choice_is_explicit(npz):
  with pytest.raises(BitError, match='pass num_classes .* or keep_head=True'):
    bit.load(npz)
  with pytest.raises(BitError, match='10-class head .* num_classes=7'):
    bit.load(npz, num_classes=7, keep_head=True)
  with pytest.raises(BitError, match='num_classes must be an integer, got 3.0'):
    bit.load(npz, num_classes=3.0)
  model, params = bit.load(npz, num_classes=np.int64(10), keep_head=True)
  assert model.num_classes == 10 and np.any(params['head']['kernel'])


def test_load_architecture_is_a_random_scratch_model():
  model, params = bit.load('R26x1', num_classes=3, seed=0)
  assert (model.depth, model.width, model.num_classes) == (26, 1, 3)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(models.param_shapes(model))
  assert not np.any(params['head']['kernel'])
  assert np.std(params['block1']['unit01']['conv1']['kernel']) > 0
  with pytest.raises(BitError, match='pass num_classes'):
    bit.load('R26x1')
  with pytest.raises(BitError, match='no head to keep'):
    bit.load('R26x1', num_classes=3, keep_head=True)
  # The seed decides the weights: the same seed gives the same network, another seed another one.
  kernel = lambda p: np.asarray(p['block1']['unit01']['conv1']['kernel'])  # noqa: E731
  _, again = bit.load('R26x1', num_classes=3, seed=0)
  _, other = bit.load('R26x1', num_classes=3, seed=1)
  np.testing.assert_array_equal(kernel(again), kernel(params))
  assert not np.allclose(kernel(other), kernel(params))


@pytest.fixture
def tiny_registry(monkeypatch, tmp_path):
  """A registry entry for a small R26x1 checkpoint served from 127.0.0.1."""
  files = {
    'tiny/BiT-T-R26x1.npz': checkpoint_bytes(depth=26, classes=10, seed=0),
    'labels10.txt': ''.join(f'class {i}\n' for i in range(10)).encode(),
  }
  with FileServer(files) as server:
    monkeypatch.setenv('BIT_MODELS_URL', server.url)
    monkeypatch.setenv('BIT_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setitem(
      ck.REGISTRY,
      'BiT-T-R26x1',
      ck.PretrainedCfg('BiT-T-R26x1', 'tiny/BiT-T-R26x1.npz', 'R26x1', 10, 'labels10.txt'),
    )
    yield server


def test_load_registry_name_downloads_once(tiny_registry, weights, tmp_path):
  model, params = bit.load('BiT-T-R26x1', num_classes=4)
  assert (model.architecture, model.num_classes) == ('R26x1', 4)
  np.testing.assert_array_equal(
    params['block4']['unit02']['conv3']['kernel'],
    weights['resnet/block4/unit02/c/standardized_conv2d/kernel'],
  )
  assert (tmp_path / 'cache' / 'BiT-T-R26x1.npz').is_file()
  _, params = bit.load('bit-t-r26x1', keep_head=True)  # from the cache, the name case-insensitive
  np.testing.assert_array_equal(params['head']['bias'], weights['resnet/head/conv2d/bias'])
  assert tiny_registry.requests == [('/tiny/BiT-T-R26x1.npz', None)]


def test_label_names(tiny_registry, npz, tmp_path):
  assert ck.label_names('BiT-T-R26x1') == [f'class {i}' for i in range(10)]
  assert ck.label_names('BiT-T-R26x1')[-1] == 'class 9'
  assert tiny_registry.requests == [('/labels10.txt', None)]  # cached after the first call
  assert ck.label_names('R50x1') is None
  assert ck.label_names(npz) is None
  local = write(tmp_path / 'model.npz', {'x': np.zeros(1)})
  (tmp_path / 'labels.txt').write_text('cat\ndog\n')
  assert ck.label_names(local) == ['cat', 'dog']


def test_label_file_of_the_wrong_length_is_rejected(tiny_registry):
  tiny_registry.files['labels10.txt'] = b'a\nb\n'
  with pytest.raises(BitError, match=r'labels10.txt has 2 class names, expected 10'):
    ck.label_names('BiT-T-R26x1')


def test_registry_file_of_the_wrong_architecture(tiny_registry, monkeypatch, tmp_path):
  monkeypatch.setitem(
    ck.REGISTRY, 'BiT-T-R26x1', ck.PretrainedCfg('BiT-T-R26x1', 'tiny/BiT-T-R26x1.npz', 'R50x1', 10)
  )
  with pytest.raises(CheckpointError) as e:
    bit.load('BiT-T-R26x1', num_classes=2)
  msg = str(e.value)
  assert 'holds R26x1 with 10 classes' in msg and 'is R50x1' in msg and str(tmp_path / 'cache') in msg


def test_corrupt_cached_file_says_delete_it(tiny_registry, tmp_path):
  cached = tmp_path / 'cache' / 'BiT-T-R26x1.npz'
  cached.parent.mkdir(parents=True)
  cached.write_bytes(b'<html>503 Service Unavailable</html>')
  with pytest.raises(CheckpointError, match=f'delete {cached}'):
    bit.load('BiT-T-R26x1', num_classes=2)
  assert tiny_registry.requests == []


# --- bad input --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
  with pytest.raises(CheckpointError, match=f'No checkpoint file at {tmp_path / "nope.npz"}'):
    bit.load(str(tmp_path / 'nope.npz'), num_classes=2)
  with pytest.raises(CheckpointError, match='is a directory'):
    ck.load_npz(tmp_path)


def test_truncated_garbage_and_wrong_kind_of_file(npz, tmp_path):
  data = npz.read_bytes()
  cases = {
    'truncated.npz': data[: len(data) // 2],
    'cut_end.npz': data[:-30],
    'garbage.npz': b'\x00garbage' * 100,
    'empty.npz': b'',
  }
  for name, content in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=str(tmp_path / name)):
      bit.load(str(tmp_path / name), num_classes=2)
  np.save(tmp_path / 'single.npy', np.zeros(3))
  with pytest.raises(CheckpointError, match='single.npy holds a single array'):
    ck.load_npz(tmp_path / 'single.npy')
  write(tmp_path / 'nothing.npz', {})
  with pytest.raises(CheckpointError, match='nothing.npz is an empty .npz'):
    ck.load_npz(tmp_path / 'nothing.npz')


def test_corrupt_member_is_caught(npz, tmp_path):
  # Flip bytes inside the first member's data: the archive still opens, its CRC check fails on read.
  data = bytearray(npz.read_bytes())
  data[200:260] = bytes(60)
  path = tmp_path / 'crc.npz'
  path.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=str(path)):
    ck.load_npz(path)


def test_missing_unexpected_and_misshaped_keys_are_all_listed(weights, tmp_path):
  bad = dict(weights)
  del bad['resnet/block3/unit02/b/standardized_conv2d/kernel']
  del bad['resnet/head/conv2d/bias']
  bad['resnet/block1/unit01/a/extra'] = np.zeros(4, np.float32)
  bad['resnet/block2/unit01/c/group_norm/gamma'] = np.zeros(7, np.float32)
  bad['resnet/head/conv2d/kernel'] = bad['resnet/head/conv2d/kernel'][0]
  path = write(tmp_path / 'bad.npz', bad)
  with pytest.raises(CheckpointError) as e:
    bit.load(path, keep_head=True)
  msg = str(e.value)
  assert str(path) in msg and 'nothing was loaded' in msg
  assert 'missing (2)' in msg and 'resnet/block3/unit02/b/standardized_conv2d/kernel (3, 3, 256, 256)' in msg
  assert 'resnet/head/conv2d/bias (10,)' in msg
  assert 'unexpected (1)' in msg and 'resnet/block1/unit01/a/extra (4,)' in msg
  assert 'wrong shape (2)' in msg
  assert 'resnet/block2/unit01/c/group_norm/gamma: (7,) in the file, the model expects (128,)' in msg
  assert 'resnet/head/conv2d/kernel: (1, 2048, 10) in the file, the model expects (1, 1, 2048, 10)' in msg


def test_each_single_problem_names_its_key(weights):
  one_missing = {k: v for k, v in weights.items() if k != 'resnet/group_norm/beta'}
  with pytest.raises(CheckpointError, match='missing \\(1\\):\n    resnet/group_norm/beta \\(2048,\\)'):
    ck.npz_to_params(one_missing, source='m.npz')
  with pytest.raises(CheckpointError, match='unexpected \\(1\\):\n    global_step \\(\\)'):
    ck.npz_to_params({**weights, 'global_step': np.array(5.0)}, source='u.npz')
  shaped = {
    **weights,
    'resnet/block4/unit01/a/proj/standardized_conv2d/kernel': np.zeros((1, 1, 1024, 1), 'f'),
  }
  with pytest.raises(
    CheckpointError, match=r's.npz .*\n.*wrong shape \(1\):\n    resnet/block4/unit01/a/proj'
  ):
    ck.npz_to_params(shaped, source='s.npz')
  ints = {**weights, 'resnet/group_norm/beta': np.zeros(2048, np.int32)}
  with pytest.raises(
    CheckpointError, match='not floating point \\(1\\):\n    resnet/group_norm/beta: dtype int32'
  ):
    ck.npz_to_params(ints, source='i.npz')


def test_unknown_depth_or_width(weights):
  extra_unit = {k.replace('unit02', 'unit03'): v for k, v in weights.items() if 'block1/unit02/' in k}
  with pytest.raises(
    CheckpointError, match=r'x.npz: its units per block \(3, 2, 2, 2\) match no known depth'
  ):
    ck.npz_to_params({**weights, **extra_unit}, source='x.npz')
  with pytest.raises(CheckpointError, match='x.npz: its units per block'):
    ck.npz_to_params({'kernel': np.zeros(3)}, source='x.npz')
  odd = {**weights, 'resnet/root_block/standardized_conv2d/kernel': np.zeros((7, 7, 3, 60), 'f')}
  with pytest.raises(CheckpointError, match='y.npz: cannot tell the width'):
    ck.npz_to_params(
      {
        k: v
        for k, v in odd.items()
        if 'block1/unit01/a/group_norm' not in k and k != 'resnet/group_norm/gamma'
      },
      source='y.npz',
    )


def test_save_npz_rejects_foreign_params_and_writes_nothing(tmp_path):
  with pytest.raises(BitError, match='encoder/dense/kernel'):
    ck.save_npz({'encoder': {'dense': {'kernel': np.zeros((2, 2))}}}, tmp_path / 'x.npz')
  assert list(tmp_path.iterdir()) == []


def test_save_npz_replaces_atomically(weights, tmp_path):
  _, _, _, params = ck.npz_to_params(weights, source='mem')
  target = tmp_path / 'model.npz'
  target.write_bytes(b'old')
  ck.save_npz({'params': params}, target)  # the {'params': ...} wrapper of a variables dict is accepted
  assert sorted(ck.load_npz(target)) == sorted(weights)
  assert [p.name for p in tmp_path.iterdir()] == ['model.npz']
