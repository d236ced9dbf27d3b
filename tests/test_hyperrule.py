"""The BiT-HyperRule against a copy of the official big_transfer `bit_hyperrule.py` semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bit import hyperrule
from bit.errors import ConfigError

SIZES = [10, 1_000, 19_999, 20_000, 100_000, 499_999, 500_000, 1_281_167]


# A small reference copy of the official get_schedule / get_lr (google-research/big_transfer).
def _official_schedule(dataset_size):
  if dataset_size < 20_000:
    return [100, 200, 300, 400, 500]
  elif dataset_size < 500_000:
    return [500, 3000, 6000, 9000, 10_000]
  else:
    return [500, 6000, 12_000, 18_000, 20_000]


def _official_get_lr(step, dataset_size, base_lr=0.003):
  supports = _official_schedule(dataset_size)
  if step < supports[0]:
    return base_lr * step / supports[0]
  elif step >= supports[-1]:
    return None
  else:
    for s in supports[1:]:
      if s < step:
        base_lr /= 10
    return base_lr


def _probe_steps(supports):
  """Every boundary and the step either side, plus the first steps."""
  steps = {0, 1, 2}
  for s in supports:
    steps.update({s - 1, s, s + 1})
  return sorted(steps)


@pytest.mark.parametrize(
  'hw, expected',
  [
    ((95, 95), (160, 128)),
    ((96, 96), (512, 480)),
    ((32, 32), (160, 128)),
    ((95, 97), (160, 128)),  # 9215 pixels: just below 96*96
    ((96, 97), (512, 480)),
    ((48, 192), (512, 480)),  # 9216 pixels: the area counts, not the sides
    ((500, 375), (512, 480)),
    ((96, 96, 3), (512, 480)),
  ],
)
def test_resolution_boundary(hw, expected):
  assert hyperrule.resolution(hw) == expected


def test_train_resolution_project_default_and_paper_crop():
  assert hyperrule.train_resolution((96, 96)) == (512, 224)
  assert hyperrule.train_resolution((95, 95)) == (160, 128)
  assert hyperrule.train_resolution((375, 500)) == (512, 224)
  assert hyperrule.train_resolution((375, 500), crop=480) == (512, 480)
  assert hyperrule.train_resolution((32, 32), crop=96) == (160, 96)
  # A crop above the resize grows the resize with the official 512/480 margin.
  resize, crop = hyperrule.train_resolution((600, 600), crop=600)
  assert crop == 600 and resize == 640
  with pytest.raises(ConfigError, match='crop'):
    hyperrule.train_resolution((96, 96), crop=0)


@pytest.mark.parametrize('n, alpha', [(0, 0.0), (19_999, 0.0), (20_000, 0.1), (499_999, 0.1), (500_000, 0.1)])
def test_mixup_alpha(n, alpha):
  assert hyperrule.mixup_alpha(n) == alpha


@pytest.mark.parametrize('n', SIZES)
def test_schedule_matches_official(n):
  assert hyperrule.schedule(n) == _official_schedule(n)


def test_schedule_size_boundaries():
  assert hyperrule.schedule(19_999)[-1] == 500
  assert hyperrule.schedule(20_000)[-1] == 10_000
  assert hyperrule.schedule(499_999)[-1] == 10_000
  assert hyperrule.schedule(500_000)[-1] == 20_000


@pytest.mark.parametrize('n', SIZES)
@pytest.mark.parametrize('base_lr', [0.003, 0.01])
def test_learning_rate_matches_official_at_every_boundary(n, base_lr):
  supports = _official_schedule(n)
  for step in _probe_steps(supports):
    expected = _official_get_lr(step, n, base_lr)
    got = hyperrule.learning_rate(step, n, base_lr)
    if expected is None:
      assert got is None, step
    else:
      assert got == pytest.approx(expected, rel=1e-12), step


def test_learning_rate_shape_of_the_curve():
  # Warmup from 0, peak at the warmup boundary, then /10 only after each boundary is passed.
  assert hyperrule.learning_rate(0, 1000) == 0.0
  assert hyperrule.learning_rate(100, 1000) == pytest.approx(0.003)
  assert hyperrule.learning_rate(200, 1000) == pytest.approx(0.003)
  assert hyperrule.learning_rate(201, 1000) == pytest.approx(0.0003)
  assert hyperrule.learning_rate(499, 1000) == pytest.approx(0.000003)
  assert hyperrule.learning_rate(500, 1000) is None


@pytest.mark.parametrize('n', [1_000, 20_000, 500_000])
def test_lr_schedule_equals_learning_rate_below_total(n):
  total = hyperrule.schedule(n)[-1]
  fn = jax.jit(jax.vmap(hyperrule.lr_schedule(n, 0.003)))
  got = np.asarray(fn(jnp.arange(total)))
  expected = np.array([_official_get_lr(s, n) for s in range(total)])
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
  # Past the end the in-graph schedule holds the last value instead of returning None.
  assert float(hyperrule.lr_schedule(n, 0.003)(total + 5)) == pytest.approx(0.003 / 1000, rel=1e-6)


def test_lr_schedule_works_as_optax_schedule():
  import optax

  tx = optax.sgd(hyperrule.lr_schedule(1000, 0.003), momentum=0.9)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  updates, _ = tx.update({'w': jnp.ones(3)}, state, params)
  assert np.allclose(updates['w'], 0.0)  # step 0 of the warmup has learning rate 0


def test_batch_size_scaling_is_off_by_default_and_scales_when_asked():
  assert hyperrule.schedule(1000, batch_size=512) == hyperrule.schedule(1000)
  assert hyperrule.schedule(1000, batch_size=256) == [200, 400, 600, 800, 1000]
  assert hyperrule.schedule(1000, batch_size=1024) == [50, 100, 150, 200, 250]
  assert hyperrule.learning_rate(100, 1000) == pytest.approx(0.003)
  assert hyperrule.learning_rate(200, 1000, batch_size=256) == pytest.approx(0.0015)
  assert hyperrule.learning_rate(1000, 1000, batch_size=256) is None
  # Huge batches keep every phase at least one step long.
  s = hyperrule.schedule(1000, batch_size=1_000_000)
  assert all(a < b for a, b in zip(s, s[1:], strict=False)) and s[0] >= 1
  fn = hyperrule.lr_schedule(1000, 0.003, batch_size=256)
  for step in _probe_steps(hyperrule.schedule(1000, batch_size=256))[:-2]:
    assert float(fn(step)) == pytest.approx(hyperrule.learning_rate(step, 1000, batch_size=256), rel=1e-6)
  with pytest.raises(ConfigError, match='batch_size'):
    hyperrule.schedule(1000, batch_size=0)


def _reference_lr(step, supports, base_lr):
  """The official get_lr's shape for explicit boundaries (no None at the end)."""
  warmup, decays = supports[0], supports[1:-1]
  if step < warmup:
    return base_lr * step / warmup
  return base_lr * 0.1 ** sum(step > s for s in decays)


@pytest.mark.parametrize('supports', [[3, 5, 8, 9, 12], [0, 2, 3, 4, 5], [10, 10, 20, 30, 40]])
def test_lr_schedule_with_explicit_supports(supports):
  fn = jax.jit(jax.vmap(hyperrule.lr_schedule(base_lr=0.01, supports=supports)))
  steps = np.arange(supports[-1] + 3)
  expected = [_reference_lr(int(s), supports, 0.01) for s in steps]
  np.testing.assert_allclose(np.asarray(fn(jnp.asarray(steps))), expected, rtol=1e-6, atol=1e-12)
  # The hyper-rule's own boundaries given explicitly are the same schedule as the dataset size.
  n = 1000
  a = hyperrule.lr_schedule(n, 0.003)
  b = hyperrule.lr_schedule(base_lr=0.003, supports=hyperrule.schedule(n))
  for step in _probe_steps(hyperrule.schedule(n)):
    assert float(a(step)) == float(b(step)), step


def test_lr_schedule_needs_one_source_of_boundaries():
  with pytest.raises(ConfigError, match='exactly one'):
    hyperrule.lr_schedule()
  with pytest.raises(ConfigError, match='exactly one'):
    hyperrule.lr_schedule(1000, supports=[1, 2, 3, 4, 5])
  with pytest.raises(ConfigError, match='warmup <= decay1'):
    hyperrule.lr_schedule(supports=[5, 4, 3, 2, 1])
