"""Speed benchmark: train-step and inference throughput of a BiT ResNetV2 on this machine.

  python -m bit.benchmark --model R50x1 --size 128 --batch 16

prints progress to stderr and, last on stdout, one JSON line with (among others) `train_images_per_sec`,
`infer_images_per_sec` (steady state: compile excluded, every step blocked on), `compile_seconds`,
`peak_rss_mb`, `matmul_peak_gflops` (a float matmul measured in the same run, so the figures can be read
against what this CPU can do right now) and `train_peak_fraction` / `infer_peak_fraction`.

The train step is the real one in miniature: forward + backward + SGD with momentum 0.9 (optax), softmax
cross-entropy on one-hot labels, jitted with the state donated. Inference is the jitted forward pass, by
default on weights standardized once (`models.fold_for_inference`, what evaluation and prediction use); the
per-call standardization figure is reported too as `infer_unfolded_images_per_sec`.

The CPU is often shared: every figure is the median over `--steps` timed steps, and the matmul peak is
measured in the same process so that ratios stay comparable between runs. `host_malloc` and
`train_page_faults_per_step` show whether XLA's buffers are reused between steps (bit/malloc.py; compare
`BIT_MALLOC=system`).
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bit import malloc, models, xla
from bit.errors import BitError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


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
  """Achieved GFLOP/s of an n x n x n matmul (median of `repeats`): the practical peak of this CPU."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (n, n), dtype)
  b = jax.random.normal(key_b, (n, n), dtype)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  t = statistics.median(_timed(lambda: f(a, b), repeats))
  return 2 * n**3 / t / 1e9


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


def make_train_step(model: models.ResNetV2, learning_rate: float = 0.003):
  """(init_state, train_step): SGD momentum 0.9 + softmax CE, the shape of bit.train's real step."""
  tx = optax.sgd(learning_rate, momentum=0.9)

  def init_state(params):
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  def train_step(state, batch):
    def loss_fn(params):
      logits = model.apply({'params': params}, batch['image'])
      return jnp.mean(optax.softmax_cross_entropy(logits, batch['label']))

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, {'loss': loss}

  return init_state, train_step


def _shardings(devices: int):
  """(batch sharding, replicated sharding) over the first `devices` devices, or (None, None) for one."""
  if devices <= 1:
    return None, None
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), ('data',))
  P = jax.sharding.PartitionSpec
  return jax.sharding.NamedSharding(mesh, P('data')), jax.sharding.NamedSharding(mesh, P())


def run(
  model: str = 'R50x1',
  size: int = 128,
  batch: int = 16,
  dtype: str = 'float32',
  steps: int = 10,
  warmup: int = 2,
  devices: int = 1,
  num_classes: int = 1000,
  train: bool = True,
  infer: bool = True,
  matmul_n: int = 1024,
  pipeline: str | None = None,
  compile_only: bool = False,
) -> dict:
  """Runs the benchmark and returns its figures as a dict (what the CLI prints as JSON).

  `devices` > 1 splits the batch over that many JAX devices (data parallel, params replicated); on a CPU
  host that needs XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts. 0 means all.
  `pipeline`: a folder of JPEGs (ROOT/train/<class>/*.jpg) whose train-pipeline throughput is measured
  with bit.benchmark_data and compared with the train step's consumption ('generate': a temporary folder
  of generated real-size JPEGs); with `train`, the train step is also run on that pipeline's batches and
  compared with the same loop on synthetic batches (`_real_data_runs`).
  `compile_only`: compile the train step and the forward pass from shapes alone (nothing is allocated or
  run, so even R152x4 fits in memory) and report only the compile times.
  """
  if dtype not in DTYPES:
    raise BitError(f'--dtype {dtype!r}: use one of {sorted(DTYPES)}.')
  if steps < 1 or warmup < 0 or batch < 1:
    raise BitError(f'steps ({steps}) and batch ({batch}) must be >= 1 and warmup ({warmup}) >= 0.')
  n_dev = len(jax.devices()) if devices == 0 else devices
  if n_dev > len(jax.devices()):
    raise BitError(
      f'--devices {devices}: only {len(jax.devices())} JAX device(s). On a CPU host set '
      f'XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} before starting Python.'
    )
  if batch % n_dev:
    raise BitError(f'--batch {batch} does not split evenly over {n_dev} devices.')
  net = models.create_model(model, num_classes, dtype=DTYPES[dtype])
  result: dict[str, Any] = {
    'model': net.architecture,
    'size': size,
    'batch': batch,
    'dtype': dtype,
    'devices': n_dev,
    'steps': steps,
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'cpu_count': os.cpu_count(),
    'load_avg_1m': round(os.getloadavg()[0], 2),
    'host_malloc': dict(malloc.state),
  }
  _log(
    f'[bench] {net.architecture} {size}px batch {batch} {dtype} on {n_dev} {jax.default_backend()} device(s)'
  )
  result['matmul_peak_gflops'] = round(matmul_peak_gflops(matmul_n, dtype=DTYPES[dtype]), 2)
  _log(f'[bench] matmul peak {result["matmul_peak_gflops"]} GFLOP/s')

  if compile_only:
    return _compile_only(net, size, batch, result)
  folder, generated = pipeline, None
  if pipeline == 'generate':
    from bit import benchmark_data  # imported late: it pulls in TensorFlow

    # One folder of real-size JPEGs for both the train-on-real-data runs and the pipeline alone; removed when
    # `generated` goes (at the end of this function, or with it on an error).
    generated = tempfile.TemporaryDirectory(prefix='bit_bench_jpegs_')
    folder = str(benchmark_data.make_jpeg_folder(pathlib.Path(generated.name)))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, batch)]
  batch_sharding, replicated = _shardings(n_dev)
  put = (lambda x, s: jax.device_put(x, s)) if batch_sharding is not None else (lambda x, s: jnp.asarray(x))
  data = {'image': put(images, batch_sharding), 'label': put(labels, batch_sharding)}
  params = models.init_params(net, seed=0, image_size=min(size, 64))
  # A non-zero head so the gradients flow through the whole network as in a real run.
  params['head']['kernel'] = 0.01 * jax.random.normal(jax.random.PRNGKey(1), params['head']['kernel'].shape)
  if replicated is not None:
    params = jax.device_put(params, replicated)
  flops = forward_flops(net, size)
  result['forward_gflops_per_image'] = round(flops / 1e9, 3)
  peak = result['matmul_peak_gflops']
  compile_total = 0.0

  if train:
    init_state, train_step = make_train_step(net)
    state = jax.jit(init_state)(jax.tree_util.tree_map(jnp.copy, params))
    t0 = time.perf_counter()
    step = xla.jit(train_step, donate_argnums=0).lower(state, data).compile()
    result['train_compile_seconds'] = round(time.perf_counter() - t0, 2)
    compile_total += result['train_compile_seconds']
    _log(f'[bench] train step compiled in {result["train_compile_seconds"]} s')
    for _ in range(warmup):
      state, metrics = step(state, data)
    jax.block_until_ready(state)
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, data)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
    # Pages the kernel had to map (and zero) per step: near 0 when XLA's buffers are reused (bit/malloc.py).
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    result['train_page_faults_per_step'] = round(faults / steps)
    if not np.isfinite(float(metrics['loss'])):
      raise BitError(f'The benchmark train step produced a non-finite loss ({float(metrics["loss"])}).')
    t = statistics.median(times)
    result['train_step_seconds'] = round(t, 4)
    result['train_images_per_sec'] = round(batch / t, 2)
    # Backward ~ 2x forward (input and weight gradients): 3x the forward FLOPs per trained image.
    result['train_peak_fraction'] = round(3 * flops * batch / t / 1e9 / peak, 3)
    result['train_loss'] = round(float(metrics['loss']), 4)
    _log(f'[bench] train {result["train_images_per_sec"]} img/s (median step {t:.3f} s of {steps})')
    if folder:
      state = _real_data_runs(
        step, state, data, folder, result, batch, size, steps, warmup, put, batch_sharding
      )
      result['real_data']['folder'] = None if generated else folder
    del state, step

  if infer:
    for folded in (False, True):
      if folded:
        variables = {'params': models.fold_for_inference(params)}
        fwd_model = net.clone(folded=True)
      else:
        variables, fwd_model = {'params': params}, net
      t0 = time.perf_counter()
      fwd = xla.jit(lambda v, x, m=fwd_model: m.apply(v, x)).lower(variables, data['image']).compile()
      compile_s = time.perf_counter() - t0
      jax.block_until_ready(fwd(variables, data['image']))
      for _ in range(max(0, warmup - 1)):
        jax.block_until_ready(fwd(variables, data['image']))
      t = statistics.median(_timed(lambda f=fwd, v=variables: f(v, data['image']), steps))
      key = 'infer' if folded else 'infer_unfolded'
      result[f'{key}_compile_seconds'] = round(compile_s, 2)
      result[f'{key}_images_per_sec'] = round(batch / t, 2)
      result[f'{key}_peak_fraction'] = round(flops * batch / t / 1e9 / peak, 3)
      _log(f'[bench] {key.replace("_", " ")} {batch / t:.2f} img/s (compiled in {compile_s:.2f} s)')
    compile_total += result['infer_compile_seconds']

  result['compile_seconds'] = round(compile_total, 2)
  if folder:
    from bit import benchmark_data  # imported late: it pulls in TensorFlow

    ips = benchmark_data.pipeline_images_per_sec(folder, global_batch_size=batch, crop=size)
    result['pipeline_images_per_sec'] = round(float(ips), 2)
    if 'train_images_per_sec' in result:
      result['pipeline_over_train'] = round(float(ips) / result['train_images_per_sec'], 2)
  result['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  result['load_avg_1m_end'] = round(os.getloadavg()[0], 2)
  if generated is not None:
    generated.cleanup()
  return result


def _real_data_runs(step, state, synthetic, folder, result, batch, size, steps, warmup, put, sharding):
  """The same compiled train step fed by the real input pipeline, against the same loop on one synthetic batch.

  Like a real run (bit.train), the loop never fetches a step's results, and tf.data decodes and prefetches in
  its own threads while a step runs. The pipeline reads `folder` (ROOT/train/<class>/*.jpg); images are
  resized by the training rule for their size and cropped to `size`. Measured twice: with the decoded-image
  cache as configured (default: on for splits under 1 GB decoded) and with it off, when every step decodes its
  JPEGs. Records train_real[_nocache]_images_per_sec and their ratios to the synthetic loop.
  """
  from bit import data, data_sources, hyperrule  # imported late: TensorFlow

  num_classes = synthetic['label'].shape[-1]

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

  info = data.get_info(str(folder), train_split='train', test_split='train')
  resize, crop = hyperrule.train_resolution(info.image_size, crop=size)
  if info.num_classes > num_classes:
    raise BitError(f'{folder} has {info.num_classes} classes; use --classes {info.num_classes} or more.')
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
      b = next(batches)
      labels = np.zeros((batch, num_classes), np.float32)
      labels[:, : b['label'].shape[-1]] = b['label']
      return {'image': put(b['image'], sharding), 'label': put(labels, sharding)}

    ips = loop(next_batch)
    result[f'{key}_images_per_sec'] = round(ips, 2)
    result[f'{key}_over_synthetic'] = round(ips / synthetic_ips, 3)
    _log(
      f'[bench] train on {folder} ({resize}->{crop} px, cache {cache_gb}): {ips:.2f} img/s, '
      f'{ips / synthetic_ips:.3f} of the synthetic loop'
    )
  result['real_data'] = {
    'folder': str(folder),
    'resize': resize,
    'crop': crop,
    'train_size': info.train_size,
    'image_size': list(info.image_size),
  }
  return state


def _compile_only(net: models.ResNetV2, size: int, batch: int, result: dict) -> dict:
  """Compile times from abstract shapes: no parameter or activation is ever allocated."""
  f32 = jnp.float32
  params = models.param_shapes(net)
  data = {
    'image': jax.ShapeDtypeStruct((batch, size, size, 3), f32),
    'label': jax.ShapeDtypeStruct((batch, net.num_classes), f32),
  }
  init_state, train_step = make_train_step(net)
  state = jax.eval_shape(init_state, params)
  t0 = time.perf_counter()
  xla.jit(train_step, donate_argnums=0).lower(state, data).compile()
  result['train_compile_seconds'] = round(time.perf_counter() - t0, 2)
  _log(f'[bench] train step compiled in {result["train_compile_seconds"]} s')
  folded = net.clone(folded=True)
  t0 = time.perf_counter()
  xla.jit(lambda v, x: folded.apply(v, x)).lower({'params': params}, data['image']).compile()
  result['infer_compile_seconds'] = round(time.perf_counter() - t0, 2)
  _log(f'[bench] forward compiled in {result["infer_compile_seconds"]} s')
  result['compile_seconds'] = round(result['train_compile_seconds'] + result['infer_compile_seconds'], 2)
  result['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  return result


def main(argv=None) -> int:
  """The `python -m bit.benchmark` / `bit-bench` entry point."""
  ap = argparse.ArgumentParser(prog='bit-bench', description=__doc__.splitlines()[0])
  ap.add_argument('--model', default='R50x1', help='architecture, e.g. R50x1, R26x1, R152x4')
  ap.add_argument('--size', type=int, default=128, help='image side in pixels')
  ap.add_argument('--batch', type=int, default=16, help='global batch size')
  ap.add_argument('--dtype', default='float32', choices=sorted(DTYPES), help='compute dtype')
  ap.add_argument('--steps', type=int, default=10, help='timed steps (the median is reported)')
  ap.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  ap.add_argument('--devices', type=int, default=1, help='data-parallel devices (0 = all)')
  ap.add_argument('--classes', type=int, default=1000, help='head size')
  ap.add_argument('--no-train', action='store_true', help='skip the train step')
  ap.add_argument('--no-infer', action='store_true', help='skip inference')
  ap.add_argument('--matmul-n', type=int, default=1024, help='side of the peak-measuring matmul')
  ap.add_argument(
    '--pipeline', default=None, help="image folder (or 'generate'): also measure the input pipeline"
  )
  ap.add_argument('--compile-only', action='store_true', help='only compile (from shapes) and time that')
  a = ap.parse_args(argv)
  try:
    result = run(
      model=a.model,
      size=a.size,
      batch=a.batch,
      dtype=a.dtype,
      steps=a.steps,
      warmup=a.warmup,
      devices=a.devices,
      num_classes=a.classes,
      train=not a.no_train,
      infer=not a.no_infer,
      matmul_n=a.matmul_n,
      pipeline=a.pipeline,
      compile_only=a.compile_only,
    )
  except BitError as e:
    print(f'bit-bench: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
