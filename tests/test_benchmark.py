"""The speed benchmark (a tiny smoke run, no timing assertions) and the folded inference model it measures
(equal to the training model). The fast ops are tested against their references in tests/test_ops.py."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bit import benchmark, models
from bit.errors import BitError

TINY = dict(model='R26x1', size=32, batch=4, steps=2, warmup=1, num_classes=5, matmul_n=128)


def _finite_positive(result, key):
  value = result[key]
  assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_cli_prints_one_json_line_last():
  cmd = [sys.executable, '-m', 'bit.benchmark', '--model', 'R26x1', '--size', '32', '--batch', '2']
  cmd += ['--steps', '2', '--warmup', '1', '--classes', '3', '--matmul-n', '128']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in (
    'train_images_per_sec',
    'infer_images_per_sec',
    'infer_unfolded_images_per_sec',
    'compile_seconds',
    'train_compile_seconds',
    'infer_compile_seconds',
    'peak_rss_mb',
    'matmul_peak_gflops',
    'train_peak_fraction',
    'infer_peak_fraction',
    'forward_gflops_per_image',
  ):
    _finite_positive(result, key)
  assert (result['model'], result['size'], result['batch'], result['dtype']) == ('R26x1', 32, 2, 'float32')
  # The fractions are of a peak measured in the same run: far above 1 would mean a wrong FLOP count.
  assert result['train_peak_fraction'] < 3 and result['infer_peak_fraction'] < 3
  assert result['compile_seconds'] >= result['train_compile_seconds']
  assert math.isfinite(result['train_loss'])
  assert '[bench]' in proc.stderr  # progress goes to stderr, so stdout stays machine-readable
  assert set(result['host_malloc']) == {'malloc', 'dispatch'}
  assert isinstance(result['train_page_faults_per_step'], int) and result['train_page_faults_per_step'] >= 0


def test_data_parallel_run_over_two_devices():
  if len(jax.devices()) < 2:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count>=2 (tests/conftest.py sets 4)')
  result = benchmark.run(**{**TINY, 'devices': 2, 'infer': False})
  assert result['devices'] == 2
  _finite_positive(result, 'train_images_per_sec')
  assert math.isfinite(result['train_loss'])


def test_train_step_on_real_jpegs_against_synthetic_batches(tmp_path):
  from bit import benchmark_data

  folder = benchmark_data.make_jpeg_folder(tmp_path, num_images=12, num_classes=3, size=(60, 80))
  result = benchmark.run(**{**TINY, 'infer': False, 'pipeline': str(folder)})
  for key in (
    'pipeline_images_per_sec',
    'train_synthetic_loop_images_per_sec',
    'train_real_images_per_sec',
    'train_real_nocache_images_per_sec',
  ):
    _finite_positive(result, key)
  for key in ('train_real_over_synthetic', 'train_real_nocache_over_synthetic'):
    assert result[key] == pytest.approx(
      result[key.replace('over_synthetic', 'images_per_sec')] / result['train_synthetic_loop_images_per_sec'],
      rel=0.01,
    )
  assert result['real_data']['crop'] == 32 and result['real_data']['train_size'] == 12
  with pytest.raises(BitError, match='--classes 3'):
    benchmark.run(**{**TINY, 'infer': False, 'pipeline': str(folder), 'num_classes': 2})


def test_compile_only_allocates_nothing_and_reports_compile_times():
  result = benchmark.run(**{**TINY, 'compile_only': True})
  _finite_positive(result, 'train_compile_seconds')
  _finite_positive(result, 'infer_compile_seconds')
  assert 'train_images_per_sec' not in result


@pytest.mark.parametrize(
  'kwargs, match',
  [({'devices': 64}, 'device'), ({'batch': 3, 'devices': 2}, 'split'), ({'dtype': 'float16'}, 'float16')],
)
def test_bad_options_are_clear_errors(kwargs, match):
  with pytest.raises(BitError, match=match):
    benchmark.run(**{**TINY, **kwargs})


def test_cli_bad_option_exits_2_with_message(capsys):
  assert benchmark.main(['--model', 'R26x1', '--devices', '64']) == 2
  assert '--devices 64' in capsys.readouterr().err


def test_forward_flops_match_published_macs():
  # ResNet-50 at 224px: 4.1 GMACs; ResNet-101: 7.8 GMACs (the usual published figures).
  assert benchmark.forward_flops(models.ResNetV2(50, 1, 1000), 224) / 2e9 == pytest.approx(4.09, abs=0.02)
  assert benchmark.forward_flops(models.ResNetV2(101, 1, 1000), 224) / 2e9 == pytest.approx(7.80, abs=0.03)


def test_folded_inference_model_equals_the_training_model():
  model = models.create_model('R26x1', 5)
  params = models.init_params(model, seed=0, image_size=32)
  # Random GroupNorm and head params too, so every folded path shows in the output.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  params = jax.tree_util.tree_unflatten(
    tree, [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
  )
  folded = models.fold_for_inference(params)
  assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(params)
  kernel = np.asarray(folded['block2']['unit01']['conv2']['kernel'])
  np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0, atol=1e-5)  # really standardized
  np.testing.assert_array_equal(folded['head']['kernel'], params['head']['kernel'])  # the rest untouched
  x = jax.random.uniform(jax.random.PRNGKey(6), (2, 32, 32, 3), minval=-1, maxval=1)
  ref = jax.jit(model.apply)({'params': params}, x)
  out = jax.jit(model.clone(folded=True).apply)({'params': folded}, x)
  assert np.abs(np.asarray(ref)).max() > 1e-2
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
