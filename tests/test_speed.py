"""The speed tool, bit/tools/speed.py (a tiny smoke run, no timing assertions), and the standardized inference
model it measures (equal to the training model). The fast ops are tested against their references in
tests/test_ops.py."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import cpu_backend_only, fast_params

from bit import models
from bit.errors import BitError
from bit.tools import speed

TINY = dict(model='R26x1', size=32, batch=4, steps=2, warmup=1, num_classes=5, matmul_n=128)


def _finite_positive(result, key):
  value = result[key]
  assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def _xla_forward_flops_per_image(model: str, size: int, classes: int) -> float:
  """FLOPs of one image through the inference forward pass as XLA's cost analysis counts them (2 per
  multiply-add, plus the normalizations, activations and pooling that `speed.forward_flops` leaves out)."""
  net = models.create_model(model, classes)
  inference = models.Inference(net)
  variables = inference.prepare(fast_params(net))
  cost = (
    jax.jit(inference).lower(variables, np.zeros((2, size, size, 3), np.float32)).compile().cost_analysis()
  )
  return (cost[0] if isinstance(cost, list) else cost)['flops'] / 2


@cpu_backend_only  # the peak is the matmul measured in the same run, and host page faults are counted
def test_cli_prints_one_json_line_last(capsys):
  # The shapes of the accelerator suite's CPU version (speed.CPU_PLAN, 1,000 classes by default): its test
  # then finds the train step and the forward pass in the session's compilation cache.
  argv = '--model R26x1 --size 64 --batch 4 --steps 2 --warmup 1 --matmul-n 256'.split()
  assert speed.main(argv) == 0
  stdout, stderr = capsys.readouterr()
  result = json.loads(stdout.strip().splitlines()[-1])
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
    'model_flops_per_image',
    'train_mfu',
    'infer_mfu',
    'peak_flops',
  ):
    _finite_positive(result, key)
  assert (result['model'], result['size'], result['batch'], result['dtype']) == ('R26x1', 64, 4, 'float32')
  # The fractions are of a peak measured in the same run: far above 1 would mean a wrong FLOP count.
  assert result['train_peak_fraction'] < 3 and result['infer_peak_fraction'] < 3
  # On CPU the peak is the matmul measured in the same run.
  assert result['peak_flops'] == pytest.approx(result['matmul_peak_gflops'] * 1e9)
  # The model FLOPs against an independent count (XLA's, which adds the element-wise ops: ~1% at 64 px), and
  # the MFU as model FLOP/s (train: forward + backward = 3 forwards) over that peak.
  flops = _xla_forward_flops_per_image('R26x1', 64, 1000)
  assert result['model_flops_per_image'] == pytest.approx(flops, rel=0.03)
  for key, passes in (('train', 3), ('infer', 1)):
    expected = passes * flops * result[f'{key}_images_per_sec'] / result['peak_flops']
    assert result[f'{key}_mfu'] == pytest.approx(expected, rel=0.03), key
  assert result['compile_seconds'] >= result['train_compile_seconds']
  assert math.isfinite(result['train_loss'])
  assert '[speed]' in stderr  # progress goes to stderr, so stdout stays machine-readable
  assert set(result['host_malloc']) == {'malloc', 'dispatch'}
  assert result['parallelism'] == 'shard_map' and result['fast_ops'] == 'auto'
  assert isinstance(result['train_page_faults_per_step'], int) and result['train_page_faults_per_step'] >= 0


def test_the_real_step_with_pmap_accumulation_a_transfer_mask_and_the_reference_ops():
  from bit import ops

  if len(jax.devices()) < 2:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count>=2 (tests/conftest.py sets 4)')
  before = ops.fast_ops_mode()
  result = speed.run(
    **{**TINY, 'devices': 2, 'infer': False},
    parallelism='pmap',
    accum_steps=2,
    transfer='partial',
    unfreeze_stages=1,
    fast_ops='off',
  )
  assert (result['devices'], result['parallelism'], result['accum_steps']) == (2, 'pmap', 2)
  assert (result['transfer'], result['unfreeze_stages'], result['fast_ops']) == ('partial', 1, 'off')
  assert result['fast_ops_used'] == [] and ops.fast_ops_mode() == before  # the switch is restored
  _finite_positive(result, 'train_images_per_sec')
  _finite_positive(result, 'train_mfu')
  assert math.isfinite(result['train_loss'])


def test_peak_flops_table_and_its_fallback():
  assert speed.table_peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16')[0] == 989e12
  assert speed.table_peak_flops('NVIDIA H200', 'float32')[0] == 495e12
  assert speed.table_peak_flops('NVIDIA A100-SXM4-80GB', 'bfloat16')[0] == 312e12
  assert speed.table_peak_flops('NVIDIA L4', 'bfloat16')[0] == 121e12
  assert speed.table_peak_flops('TPU v5 lite', 'bfloat16')[0] == 197e12
  assert speed.table_peak_flops('TPU v6 lite', 'bfloat16')[0] == 918e12
  assert speed.table_peak_flops('TPU v4', 'float32')[0] == 275e12
  assert speed.table_peak_flops('NVIDIA H100 PCIe', 'bfloat16') is None  # a lower peak: not guessed
  assert speed.table_peak_flops('NVIDIA GeForce RTX 4090', 'float32') is None  # -> the measured matmul


# Modules the accelerator machine does not have: the suite must neither import nor need them. A None entry in
# sys.modules is what "not installed" looks like: importing it fails, and a probe (importlib.util.find_spec,
# as JAX's compilation cache makes) finds nothing.
_BLOCKED = """
import sys
for name in ('tensorflow', 'tensorflow_datasets', 'ml_collections'):
  sys.modules[name] = None
from bit.tools import speed
sys.exit(speed.main(sys.argv[1:]))
"""


@cpu_backend_only  # on an accelerator the suite is the full check, minutes long
def test_accelerator_suite_runs_its_tiny_cpu_version_without_tensorflow():
  proc = subprocess.run(
    [sys.executable, '-c', _BLOCKED, '--suite', 'accelerator'],
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1  # one JSON line
  out = json.loads(lines[0])
  assert out['suite'] == 'accelerator' and out['backend'] == 'cpu' and 'tiny CPU version' in out['note']
  for dtype in ('float32', 'bfloat16'):
    assert out['golden'][dtype]['ok'], out['golden']
  assert out['golden']['float32']['max_abs_error'] < 1e-4
  assert [(r['dtype'], r['fast_ops']) for r in out['runs']] == [('float32', 'auto'), ('float32', 'off')]
  auto, off = out['runs']
  assert len(auto['fast_ops_used']) == 6 and off['fast_ops_used'] == []
  for r in out['runs']:
    assert (r['model'], r['size']) == ('R26x1', 64)
    for key in (
      'train_images_per_sec',
      'train_mfu',
      'infer_images_per_sec',
      'infer_mfu',
      'train_compile_seconds',
    ):
      _finite_positive(r, key)
  assert 'skipped' in out['large']
  fed = out['pipeline_fed']  # the pipeline is tf.data: without TensorFlow, skipped with the reason
  assert 'TensorFlow is not installed' in fed['skipped'] and fed['host_cores'] >= 1


def test_train_step_on_real_jpegs_against_synthetic_batches(tmp_path):
  from bit.tools import input_speed

  folder = input_speed.make_jpeg_folder(tmp_path, num_images=12, num_classes=3, size=(60, 80))
  result = speed.run(**{**TINY, 'infer': False, 'pipeline': str(folder)})
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
    speed.run(**{**TINY, 'infer': False, 'pipeline': str(folder), 'num_classes': 2})


def test_the_suites_pipeline_fed_run_compares_the_real_pipeline_with_synthetic_batches():
  import dataclasses

  plan = dataclasses.replace(
    speed.CPU_PLAN, fed=('R26x1', 32, 'float32'), fed_images=12, fed_image_size=(60, 80), matmul_n=128
  )
  out = speed.pipeline_fed(plan, batch=4)
  assert (out['model'], out['size'], out['dtype'], out['batch']) == ('R26x1', 32, 'float32', 4)
  assert out['host_cores'] == len(os.sched_getaffinity(0)) and 'skipped' not in out
  for key in (
    'train_synthetic_loop_images_per_sec',
    'train_real_nocache_images_per_sec',
    'pipeline_images_per_sec',
  ):
    _finite_positive(out, key)
  assert out['train_real_nocache_over_synthetic'] == pytest.approx(
    out['train_real_nocache_images_per_sec'] / out['train_synthetic_loop_images_per_sec'], rel=0.01
  )
  assert out['images']['count'] == 12 and out['images']['crop'] == 32 and out['images']['train_size'] == 12


def test_compile_only_allocates_no_params_and_reports_compile_times(monkeypatch):
  net = models.create_model(TINY['model'], TINY['num_classes'])
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(models.param_shapes(net)))
  before = jax.live_arrays()  # held, so that their ids stay theirs
  known = {id(a) for a in before}
  new_bytes_at_compile = []
  compile_fn = jax.stages.Lowered.compile

  def compile_watched(self, *args, **kwargs):
    new_bytes_at_compile.append(sum(a.nbytes for a in jax.live_arrays() if id(a) not in known))
    return compile_fn(self, *args, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_watched)
  result = speed.run(**{**TINY, 'compile_only': True})
  assert len(new_bytes_at_compile) >= 2  # the train step and the forward pass, compiled from shapes
  # Every compile saw less than a tenth of the params' bytes alive on the devices: none were allocated.
  assert max(new_bytes_at_compile) < param_bytes / 10, (new_bytes_at_compile, param_bytes)
  _finite_positive(result, 'train_compile_seconds')
  _finite_positive(result, 'infer_compile_seconds')
  assert 'train_images_per_sec' not in result


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'devices': 64}, 'device'),
    ({'batch': 3, 'devices': 2}, 'split'),
    ({'batch': 4, 'accum_steps': 3}, 'accum-steps 3'),
    ({'dtype': 'float16'}, 'float16'),
    ({'fast_ops': 'fast'}, "--fast-ops='fast' is not one of auto, on, off"),
    ({'parallelism': 'dp'}, "--parallelism 'dp'"),
    ({'transfer': 'some'}, "--transfer 'some'"),
  ],
)
def test_bad_options_are_clear_errors(kwargs, match):
  with pytest.raises(BitError, match=match):
    speed.run(**{**TINY, **kwargs})


def test_cli_bad_option_exits_2_with_message(capsys):
  assert speed.main(['--model', 'R26x1', '--devices', '64']) == 2
  assert '--devices 64' in capsys.readouterr().err


def test_forward_flops_match_published_macs():
  # ResNet-50 at 224px: 4.1 GMACs; ResNet-101: 7.8 GMACs (the usual published figures).
  assert speed.forward_flops(models.ResNetV2(50, 1, 1000), 224) / 2e9 == pytest.approx(4.09, abs=0.02)
  assert speed.forward_flops(models.ResNetV2(101, 1, 1000), 224) / 2e9 == pytest.approx(7.80, abs=0.03)


def test_folded_inference_model_equals_the_training_model():
  model = models.create_model('R26x1', 5)
  # Random GroupNorm and head params too, so every standardized path shows in the output (from the shapes alone:
  # the model's compiled init would cost more than the test).
  rng = np.random.default_rng(5)
  params = jax.tree.map(
    lambda leaf: (leaf + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32), fast_params(model)
  )
  standardized = models.standardize_kernels(params)
  assert jax.tree_util.tree_structure(standardized) == jax.tree_util.tree_structure(params)
  kernel = np.asarray(standardized['block2']['unit01']['conv2']['kernel'])
  np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0, atol=1e-5)  # really standardized
  np.testing.assert_array_equal(
    standardized['head']['kernel'], params['head']['kernel']
  )  # the rest untouched
  x = jax.random.uniform(jax.random.PRNGKey(6), (2, 32, 32, 3), minval=-1, maxval=1)
  ref = jax.jit(model.apply)({'params': params}, x)
  out = jax.jit(model.clone(standardized=True).apply)({'params': standardized}, x)
  assert np.abs(np.asarray(ref)).max() > 1e-2
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
