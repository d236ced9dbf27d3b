"""Transfer-mode masks: they freeze exactly what they say, and frozen params never move."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fast_params

from bit import freeze, models
from bit.errors import ConfigError


@pytest.fixture(scope='module')
def tiny():
  """R26x1 with random params built from the shapes alone (no compiled init); a small random head."""
  model = models.create_model('R26x1', num_classes=3)
  return model, fast_params(model, head_std=0.1)


def _flat(tree):
  return {freeze._path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


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

  return jax.jit(jax.grad(loss_fn))


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
