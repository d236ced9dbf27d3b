"""The model: shapes, parameter counts, parity with an independent implementation, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bit import checkpoints, models
from bit.errors import BitError
from bit.testing import random_checkpoint

# Published parameter counts (millions) of the BiT models with a 1,000-class head (timm's model cards).
KNOWN_PARAMS_M = {
  'R50x1': 25.55,
  'R50x3': 217.32,
  'R101x1': 44.54,
  'R101x3': 387.93,
  'R152x2': 236.34,
  'R152x4': 936.53,
}

# (fixture folder, depth, width, classes, seed) as in tests/data/README.md
PARITY_CASES = [('r26x1_s64', 26, 1, 5, 1), ('r50x1_s128', 50, 1, 10, 0)]


@pytest.mark.parametrize('arch', sorted(models.ARCHITECTURES))
def test_param_counts_match_published_figures(arch):
  shapes = models.param_shapes(models.create_model(arch, 1000))
  assert round(models.count_params(shapes) / 1e6, 2) == KNOWN_PARAMS_M[arch]


def test_r50x1_backbone_is_23_5m():
  shapes = models.param_shapes(models.create_model('R50x1', 1000))
  backbone = {k: v for k, v in shapes.items() if k != 'head'}
  assert round(models.count_params(backbone) / 1e6, 1) == 23.5


def test_param_tree_follows_checkpoint_layout():
  shapes = models.param_shapes(models.create_model('R50x1', 7))
  assert shapes['root_block']['conv_root']['kernel'].shape == (7, 7, 3, 64)
  assert [len(shapes[f'block{b}']) for b in range(1, 5)] == [3, 4, 6, 3]
  unit = shapes['block2']['unit01']
  assert set(unit) == {'gn1', 'conv1', 'gn2', 'conv2', 'gn3', 'conv3', 'conv_proj'}
  assert unit['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert 'conv_proj' in shapes['block1']['unit01'] and 'conv_proj' not in shapes['block1']['unit02']
  assert shapes['norm_pre_head']['scale'].shape == (2048,)
  assert shapes['head']['kernel'].shape == (2048, 7)


@pytest.fixture(scope='module')
def tiny():
  model = models.create_model('R26x1', 3)
  return model, models.init_params(model, seed=0, image_size=32)


def test_head_is_zero_initialized(tiny):
  model, params = tiny
  assert not np.any(np.asarray(params['head']['kernel'])) and not np.any(np.asarray(params['head']['bias']))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  np.testing.assert_array_equal(model.apply({'params': params}, x), 0.0)


@pytest.mark.parametrize('size', [32, 45])
def test_output_shapes(tiny, size):
  model, params = tiny
  x = jnp.zeros((2, size, size, 3))
  logits, feats = jax.jit(
    lambda p, x: (model.apply({'params': p}, x), model.apply({'params': p}, x, pre_logits=True))
  )(params, x)
  assert logits.shape == (2, 3)
  assert feats.shape == (2, model.num_features) == (2, 2048)


@pytest.mark.parametrize('shape', [(1, 31, 40, 3), (1, 64, 64, 1), (64, 64, 3)])
def test_bad_input_shape_is_a_clear_error(tiny, shape):
  model, params = tiny
  with pytest.raises(BitError, match='NHWC'):
    model.apply({'params': params}, jnp.zeros(shape))


@pytest.mark.parametrize('name', ['R51x1', 'R50x5', 'resnet50', 'R50'])
def test_unknown_architecture(name):
  with pytest.raises(BitError, match=name):
    models.parse_architecture(name)


def test_parse_architecture():
  assert models.parse_architecture('R152x4') == (152, 4)
  assert models.parse_architecture('r26x1') == (26, 1)


def test_weight_standardization_is_scale_invariant():
  w = np.random.default_rng(0).standard_normal((3, 3, 4, 8)).astype(np.float32)
  s = np.asarray(models.standardize(w))
  np.testing.assert_allclose(s.mean(axis=(0, 1, 2)), 0, atol=1e-6)
  np.testing.assert_allclose(s.var(axis=(0, 1, 2)), 1, atol=1e-4)
  np.testing.assert_allclose(np.asarray(models.standardize(7.0 * w + 0.0)), s, atol=1e-5)


def _parity_case(data_dir, folder, depth, width, classes, seed):
  weights = random_checkpoint(depth=depth, width=width, classes=classes, seed=seed)
  d, w, c, params = checkpoints.npz_to_params(weights, source=f'random_checkpoint({folder})')
  assert (d, w, c) == (depth, width, classes)
  case = data_dir / folder
  return models.ResNetV2(depth, width, classes), params, case


@pytest.mark.parametrize('case', PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_parity_with_independent_implementation(data_dir, case):
  model, params, path = _parity_case(data_dir, *case)
  images = np.load(path / 'images.npy')
  logits, feats = jax.jit(
    lambda p, x: (model.apply({'params': p}, x), model.apply({'params': p}, x, pre_logits=True))
  )(params, images)
  np.testing.assert_allclose(np.asarray(logits), np.load(path / 'logits.npy'), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(feats), np.load(path / 'pre_logits.npy'), atol=1e-4, rtol=0)


def test_bfloat16_compute_keeps_float32_params_and_stays_close(data_dir):
  model, params, path = _parity_case(data_dir, *PARITY_CASES[0])
  images = np.load(path / 'images.npy')
  bf16 = models.ResNetV2(26, 1, 5, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(models.param_shapes(bf16)))
  logits = bf16.apply({'params': params}, images)
  assert logits.dtype == jnp.float32
  golden = np.load(path / 'logits.npy')
  # bfloat16 has 8 bits of mantissa: close, not equal; the ranking of the classes survives.
  assert np.abs(np.asarray(logits) - golden).max() < 0.25
  assert np.array_equal(np.argmax(logits, -1), np.argmax(golden, -1))


def test_inference_with_folded_weights_matches_golden_logits(data_dir):
  model, params, path = _parity_case(data_dir, *PARITY_CASES[0])
  inference = models.Inference(model)
  prepared = inference.prepare(params)
  # The prepared kernels are standardized: zero mean over H, W, I for every output channel.
  k = np.asarray(prepared['block1']['unit01']['conv2']['kernel'])
  np.testing.assert_allclose(k.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  logits = jax.jit(inference)(prepared, np.load(path / 'images.npy'))
  np.testing.assert_allclose(np.asarray(logits), np.load(path / 'logits.npy'), atol=1e-4, rtol=0)
