"""Speed benchmark: the real train step and inference of a BiT ResNetV2 on this machine, with MFU.

  python -m bit.tools.speed --model R50x1 --size 128 --batch 16
  python -m bit.tools.speed --suite accelerator          # the accelerator check: one JSON line (see `suite`)

prints progress to stderr and, last on stdout, one JSON line with (among others) `train_images_per_sec`,
`infer_images_per_sec` (steady state: compile excluded, every step blocked on), `compile_seconds`,
`peak_rss_mb`, `model_flops_per_image` (forward, 2 per multiply-add), `train_mfu` / `infer_mfu` (achieved
model FLOP/s, train = 3x forward, over the devices' peak: `peak_flops`, `peak_source`).

The train step is the one `bit.train.train_and_evaluate` runs, built the same way: `train_state.create_state`
(the BiT learning-rate schedule, the transfer mask of `--transfer`, `--accum-steps` micro-batches) and
`train_state.train_step` wrapped by `parallel.DataParallel` (`--parallelism`, donated state), fed through
`DataParallel.replicate`/`shard`. Inference is the jitted forward pass, by default on weights standardized
once (`models.Inference`, what evaluation and prediction use); the per-call standardization figure
is reported too as `infer_unfolded_images_per_sec`.

Peak: on CPU a float matmul measured in the same run (`matmul_peak_gflops`; the CPU is often shared, so the
ratios stay comparable between runs); on a GPU or TPU the dense peak of its `device_kind` and dtype from
`PEAK_FLOPS` (an unknown kind falls back to the measured matmul). `host_malloc` and
`train_page_faults_per_step` show whether XLA's buffers are reused between steps (bit/malloc.py; compare
`BIT_MALLOC=system`).

This module and `--suite accelerator` need neither TensorFlow nor TFDS nor ml_collections (only `--pipeline`
and the suite's pipeline-fed run import TensorFlow; without it that run is skipped and says why).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bit import freeze, hyperrule, malloc, models, ops, parallel, train_state, xla
from bit.errors import BitError

DTYPES = models.DTYPES
# The learning-rate schedule of a mid-size dataset (hyper-rule, 20k-500k examples) and BiT's base rate: the
# benchmark runs only its first steps, but the schedule is computed in the step as in a real run.
SUPPORTS = hyperrule.schedule(50_000)
BASE_LR = 0.003

# Dense (no sparsity) peak FLOP/s per device, by `device_kind` pattern and compute dtype. float32 on NVIDIA
# GPUs is the TF32 tensor-core figure (JAX's default matmul precision runs float32 convolutions and matmuls in
# TF32 there); on TPUs float32 matmuls run on the bf16 MXU at default precision, so both dtypes take its peak.
PEAK_FLOPS = (
  # (device_kind regex, {dtype: FLOP/s}, source)
  (r'H100(?!.*PCIe)', {'bfloat16': 989e12, 'float32': 495e12}, 'NVIDIA H100 SXM datasheet (dense)'),
  (r'H200', {'bfloat16': 989e12, 'float32': 495e12}, 'NVIDIA H200 SXM datasheet (dense)'),
  (r'A100', {'bfloat16': 312e12, 'float32': 156e12}, 'NVIDIA A100 datasheet (dense)'),
  (r'\bL4\b', {'bfloat16': 121e12, 'float32': 60e12}, 'NVIDIA L4 datasheet (dense)'),
  (r'TPU v4', {'bfloat16': 275e12, 'float32': 275e12}, 'Google Cloud TPU v4 docs (per chip)'),
  (r'TPU v5 ?lite|TPU v5e', {'bfloat16': 197e12, 'float32': 197e12}, 'Google Cloud TPU v5e docs (per chip)'),
  (r'TPU v5p|TPU v5$', {'bfloat16': 459e12, 'float32': 459e12}, 'Google Cloud TPU v5p docs (per chip)'),
  (r'TPU v6 ?lite|TPU v6e', {'bfloat16': 918e12, 'float32': 918e12}, 'Google Cloud TPU v6e docs (per chip)'),
)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _timed(fn, repeats: int) -> list[float]:
  """Wall-clock seconds of `repeats` calls of fn(), each blocked on."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def matmul_peak_gflops(n: int = 1024, repeats: int = 7, dtype: Any = jnp.float32) -> float:
  """Achieved GFLOP/s of an n x n x n matmul (median of `repeats`): the practical peak of this device."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (n, n), dtype)
  b = jax.random.normal(key_b, (n, n), dtype)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  t = statistics.median(_timed(lambda: f(a, b), repeats))
  return 2 * n**3 / t / 1e9


def table_peak_flops(device_kind: str, dtype: str) -> tuple[float, str] | None:
  """(dense peak FLOP/s of one device, source) from `PEAK_FLOPS`, or None for a kind not in the table."""
  for pattern, peaks, source in PEAK_FLOPS:
    if re.search(pattern, device_kind) and dtype in peaks:
      return peaks[dtype], source
  return None


def forward_flops(model: models.ResNetV2, size: int) -> float:
  """FLOPs of one image through the network (2 per multiply-add), counted from the conv/dense shapes."""
  depth, width = model.depth, model.width
  flops = 0.0
  h = (size + 6 - 7) // 2 + 1  # the root conv: 7x7/2 on a 3-padded image
  base = 64 * width
  flops += 2 * h * h * 7 * 7 * 3 * base
  h = (h + 2 - 3) // 2 + 1  # the max-pool
  cin = base
  for b, units in enumerate(models.BLOCKS[depth], 1):
    mid = base * 2 ** (b - 1)
    for u in range(units):
      stride = 2 if (b > 1 and u == 0) else 1
      h_out = (h + 2 - 3) // stride + 1
      flops += 2 * h * h * cin * mid  # conv1
      flops += 2 * h_out * h_out * 9 * mid * mid  # conv2
      flops += 2 * h_out * h_out * mid * 4 * mid  # conv3
      if u == 0:
        flops += 2 * h_out * h_out * cin * 4 * mid  # conv_proj
      h, cin = h_out, 4 * mid
  flops += 2 * cin * model.num_classes
  return flops


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `run` measures; `main` builds it from the command line's flags (the same names, dashes for '_').

  `devices` > 1 splits the batch over that many JAX devices (`parallelism`: 'shard_map' or 'pmap', as
  `config.parallelism`); on a CPU host that needs XLA_FLAGS=--xla_force_host_platform_device_count=N set
  before JAX starts. 0 means all. `accum_steps`, `transfer`, `unfreeze_stages`, `unfreeze_units` go to the
  real step's `create_state` as the same config keys do in a real run. `fast_ops` ('auto', 'on', 'off';
  None: `BIT_FAST_OPS`) is `bit.ops`'s switch for this run. `unfolded`: also time inference with the
  per-call weight standardization.
  `pipeline`: a folder of JPEGs (ROOT/train/<class>/*.jpg) whose train-pipeline throughput is measured
  with bit.tools.input_speed and compared with the train step's consumption ('generate': a temporary folder
  of generated real-size JPEGs); with `train`, the train step is also run on that pipeline's batches and
  compared with the same loop on synthetic batches (`_real_data_runs`).
  `compile_only`: compile the train step and the forward pass from shapes alone (nothing is allocated or
  run, so even R152x4 fits in memory) and report only the compile times.
  """

  model: str = 'R50x1'
  size: int = 128
  batch: int = 16
  dtype: str = 'float32'
  steps: int = 10
  warmup: int = 2
  devices: int = 1
  num_classes: int = 1000
  train: bool = True
  infer: bool = True
  matmul_n: int = 1024
  pipeline: str | None = None
  compile_only: bool = False
  parallelism: str = 'shard_map'
  accum_steps: int = 1
  fast_ops: str | None = None
  transfer: str = 'full'
  unfreeze_stages: int = 0
  unfreeze_units: int = 0
  unfolded: bool = True

  def check(self) -> int:
    """Validates the settings; returns the number of devices. BitError names the bad one (as its flag)."""
    if self.dtype not in DTYPES:
      raise BitError(f'--dtype {self.dtype!r}: use one of {sorted(DTYPES)}.')
    if self.parallelism not in parallel.MODES:
      raise BitError(f'--parallelism {self.parallelism!r}: use one of {", ".join(parallel.MODES)}.')
    steps, warmup, batch, accum = self.steps, self.warmup, self.batch, self.accum_steps
    if steps < 1 or warmup < 0 or batch < 1 or accum < 1:
      raise BitError(
        f'steps ({steps}), batch ({batch}) and accum-steps ({accum}) must be >= 1 and warmup ({warmup}) >= 0.'
      )
    n_dev = len(jax.devices()) if self.devices == 0 else self.devices
    if n_dev > len(jax.devices()):
      raise BitError(
        f'--devices {self.devices}: only {len(jax.devices())} JAX device(s). On a CPU host set '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} before starting Python.'
      )
    if batch % (n_dev * accum):
      raise BitError(
        f'--batch {batch} does not split evenly over {n_dev} devices x --accum-steps {accum}; '
        f'use a multiple of {n_dev * accum}.'
      )
    models.parse_architecture(self.model)
    if self.fast_ops is not None:
      ops._check_mode(self.fast_ops, '--fast-ops')
    if self.transfer not in freeze.MODES:
      raise BitError(f'--transfer {self.transfer!r}: use one of {", ".join(freeze.MODES)}.')
    return n_dev

  @property
  def transfer_settings(self) -> dict[str, Any]:
    """The `create_state` keywords of the transfer mode, as the config keys of a real run."""
    return {
      'transfer': self.transfer,
      'unfreeze_stages': self.unfreeze_stages,
      'unfreeze_units': self.unfreeze_units,
    }


@dataclasses.dataclass
class Bench:
  """What every measurement of one `run` shares: the model, the devices, a synthetic host batch, the params,
  and the FLOPs of one image and the devices' peak that MFU divides."""

  net: models.ResNetV2
  dp: parallel.DataParallel
  batch: int
  size: int
  host_batch: dict[str, Any]
  params: Any  # None with --compile-only
  transfer: dict[str, Any]
  accum_steps: int
  flops: float  # forward, one image
  peak_flops: float

  def mfu(self, images_per_sec: float, passes: int) -> float:
    """Model FLOP/s (`passes` x forward) over the peak of all devices."""
    return round(passes * self.flops * images_per_sec / self.peak_flops, 4)


def measure_peak(dtype: str, matmul_n: int, n_dev: int) -> dict[str, Any]:
  """`matmul_peak_gflops` (measured now), and `peak_flops` / `peak_source`: what the MFU divides by."""
  result = {'matmul_peak_gflops': round(matmul_peak_gflops(matmul_n, dtype=DTYPES[dtype]), 2)}
  _log(f'[speed] matmul peak {result["matmul_peak_gflops"]} GFLOP/s')
  kind = jax.devices()[0].device_kind
  table = None if jax.default_backend() == 'cpu' else table_peak_flops(kind, dtype)
  if table is not None:
    result['peak_flops'], result['peak_source'] = table[0] * n_dev, f'{table[1]}, x{n_dev} devices'
  else:
    # One matmul already uses every core of a CPU host, however many virtual devices it is split into.
    scale = 1 if jax.default_backend() == 'cpu' else n_dev
    result['peak_flops'] = result['matmul_peak_gflops'] * 1e9 * scale
    result['peak_source'] = f'measured {matmul_n}^3 matmul' + (f', x{n_dev} devices' if scale > 1 else '')
  return result


def prepare(settings: Settings, n_dev: int, peak_flops: float) -> Bench:
  """The model, the devices, a synthetic batch and (unless `compile_only`) random params of `settings`."""
  s = settings
  net = models.create_model(s.model, s.num_classes, dtype=DTYPES[s.dtype])
  dp = parallel.DataParallel(s.parallelism, parallel.select_devices(n_dev))
  rng = np.random.default_rng(0)
  host_batch = {
    'image': rng.uniform(-1, 1, (s.batch, s.size, s.size, 3)).astype(np.float32),
    'label': np.eye(s.num_classes, dtype=np.float32)[rng.integers(0, s.num_classes, s.batch)],
  }
  params = None if s.compile_only else _random_params(net)  # compile_only: the measurements use shapes alone
  flops = forward_flops(net, s.size)
  return Bench(
    net, dp, s.batch, s.size, host_batch, params, s.transfer_settings, s.accum_steps, flops, peak_flops
  )


def _random_params(net) -> dict[str, Any]:
  """Random float32 params from the shapes alone, on the host: the timings do not depend on the values, and
  compiling the model's init (`models.init_params`) cost as much as compiling the train step.

  Normal kernels (every convolution standardizes its weights, so any scale works), GroupNorm scales 1, biases
  0, and a small non-zero head so the gradients flow through the whole network as in a real run.
  """
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return np.ones(leaf.shape, np.float32)
    if 'bias' in name:
      return np.zeros(leaf.shape, np.float32)
    std = 0.01 if 'head' in name else 1.0
    return (std * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, models.param_shapes(net))


def real_train_step(b: Bench):
  """(device state, wrapped step): what `bit.train` builds, from the same functions."""
  lr_fn = train_state.lr_schedule(SUPPORTS, BASE_LR)
  params = jax.tree.map(np.asarray, b.params)
  state = train_state.create_state(b.net, params, lr_fn, accum_steps=b.accum_steps, **b.transfer)
  return b.dp.replicate(state), b.dp.wrap(train_state.train_step, donate=True)


def measure_train(b: Bench, steps: int, warmup: int) -> tuple[dict, Any, Any, Any]:
  """Train img/s, MFU, compile time and page faults of the real step: (its part of the result, the step, the
  device state, the device batch)."""
  dstate, step = real_train_step(b)
  data = b.dp.shard(b.host_batch)
  t0 = time.perf_counter()
  dstate, metrics = step(dstate, data)  # compiles
  jax.block_until_ready((dstate, metrics))
  first = time.perf_counter() - t0
  for _ in range(warmup):
    dstate, metrics = step(dstate, data)
  jax.block_until_ready(dstate)
  times = []
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    t0 = time.perf_counter()
    dstate, metrics = step(dstate, data)
    jax.block_until_ready((dstate, metrics))
    times.append(time.perf_counter() - t0)
  # Pages the kernel had to map (and zero) per step: near 0 when XLA's buffers are reused (bit/malloc.py).
  faults = round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps)
  loss = float(b.dp.unreplicate(metrics)['loss'])
  if not np.isfinite(loss):
    raise BitError(f'The benchmark train step produced a non-finite loss ({loss}).')
  t = statistics.median(times)
  mfu = b.mfu(b.batch / t, 3)  # backward ~ 2x forward
  result = {
    'train_page_faults_per_step': faults,
    'train_compile_seconds': round(max(first - t, 0.0), 2),  # the first call, less one steady step
    'train_step_seconds': round(t, 4),
    'train_images_per_sec': round(b.batch / t, 2),
    'train_mfu': mfu,
    'train_peak_fraction': mfu,
    'train_loss': round(loss, 4),
  }
  _log(
    f'[speed] train {result["train_images_per_sec"]} img/s, MFU {mfu} (median step {t:.3f} s '
    f'of {steps}; compiled in {result["train_compile_seconds"]} s)'
  )
  return result, step, dstate, data


def measure_infer(b: Bench, steps: int, warmup: int, standardized: bool) -> dict[str, Any]:
  """Inference img/s, MFU and compile seconds of the jitted forward pass (standardized: weights standardized once;
  keys `infer_*`, else `infer_unfolded_*`)."""
  replicated = NamedSharding(b.dp.mesh, P())
  images = jax.device_put(b.host_batch['image'], NamedSharding(b.dp.mesh, P(parallel.DATA_AXIS)))
  if standardized:
    inference = models.Inference(b.net)
    variables, forward = inference.prepare(b.params), inference
  else:
    variables, forward = b.params, lambda p, x, m=b.net: m.apply({'params': p}, x)
  variables = jax.device_put(variables, replicated)
  t0 = time.perf_counter()
  fwd = xla.jit(forward).lower(variables, images).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(max(1, warmup)):
    jax.block_until_ready(fwd(variables, images))
  t = statistics.median(_timed(lambda: fwd(variables, images), steps))
  key = 'infer' if standardized else 'infer_unfolded'
  mfu = b.mfu(b.batch / t, 1)
  _log(f'[speed] {key.replace("_", " ")} {b.batch / t:.2f} img/s (compiled in {compile_s:.2f} s)')
  return {
    f'{key}_compile_seconds': round(compile_s, 2),
    f'{key}_images_per_sec': round(b.batch / t, 2),
    f'{key}_mfu': mfu,
    f'{key}_peak_fraction': mfu,
  }


def measure_compile_only(b: Bench) -> dict[str, Any]:
  """Compile times from abstract shapes: no parameter or activation is ever allocated."""
  shapes = models.param_shapes(b.net)
  lr_fn = train_state.lr_schedule(SUPPORTS, BASE_LR)
  state = jax.eval_shape(
    lambda p: train_state.create_state(b.net, p, lr_fn, accum_steps=b.accum_steps, **b.transfer), shapes
  )
  data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.host_batch.items()}
  if b.dp.mode == 'pmap':
    n = b.dp.num_local_devices

    def stack(x):
      return jax.ShapeDtypeStruct((n,) + x.shape, x.dtype)

    state = jax.tree.map(stack, state)
    data = {k: jax.ShapeDtypeStruct((n, v.shape[0] // n) + v.shape[1:], v.dtype) for k, v in data.items()}
  step = b.dp.wrap(train_state.train_step, donate=True)
  t0 = time.perf_counter()
  step.lower(state, data).compile()
  train_s = round(time.perf_counter() - t0, 2)
  _log(f'[speed] train step compiled in {train_s} s')
  t0 = time.perf_counter()
  xla.jit(models.Inference(b.net)).lower(shapes, data['image']).compile()
  infer_s = round(time.perf_counter() - t0, 2)
  _log(f'[speed] forward compiled in {infer_s} s')
  return {
    'train_compile_seconds': train_s,
    'infer_compile_seconds': infer_s,
    'compile_seconds': round(train_s + infer_s, 2),
  }


def measure_pipeline(
  folder: str, batch: int, size: int, train_images_per_sec: float | None
) -> dict[str, Any]:
  """The input pipeline's img/s on `folder`, and its ratio to the train step's (when measured)."""
  from bit.tools import input_speed  # imported late: it pulls in TensorFlow

  ips = float(input_speed.pipeline_images_per_sec(folder, global_batch_size=batch, crop=size))
  result = {'pipeline_images_per_sec': round(ips, 2)}
  if train_images_per_sec:
    result['pipeline_over_train'] = round(ips / train_images_per_sec, 2)
  return result


def peak_device_memory() -> int | None:
  """The largest `peak_bytes_in_use` of the devices' memory stats, or None where the backend keeps none."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def run(settings: Settings | None = None, /, **fields) -> dict[str, Any]:
  """Runs the benchmark of `settings` (`Settings()` with `fields` replaced) and returns its figures as a dict
  (what the CLI prints as JSON): the settings, the machine, then each measurement's part."""
  s = dataclasses.replace(settings or Settings(), **fields)
  n_dev = s.check()
  with ops.fast_ops(s.fast_ops) if s.fast_ops is not None else contextlib.nullcontext():
    result: dict[str, Any] = {
      'model': models.architecture_name(*models.parse_architecture(s.model)),
      'size': s.size,
      'batch': s.batch,
      'dtype': s.dtype,
      'devices': n_dev,
      'parallelism': s.parallelism,
      'accum_steps': s.accum_steps,
      'fast_ops': ops.fast_ops_mode(),
      'fast_ops_used': sorted(op for op in ops.OPS if ops.use_fast(op)),
      **s.transfer_settings,
      'steps': s.steps,
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'jax': jax.__version__,
      'cpu_count': os.cpu_count(),
      'load_avg_1m': round(os.getloadavg()[0], 2),
      'host_malloc': dict(malloc.state),
    }
    _log(
      f'[speed] {result["model"]} {s.size}px batch {s.batch} {s.dtype} on {n_dev} {result["backend"]} device(s)'
    )
    if s.train and s.pipeline not in (None, 'generate') and not s.compile_only:
      _pipeline_info(s.pipeline, s.num_classes)  # a bad --classes fails before anything compiles
    result.update(measure_peak(s.dtype, s.matmul_n, n_dev))
    b = prepare(s, n_dev, result['peak_flops'])
    result['model_flops_per_image'] = float(b.flops)
    result['forward_gflops_per_image'] = round(b.flops / 1e9, 3)
    result.update(measure_compile_only(b) if s.compile_only else _measure(b, s))
    result['peak_device_memory_bytes'] = peak_device_memory()
    result['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result['load_avg_1m_end'] = round(os.getloadavg()[0], 2)
    result['peak_flops'] = float(result['peak_flops'])
  return result


def _measure(b: Bench, s: Settings) -> dict[str, Any]:
  """The train step (and on the pipeline's batches), inference and the pipeline alone, as `s` asks."""
  result: dict[str, Any] = {}
  folder, generated = s.pipeline, None
  if s.pipeline == 'generate':
    from bit.tools import input_speed  # imported late: it pulls in TensorFlow

    # One folder of real-size JPEGs for both the train-on-real-data runs and the pipeline alone.
    generated = tempfile.TemporaryDirectory(prefix='bit_bench_jpegs_')
    folder = str(input_speed.make_jpeg_folder(pathlib.Path(generated.name)))
  try:
    compile_total = 0.0
    if s.train:
      part, step, dstate, data = measure_train(b, s.steps, s.warmup)
      result.update(part)
      compile_total += part['train_compile_seconds']
      if folder:
        result.update(_real_data_runs(step, dstate, data, folder, b, s.steps, s.warmup))
        result['real_data']['folder'] = None if generated else folder
      del dstate, step
    if s.infer:
      if s.unfolded:
        result.update(measure_infer(b, s.steps, s.warmup, standardized=False))
      part = measure_infer(b, s.steps, s.warmup, standardized=True)
      result.update(part)
      compile_total += part['infer_compile_seconds']
    result['compile_seconds'] = round(compile_total, 2)
    if folder:
      result.update(measure_pipeline(folder, b.batch, b.size, result.get('train_images_per_sec')))
  finally:
    if generated is not None:
      generated.cleanup()
  return result


def _real_data_runs(step, state, synthetic, folder, b: Bench, steps: int, warmup: int) -> dict[str, Any]:
  """The same compiled train step fed by the real input pipeline, against the same loop on one synthetic batch.

  Like a real run (bit.train), the loop never fetches a step's results, and tf.data decodes and prefetches in
  its own threads while a step runs. The pipeline reads `folder` (ROOT/train/<class>/*.jpg); images are
  resized by the training rule for their size and cropped to `size`. Measured twice: with the decoded-image
  cache as configured (default: on for splits under 1 GB decoded) and with it off, when every step decodes its
  JPEGs. Returns train_real[_nocache]_images_per_sec and their ratios to the synthetic loop, and `real_data`.
  """
  from bit import data, data_sources  # imported late: TensorFlow

  result: dict[str, Any] = {}
  batch, size = b.batch, b.size
  num_classes = b.host_batch['label'].shape[-1]

  def loop(next_batch):
    nonlocal state
    for _ in range(warmup + 1):
      state, metrics = step(state, next_batch())
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, next_batch())
    jax.block_until_ready((state, metrics))
    return steps * batch / (time.perf_counter() - t0)

  info = _pipeline_info(folder, num_classes)
  resize, crop = hyperrule.train_resolution(info.image_size, crop=size)
  synthetic_ips = loop(lambda: synthetic)
  result['train_synthetic_loop_images_per_sec'] = round(synthetic_ips, 2)
  for key, cache_gb in (('train_real', None), ('train_real_nocache', 0.0)):
    data_sources.clear_cache()
    batches = data.train_iterator(
      str(folder),
      split='train',
      global_batch_size=batch,
      resize=resize,
      crop=crop,
      num_classes=info.num_classes,
      decoded_cache_gb=cache_gb,
    )

    def next_batch(batches=batches):
      x = next(batches)
      labels = np.zeros((batch, num_classes), np.float32)
      labels[:, : x['label'].shape[-1]] = x['label']
      return b.dp.shard({'image': x['image'], 'label': labels})

    ips = loop(next_batch)
    result[f'{key}_images_per_sec'] = round(ips, 2)
    result[f'{key}_over_synthetic'] = round(ips / synthetic_ips, 3)
    _log(
      f'[speed] train on {folder} ({resize}->{crop} px, cache {cache_gb}): {ips:.2f} img/s, '
      f'{ips / synthetic_ips:.3f} of the synthetic loop'
    )
  result['real_data'] = {
    'folder': str(folder),
    'resize': resize,
    'crop': crop,
    'train_size': info.train_size,
    'image_size': list(info.image_size),
  }
  return result


def _pipeline_info(folder, num_classes: int):
  """The folder's dataset info; BitError when it has more classes than the benchmark's head."""
  from bit import data  # imported late: TensorFlow

  info = data.get_info(str(folder), train_split='train', test_split='train')
  if info.num_classes > num_classes:
    raise BitError(f'{folder} has {info.num_classes} classes; use --classes {info.num_classes} or more.')
  return info


# --- the accelerator suite ----------------------------------------------------------------------------------

# Golden fixtures (tests/data/<name>: images, and the logits of an independent implementation of the random
# official-layout checkpoint `bit.testing.random_checkpoint` makes): name -> (depth, width, classes, seed).
GOLDEN = {'r26x1_s64': (26, 1, 5, 1), 'r50x1_s128': (50, 1, 10, 0)}
# The largest deviation from the golden logits each compute dtype meets (float32 at the highest matmul
# precision; bfloat16 has 8 bits of mantissa).
GOLDEN_TOLERANCE = {'float32': 1e-4, 'bfloat16': 0.25}


@dataclasses.dataclass(frozen=True)
class SuitePlan:
  golden: str
  model: str
  size: int
  batches: tuple[int, ...]  # tried in order: the first that fits is used
  dtypes: tuple[str, ...]
  modes: tuple[str, ...]
  steps: int
  warmup: int
  large: tuple[str, int] | None  # (model, size) trained at the largest batch that fits
  matmul_n: int
  # The train step fed by bit's input pipeline: (model, size, dtype), on `fed_images` generated JPEGs of
  # `fed_image_size` (h, w), at the batch the first runs found.
  fed: tuple[str, int, str] = ('R50x1', 224, 'bfloat16')
  fed_images: int = 512
  fed_image_size: tuple[int, int] = (375, 500)


ACCELERATOR_PLAN = SuitePlan(
  golden='r50x1_s128',
  model='R50x1',
  size=224,
  batches=(256, 128, 64, 32, 16, 8),
  dtypes=('float32', 'bfloat16'),
  modes=('auto', 'off'),
  steps=10,
  warmup=2,
  large=('R152x4', 480),
  matmul_n=4096,
)
# No accelerator: the same measurements, tiny, so that the command (and its test) runs in seconds on a CPU.
CPU_PLAN = SuitePlan(
  golden='r26x1_s64',
  model='R26x1',
  size=64,
  batches=(4,),
  dtypes=('float32',),
  modes=('auto', 'off'),
  steps=2,
  warmup=1,
  large=None,
  matmul_n=256,
  fed=('R26x1', 64, 'float32'),
  fed_images=16,
  fed_image_size=(90, 120),
)
_RUN_KEYS = (
  'model',
  'size',
  'batch',
  'dtype',
  'fast_ops',
  'fast_ops_used',
  'train_images_per_sec',
  'train_mfu',
  'train_compile_seconds',
  'infer_images_per_sec',
  'infer_mfu',
  'infer_compile_seconds',
  'peak_device_memory_bytes',
  'peak_flops',
  'peak_source',
)


def golden_check(name: str) -> dict[str, Any]:
  """Max |logits - golden| on the default device, float32 (highest precision) and bfloat16, with pass flags.

  The checkpoint is rebuilt from its seed (`bit.testing.random_checkpoint`); the images and the golden logits
  are files of a source checkout (tests/data/<name>), read only where that tree exists.
  """
  case = pathlib.Path(__file__).resolve().parents[2] / 'tests' / 'data' / name
  if not (case / 'logits.npy').exists():
    return {'fixture': name, 'skipped': f'{case} not found: the check needs a source checkout of bit'}
  from bit import checkpoints, testing  # noqa: PLC0415 - only for the check

  depth, width, classes, seed = GOLDEN[name]
  _, _, _, params = checkpoints.npz_to_params(
    testing.random_checkpoint(depth, width, classes, seed), source=name
  )
  images, golden = np.load(case / 'images.npy'), np.load(case / 'logits.npy')
  out: dict[str, Any] = {'fixture': name}
  for dtype, tol in GOLDEN_TOLERANCE.items():
    net = models.ResNetV2(depth, width, classes, dtype=DTYPES[dtype])
    with jax.default_matmul_precision('highest'):
      logits = np.asarray(jax.jit(lambda p, x, n=net: n.apply({'params': p}, x))(params, images))
    err = float(np.max(np.abs(logits - golden)))
    out[dtype] = {
      'max_abs_error': err,
      'tolerance': tol,
      'ok': err <= tol and bool(np.array_equal(logits.argmax(-1), golden.argmax(-1))),
    }
  return out


def _out_of_memory(e: Exception) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text


def _largest_batch(batches, measure) -> tuple[int, dict]:
  """(batch, result) of `measure(batch)` for the first of `batches` that does not run out of memory."""
  for i, b in enumerate(batches):
    try:
      return b, measure(b)
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory error has no narrower public type
      if not _out_of_memory(e) or i == len(batches) - 1:
        raise
      _log(f'[suite] batch {b} does not fit ({str(e).splitlines()[0][:120]}); trying {batches[i + 1]}')
  raise AssertionError('unreachable')


def pipeline_fed(plan: SuitePlan, batch: int) -> dict[str, Any]:
  """The plan's train step (`plan.fed`) fed by bit's input pipeline from generated real-size JPEGs, against the
  same loop on one synthetic batch (`_real_data_runs`): `train_real_nocache_over_synthetic` near 1 means the
  host decodes fast enough for this device; with the host's cores (the affinity mask) that did it.

  Skipped, with the reason, where TensorFlow is not installed: bit's input pipeline is tf.data.
  """
  from bit.tools import input_speed  # numpy only at import: TensorFlow comes with the pipeline

  model, size, dtype = plan.fed
  out: dict[str, Any] = {'model': model, 'size': size, 'dtype': dtype, 'batch': batch}
  out['host_cores'] = input_speed.cores()
  try:
    import tensorflow  # noqa: F401, PLC0415 - only to know whether the pipeline can run here
  except ImportError:
    out['skipped'] = "TensorFlow is not installed here, and bit's input pipeline is tf.data"
    return out
  with tempfile.TemporaryDirectory(prefix='bit_suite_jpegs_') as tmp:
    folder = input_speed.make_jpeg_folder(tmp, num_images=plan.fed_images, size=plan.fed_image_size)
    r = run(
      model=model,
      size=size,
      batch=batch,
      dtype=dtype,
      steps=plan.steps,
      warmup=plan.warmup,
      infer=False,
      pipeline=str(folder),
      matmul_n=plan.matmul_n,
    )
  keys = (
    'train_images_per_sec',
    'train_synthetic_loop_images_per_sec',
    'train_real_images_per_sec',
    'train_real_over_synthetic',
    'train_real_nocache_images_per_sec',
    'train_real_nocache_over_synthetic',
    'pipeline_images_per_sec',
    'pipeline_over_train',
  )
  out.update({k: r.get(k) for k in keys})
  out['images'] = {'count': plan.fed_images, 'size': list(plan.fed_image_size), **r['real_data']}
  out['images'].pop('folder', None)
  return out


def suite(name: str = 'accelerator') -> dict[str, Any]:
  """`--suite accelerator`: the check to run on a machine with a GPU or TPU, as one dict (printed as JSON).

  Logits against the golden fixtures (float32 and bfloat16); R50x1 at 224 px train and inference img/s and
  MFU, float32 and bfloat16, fast ops auto and off, at the largest per-device batch up to 256 that fits;
  compile seconds; peak device memory; R152x4 at 480 px train img/s at the largest batch that fits; R50x1 224
  px bfloat16 trained from generated real-size JPEGs through bit's input pipeline against synthetic batches,
  with the host's cores (`pipeline_fed`: skipped where TensorFlow is absent). Without
  an accelerator it runs a tiny version (R26x1, 64 px, float32) and says so (`"backend": "cpu"`, `note`).
  """
  if name != 'accelerator':
    raise BitError(f'--suite {name!r}: the only suite is "accelerator".')
  t0 = time.perf_counter()
  backend = jax.default_backend()
  plan = CPU_PLAN if backend == 'cpu' else ACCELERATOR_PLAN
  out: dict[str, Any] = {
    'suite': name,
    'backend': backend,
    'device_kind': jax.devices()[0].device_kind,
    'device_count': jax.device_count(),
    'jax': jax.__version__,
  }
  if backend == 'cpu':
    out['note'] = 'no GPU or TPU here: the tiny CPU version (R26x1, 64 px, float32)'
  _log(f'[suite] {name} on {out["device_kind"]} ({backend}): golden logits {plan.golden}')
  out['golden'] = golden_check(plan.golden)
  common = dict(
    model=plan.model, size=plan.size, steps=plan.steps, warmup=plan.warmup, matmul_n=plan.matmul_n
  )
  runs, batch = [], None
  for dtype in plan.dtypes:
    for mode in plan.modes:
      with ops.fast_ops(mode, retrace=False):
        used = [op for op in ops.OPS if ops.use_fast(op)]
      if mode != 'auto' and runs and used == runs[-1]['fast_ops_used']:
        runs.append({'dtype': dtype, 'fast_ops': mode, 'same_as': 'auto', 'fast_ops_used': used})
        continue  # e.g. 'off' on a GPU, where 'auto' already takes every reference

      def measure(b, dtype=dtype, mode=mode):
        return run(**common, batch=b, dtype=dtype, fast_ops=mode, unfolded=False)

      if batch is None:
        batch, r = _largest_batch(plan.batches, measure)
      else:
        r = measure(batch)
      runs.append({k: r.get(k) for k in _RUN_KEYS})
  out['runs'] = runs
  if plan.large is not None:
    model, size = plan.large

    def measure_large(b):
      return run(
        model=model, size=size, batch=b, dtype='bfloat16', steps=3, warmup=1, infer=False, matmul_n=256
      )

    _, r = _largest_batch((64, 32, 16, 8, 4, 2, 1), measure_large)
    out['large'] = {k: r.get(k) for k in _RUN_KEYS if not k.startswith('infer')}
  else:
    out['large'] = {'skipped': 'R152x4 at 480 px runs on a GPU or TPU only'}
  _log(f'[suite] {plan.fed[0]} {plan.fed[1]} px {plan.fed[2]} fed by the input pipeline, batch {batch}')
  out['pipeline_fed'] = pipeline_fed(plan, batch)
  out['peak_device_memory_bytes'] = peak_device_memory()
  out['seconds'] = round(time.perf_counter() - t0, 1)
  return out


def main(argv: Any = None) -> int:
  """The `python -m bit.tools.speed` entry point."""
  ap = argparse.ArgumentParser(prog='python -m bit.tools.speed', description=__doc__.splitlines()[0])
  ap.add_argument('--model', default='R50x1', help='architecture, e.g. R50x1, R26x1, R152x4')
  ap.add_argument('--size', type=int, default=128, help='image side in pixels')
  ap.add_argument('--batch', type=int, default=16, help='global batch size')
  ap.add_argument('--dtype', default='float32', choices=sorted(DTYPES), help='compute dtype')
  ap.add_argument('--steps', type=int, default=10, help='timed steps (the median is reported)')
  ap.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  ap.add_argument('--devices', type=int, default=1, help='data-parallel devices (0 = all)')
  ap.add_argument('--parallelism', default='shard_map', choices=parallel.MODES, help='as config.parallelism')
  ap.add_argument('--accum-steps', type=int, default=1, help='micro-batches per step, as config.accum_steps')
  ap.add_argument(
    '--fast-ops', default=None, choices=ops.MODES, help='bit.ops switch (default: BIT_FAST_OPS)'
  )
  ap.add_argument('--transfer', default='full', choices=freeze.MODES, help='as config.transfer')
  ap.add_argument('--unfreeze-stages', type=int, default=0, help='with --transfer partial')
  ap.add_argument('--unfreeze-units', type=int, default=0, help='with --transfer partial')
  ap.add_argument('--classes', type=int, default=1000, help='head size')
  ap.add_argument('--no-train', action='store_true', help='skip the train step')
  ap.add_argument('--no-infer', action='store_true', help='skip inference')
  ap.add_argument('--matmul-n', type=int, default=1024, help='side of the peak-measuring matmul')
  ap.add_argument(
    '--pipeline', default=None, help="image folder (or 'generate'): also measure the input pipeline"
  )
  ap.add_argument('--compile-only', action='store_true', help='only compile (from shapes) and time that')
  ap.add_argument('--suite', default=None, choices=('accelerator',), help='run a whole suite instead')
  a = ap.parse_args(argv)
  from bit import runtime

  runtime.configure_tool()  # as every tool: the CPU runtime settings before JAX's backend starts
  try:
    if a.suite:
      result = suite(a.suite)
    else:
      fields = {f.name for f in dataclasses.fields(Settings)}
      flags = {'num_classes': a.classes, 'train': not a.no_train, 'infer': not a.no_infer}
      result = run(Settings(**{k: v for k, v in vars(a).items() if k in fields}, **flags))
  except BitError as e:
    print(f'{ap.prog}: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
