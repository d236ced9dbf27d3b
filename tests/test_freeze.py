"""Transfer-mode masks: they freeze exactly what they say, and frozen params never move."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fast_params

from bit import freeze, models, train_state
from bit.errors import ConfigError


@pytest.fixture(scope='module')
def tiny():
  """R26x1 with random params built from the shapes alone (no compiled init); a small random head."""
  model = models.create_model('R26x1', num_classes=3)
  return model, fast_params(model, head_std=0.1)


def _flat(tree):
  """'block1/unit01/conv1/kernel' -> leaf."""
  return {'/'.join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_full_and_head_masks(tiny):
  _, params = tiny
  full = _flat(freeze.trainable_mask(params, 'full'))
  assert all(full.values()) and len(full) == len(_flat(params))
  head = _flat(freeze.trainable_mask(params, 'head'))
  assert {k for k, v in head.items() if v} == {'head/kernel', 'head/bias'}


@pytest.mark.parametrize('stages, blocks', [(0, set()), (1, {'block4'}), (2, {'block3', 'block4'})])
def test_partial_stages(tiny, stages, blocks):
  _, params = tiny
  mask = _flat(freeze.trainable_mask(params, 'partial', unfreeze_stages=stages))
  for name, on in mask.items():
    expected = name.startswith(('head/', 'norm_pre_head/')) or name.split('/')[0] in blocks
    assert on == expected, name
  # The stem is never trained in partial mode.
  assert not mask['root_block/conv_root/kernel']


def test_partial_units_counts_down_from_the_top(tiny):
  _, params = tiny
  # R26 has two units per stage: the top three are block4/unit02, block4/unit01 and block3/unit02.
  mask = _flat(freeze.trainable_mask(params, 'partial', unfreeze_units=3))
  on_units = {'/'.join(k.split('/')[:2]) for k, v in mask.items() if v and k.startswith('block')}
  assert on_units == {'block4/unit02', 'block4/unit01', 'block3/unit02'}


def test_bad_arguments(tiny):
  _, params = tiny
  with pytest.raises(ConfigError, match='transfer mode'):
    freeze.trainable_mask(params, 'linear')
  with pytest.raises(ConfigError, match='at most 4'):
    freeze.trainable_mask(params, 'partial', unfreeze_stages=5)
  with pytest.raises(ConfigError, match='not both'):
    freeze.trainable_mask(params, 'partial', unfreeze_stages=1, unfreeze_units=1)
  with pytest.raises(ConfigError, match='partial'):
    freeze.trainable_mask(params, 'head', unfreeze_stages=1)


def test_full_mode_is_the_plain_optimizer(tiny):
  _, params = tiny
  tx = optax.sgd(0.1, momentum=0.9)
  assert freeze.masked_optimizer(tx, params, 'full') is tx


@pytest.fixture(scope='module')
def grad_fn(tiny):
  """One compiled gradient function shared by every mode, so the test compiles the model once."""
  model, _ = tiny
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  y = jax.nn.one_hot(jnp.array([0, 1, 2, 1]), 3)

  def loss_fn(p):
    return optax.softmax_cross_entropy(model.apply({'params': p}, x), y).mean()

  return _FullBackward(jax.jit(jax.value_and_grad(loss_fn)), x, y)


class _FullBackward:
  """The gradients of every parameter (the full backward pass) of one fixed batch `x`, `y`."""

  def __init__(self, value_and_grad, x, y):
    self.value_and_grad, self.x, self.y = value_and_grad, x, y

  def __call__(self, params):
    return self.value_and_grad(params)[1]


@pytest.mark.parametrize(
  'mode, kwargs',
  [
    ('head', {}),
    ('partial', {'unfreeze_stages': 1}),
    ('partial', {'unfreeze_units': 1, 'backbone_lr_scale': 0.1}),
  ],
)
def test_frozen_params_never_move(tiny, grad_fn, mode, kwargs):
  _, params = tiny
  scale = kwargs.pop('backbone_lr_scale', 1.0)
  tx = optax.chain(optax.clip_by_global_norm(10.0), optax.sgd(0.05, momentum=0.9))
  tx = freeze.masked_optimizer(tx, params, mode, backbone_lr_scale=scale, **kwargs)
  mask = freeze.trainable_mask(params, mode, **kwargs)

  @jax.jit
  def update(p, s, grads):
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  p, state = params, tx.init(params)
  grads = None
  for _ in range(3):
    grads = grad_fn(p)
    p, state = update(p, state, grads)
  old, new, g, m = (_flat(t) for t in (params, p, grads, mask))
  moved = 0
  for name in old:
    if m[name]:
      moved += not np.array_equal(np.asarray(old[name]), np.asarray(new[name]))
    else:
      assert np.any(np.asarray(g[name]) != 0), f'{name} got no gradient, the test would prove nothing'
      np.testing.assert_array_equal(np.asarray(old[name]), np.asarray(new[name]), err_msg=name)
  trainable, total = freeze.count_trainable(params, mask)
  assert 0 < trainable < total
  # Every trainable parameter moved (the zero-initialized head gets gradients at once, the backbone after).
  assert moved == sum(m.values())


def test_backbone_lr_scale_scales_updates(tiny):
  _, params = tiny
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  tx = freeze.masked_optimizer(optax.sgd(1.0), params, 'full', backbone_lr_scale=0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = _flat(updates)
  np.testing.assert_allclose(np.asarray(flat['head/bias']), -1.0)
  np.testing.assert_allclose(np.asarray(flat['block1/unit01/conv1/kernel']), -0.1, rtol=1e-6)


def test_optimizer_from_config(tiny):
  _, params = tiny
  tx = freeze.optimizer_from_config(optax.sgd(1.0), params, {'transfer': 'head'})
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates = _flat(tx.update(grads, tx.init(params), params)[0])
  assert np.all(np.asarray(updates['head/kernel']) == -1.0)
  assert np.all(np.asarray(updates['norm_pre_head/scale']) == 0.0)


# --- the step differentiates only what it trains -----------------------------------------------------------

SPLITS = [
  ('head', {}),
  ('partial', {'unfreeze_stages': 1}),
  ('partial', {'unfreeze_units': 3}),
]


def _state(model, params, mode, **kwargs):
  lr = train_state.lr_schedule([0, 1, 2, 3, 4], 0.1)
  return train_state.create_state(model, params, lr, transfer=mode, **kwargs)


@pytest.mark.parametrize('mode, kwargs', SPLITS)
def test_trainable_gradients_are_the_full_backward_pass_masked(tiny, grad_fn, mode, kwargs):
  """The split step's gradients (frozen leaves never differentiated, frozen kernels standardized once)
  equal the full backward pass's followed by the mask, to 1e-5 of each leaf's largest gradient: XLA may
  fuse and round the two programs differently."""
  model, params = tiny
  reference_loss, reference = grad_fn.value_and_grad(params)
  state = _state(model, params, mode, **kwargs)
  # Unoptimized machine code compiles in half the time; the values are the same program's.
  compiled = jax.jit(train_state.loss_and_grads).lower(state, grad_fn.x, grad_fn.y)
  compiled = compiled.compile(compiler_options={'xla_backend_optimization_level': 0})
  loss, grads = compiled(state, grad_fn.x, grad_fn.y)
  np.testing.assert_allclose(float(loss), float(reference_loss), rtol=1e-5)
  mask, got, want = (_flat(t) for t in (freeze.trainable_mask(params, mode, **kwargs), grads, reference))
  for name, on in mask.items():
    g, r = np.asarray(got[name]), np.asarray(want[name])
    if on:
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=name)
    else:
      assert np.all(g == 0) and np.any(r != 0), name


def _residual_bytes_per_image(state):
  """The bytes JAX keeps from the forward pass for the backward pass, per image (shapes only, no compute)."""

  def residuals(batch):
    x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((batch, 3), jnp.float32)

    def vjp(x, y):
      loss_fn, trainable = train_state.trainable_loss(state, x, y)
      return jax.vjp(loss_fn, trainable)[1]

    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(jax.eval_shape(vjp, x, y)))

  return residuals(2) - residuals(1)  # the weights kept for the backward pass do not grow with the batch


def test_frozen_layers_keep_no_activations_for_the_backward_pass(tiny):
  model, params = tiny
  full = _residual_bytes_per_image(_state(model, params, 'full'))
  head = _residual_bytes_per_image(_state(model, params, 'head'))
  top = _residual_bytes_per_image(_state(model, params, 'partial', unfreeze_stages=1))
  # Head only: the pooled features (and the softmax of the loss), nothing of the backbone.
  assert head <= 4 * (model.num_features + 4 * model.num_classes), head
  # block4 (1x1 and 2x2 pixels at 32 px) keeps a sliver of what the whole network keeps.
  assert head < top < 0.2 * full, (head, top, full)


def test_frozen_kernels_are_standardized_once_as_for_inference(tiny):
  model, params = tiny
  state = _state(model, params, 'head')
  standardized = _flat(models.standardize_kernels(params))
  names = [n for n in _flat(params) if n not in ('head/kernel', 'head/bias')]
  kernels = [n for n in names if not np.array_equal(standardized[n], _flat(params)[n])]
  assert len(kernels) == sum(state.split.standardized) == len(state.frozen) > 0
  for name, prepared in zip(kernels, state.frozen, strict=True):
    np.testing.assert_allclose(prepared, standardized[name], rtol=1e-6, atol=1e-6, err_msg=name)
  # The params the state carries (and checkpoints) keep the original kernels.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
    assert np.array_equal(a, b)
