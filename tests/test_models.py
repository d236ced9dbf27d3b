"""The model: shapes, parameter counts, parity with an independent implementation, bad input."""

import functools

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


# --- BiT as a backbone: features=True, and other input channel counts ---------------------------------------

STAGES = ('stem', 'stage1', 'stage2', 'stage3', 'stage4')


@pytest.fixture(scope='module')
def backbone():
  from helpers import fast_params

  model = models.create_model('R26x1', 5)
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
  return model, fast_params(model, seed=3, head_std=0.1), images


def test_features_give_stage_maps_at_strides_4_to_32_and_the_plain_outputs_exactly(backbone):
  model, params, images = backbone
  out, logits, pre = jax.jit(
    lambda p, x: (
      model.apply({'params': p}, x, features=True),
      model.apply({'params': p}, x),
      model.apply({'params': p}, x, pre_logits=True),
    )
  )(params, images)
  assert sorted(out) == sorted([*STAGES, 'pre_logits', 'logits'])
  channels = {'stem': 64, 'stage1': 256, 'stage2': 512, 'stage3': 1024, 'stage4': 2048}
  strides = {'stem': 4, 'stage1': 4, 'stage2': 8, 'stage3': 16, 'stage4': 32}
  for name in STAGES:
    assert out[name].shape == (2, 64 // strides[name], 64 // strides[name], channels[name]), name
  np.testing.assert_array_equal(np.asarray(out['logits']), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(out['pre_logits']), np.asarray(pre))
  assert np.abs(np.asarray(logits)).max() > 0  # a real head, not the zeros of a fresh one


def test_features_are_the_intermediates_flax_captures(backbone):
  model, params, images = backbone
  out = model.apply({'params': params}, images, features=True)
  _, state = model.apply({'params': params}, images, capture_intermediates=True)
  inter = state['intermediates']
  np.testing.assert_array_equal(np.asarray(out['stem']), np.asarray(inter['root_block']['__call__'][0]))
  for b in range(1, 5):
    np.testing.assert_array_equal(
      np.asarray(out[f'stage{b}']), np.asarray(inter[f'block{b}']['__call__'][0]), err_msg=f'stage{b}'
    )


def test_features_under_grad_with_frozen_stages_and_bfloat16(backbone):
  from bit import freeze

  model, params, images = backbone
  mask = freeze.trainable_mask(params, 'partial', unfreeze_stages=1)
  split = freeze.Split.create(params, mask)
  leaves, treedef, trainable = split.partition(params)

  def loss(trainable):  # a dense head on the stride-32 map, as a detector would put one
    out = model.apply({'params': split.merge(treedef, leaves, trainable)}, images, features=True)
    return jnp.mean(out['stage4'].astype(jnp.float32) ** 2) + jnp.mean(out['logits'])

  grads = jax.jit(jax.grad(loss))(trainable)
  assert len(grads) == len(trainable) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  assert any(float(jnp.abs(g).max()) > 0 for g in grads)
  bf16 = model.clone(dtype=jnp.bfloat16).apply({'params': params}, images, features=True)
  assert bf16['stage4'].dtype == jnp.bfloat16 and bf16['logits'].dtype == jnp.float32
  standardized = models.Inference(model)
  out = jax.jit(functools.partial(standardized, features=True))(standardized.prepare(params), images)
  np.testing.assert_allclose(np.asarray(out['logits']), model.apply({'params': params}, images), atol=1e-4)


def test_in_chans_adapts_the_root_kernel_as_timm_does(backbone):
  _, params, _ = backbone
  k = np.asarray(params['root_block']['conv_root']['kernel'])
  np.testing.assert_allclose(checkpoints.adapt_input_conv(k, 1), k.sum(axis=2, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(
    checkpoints.adapt_input_conv(k, 5), np.concatenate([k, k[:, :, :2]], axis=2) * 3 / 5, rtol=1e-6
  )
  assert checkpoints.adapt_input_conv(k, 3) is not k and np.array_equal(checkpoints.adapt_input_conv(k, 3), k)


def test_gray_model_equals_rgb_model_on_repeated_gray_where_the_root_is_colour_blind(backbone, tmp_path):
  # Weight standardization (per output channel, over H, W and RGB) makes the adapted root differ from the RGB
  # model on gray images unless the RGB kernel treats the three channels alike; such a kernel shows the
  # rest of the chain (sum over RGB, the 1-channel input check, the first GroupNorm) is exact.
  model, params, images = backbone
  k = np.asarray(params['root_block']['conv_root']['kernel'])
  params = {**params, 'root_block': {'conv_root': {'kernel': jnp.asarray(np.repeat(k[:, :, :1], 3, axis=2))}}}
  path = checkpoints.save_npz(params, tmp_path / 'model.npz')
  gray_model, gray_params = checkpoints.load(path, keep_head=True, in_chans=1)
  assert gray_model.in_chans == 1 and gray_params['root_block']['conv_root']['kernel'].shape == (7, 7, 1, 64)
  gray = images[..., :1]
  np.testing.assert_allclose(
    np.asarray(gray_model.apply({'params': gray_params}, gray)),
    np.asarray(model.apply({'params': params}, jnp.repeat(gray, 3, axis=-1))),
    atol=1e-4,
  )
  # Checkpoints keep the channel count: the saved gray model loads as a gray model.
  again, again_params = checkpoints.load(
    checkpoints.save_npz(gray_params, tmp_path / 'gray.npz'), keep_head=True
  )
  assert again.in_chans == 1
  np.testing.assert_array_equal(
    again_params['root_block']['conv_root']['kernel'], gray_params['root_block']['conv_root']['kernel']
  )
  with pytest.raises(BitError, match='1 channels'):
    gray_model.apply({'params': gray_params}, images)


def test_six_channels_of_a_twice_repeated_image_give_the_rgb_logits(backbone, tmp_path):
  model, params, images = backbone
  six, six_params = checkpoints.load(
    checkpoints.save_npz(params, tmp_path / 'm.npz'), keep_head=True, in_chans=6
  )
  assert six.in_chans == 6
  np.testing.assert_allclose(
    np.asarray(six.apply({'params': six_params}, jnp.concatenate([images, images], axis=-1))),
    np.asarray(model.apply({'params': params}, images)),
    atol=1e-4,
  )
  scratch, scratch_params = checkpoints.load('R26x1', 4, in_chans=2)
  assert scratch_params['root_block']['conv_root']['kernel'].shape == (7, 7, 2, 64) and scratch.in_chans == 2


@pytest.mark.parametrize('bad', [0, -1, 2.0, '3', True])
def test_in_chans_below_one_is_a_clear_error(bad):
  with pytest.raises(BitError, match=f'in_chans must be a positive integer.*{bad!r}'):
    checkpoints.load('R26x1', 4, in_chans=bad)
