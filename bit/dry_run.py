"""The memory plan of a training config, before the run: `bit-train ... --dry_run`.

`plan(config)` compiles the real train step of the config (`bit.train_setup.compiled_step`'s step: the same model,
optimizer, accumulation, remat and data parallelism) for the local devices from shapes alone
(`jax.eval_shape`, `jit(...).lower(...).compile()`): no data is read, no checkpoint is downloaded and no
device memory is allocated for the params. Per device it reports the params, the optimizer state, the
batch and XLA's temporary (activation) memory from `compiled.memory_analysis()`, their sum, the device
memory limit, whether the step fits and, when it does not, the smallest `accum_steps` and/or `remat` that
does. The figures are the compiled program's on this backend: a GPU or TPU compiles a different program,
so run the same command there for its figures.
"""

from __future__ import annotations

import os
import pathlib
import time
import zipfile
from typing import Any

import jax
import numpy as np

from bit import checkpoints, hyperrule, models, parallel
from bit.errors import BitError, ConfigError

GIB = 1024**3


def _npz_architecture(path: pathlib.Path) -> str:
  """The architecture of an official-layout .npz from its array headers (no array is read)."""
  shapes = {}
  try:
    with zipfile.ZipFile(path) as z:
      for name in z.namelist():
        if name.endswith('.npy'):
          with z.open(name) as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shapes[name[:-4]] = jax.ShapeDtypeStruct(read(f)[0], np.float32)
  except (OSError, zipfile.BadZipFile, ValueError) as e:
    raise BitError(f'{path} is not a readable .npz checkpoint ({e}).') from e
  depth, width, _ = checkpoints._infer(shapes, str(path))
  return models.architecture_name(depth, width)


def architecture(model: str) -> str:
  """'R50x1' for a registry name, a local official-layout .npz or an architecture name; nothing downloaded."""
  kind, what = checkpoints._resolve(model)
  if kind == 'registry':
    return what.architecture
  if kind == 'arch':
    return models.architecture_name(*models.parse_architecture(what))
  path = pathlib.Path(what).expanduser()
  if not path.is_file():
    raise BitError(f'config.model={model!r}: no file at {path}.')
  return _npz_architecture(path)


def _dataset_shapes(config, num_classes):
  """(num_classes, crop) from the flags and the config, else from local metadata (no example is read)."""
  crop = config.get('crop')
  image_size = None
  dataset = config.get('dataset')
  if num_classes is None and dataset and os.path.isdir(str(dataset)):
    split = pathlib.Path(str(dataset)) / str(config.get('train_split') or 'train').split('[')[0]
    if split.is_dir():
      num_classes = sum(1 for p in split.iterdir() if p.is_dir()) or None
  elif dataset and (num_classes is None or crop is None):
    try:
      from bit import data_sources

      features = data_sources._tfds_builder(str(dataset), config.get('data_dir')).info.features
      num_classes = num_classes or int(features['label'].num_classes)
      shape = features['image'].shape
      if shape[0] and shape[1]:
        image_size = (int(shape[0]), int(shape[1]))
    except Exception:  # noqa: BLE001 - not available here: the flags below say what to give
      pass
  if crop is None and image_size is not None:
    crop = hyperrule.train_resolution(image_size)[1]
  missing = [m for m, v in (('num_classes=N', num_classes), ('config.crop=PIXELS', crop)) if v is None]
  if missing:
    raise ConfigError(
      f'a dry run reads no data and cannot tell the {" and the ".join(m.split("=")[0] for m in missing)} '
      f'of config.dataset={dataset!r} here: give {" and ".join(missing)}, e.g. num_classes=1000 '
      'config.crop=480.'
    )
  if int(num_classes) < 1 or int(crop) < models.MIN_IMAGE_SIZE:
    raise ConfigError(f'num_classes= must be >= 1 and config.crop >= {models.MIN_IMAGE_SIZE}.')
  return int(num_classes), int(crop)


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _compiler_options(dp) -> dict:
  # The program is compiled only to read its memory and never runs: on CPU, LLVM's optimization level 0
  # halves the compile time and leaves XLA's HLO passes and buffer assignment, hence every figure, unchanged
  # (docs/long-runs.md). A GPU's or TPU's compile is left as it is: its figures must be the real program's.
  return {'xla_backend_optimization_level': 0} if dp.devices[0].platform == 'cpu' else {}


def measure(
  config: Any, arch: str, num_classes: int, crop: int, *, remat: str = 'none', accum_steps: int = 1
) -> dict[str, Any]:
  """Per-device bytes of one compiled train step: params, opt_state, batch, temp (shapes only)."""
  from bit import config as config_lib
  from bit.train_state import create_state, lr_schedule, train_step

  dp = parallel.DataParallel(config.parallelism, parallel.select_devices(config.get('num_devices', 0)))
  dp.check_batch(int(config.batch_size), int(accum_steps))
  model = models.create_model(arch, num_classes, models.DTYPES[config.dtype]).clone(remat=remat)
  params = models.param_shapes(model)
  transfer = config_lib.transfer_settings(config)
  supports = list(config.schedule) if config.get('schedule') else [1, 2, 3, 4, 5]  # no shape depends on it
  lr_fn = lr_schedule(supports, config.base_lr)
  state = jax.eval_shape(lambda p: create_state(model, p, lr_fn, accum_steps=accum_steps, **transfer), params)
  local = int(config.batch_size) // jax.process_count()
  per_device = int(config.batch_size) // dp.num_devices
  batch = {'image': ((local, crop, crop, 3), np.float32), 'label': ((local, num_classes), np.float32)}
  if dp.mode == 'pmap':
    n = dp.num_local_devices
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), state)
    batch = {k: jax.ShapeDtypeStruct((n, s[0] // n) + s[1:], d) for k, (s, d) in batch.items()}
  else:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rep, shard = NamedSharding(dp.mesh, P()), NamedSharding(dp.mesh, P(parallel.DATA_AXIS))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    batch = {
      k: jax.ShapeDtypeStruct((s[0] * jax.process_count(),) + s[1:], d, sharding=shard)
      for k, (s, d) in batch.items()
    }
  start = time.perf_counter()
  lowered = dp.wrap(train_step, donate=True).lower(state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile(compiler_options=_compiler_options(dp))
  seconds, lower_seconds = time.perf_counter() - start, lowered_at - start
  stats = compiled.memory_analysis()
  one = {'image': ((per_device, crop, crop, 3), np.float32), 'label': ((per_device, num_classes), np.float32)}
  out = {
    'remat': remat,
    'accum_steps': int(accum_steps),
    'params_bytes': _nbytes(params),
    'opt_state_bytes': _nbytes(
      jax.eval_shape(lambda p: create_state(model, p, lr_fn, **transfer).opt_state, params)
    ),
    'batch_bytes': sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in one.values()),
    'temp_bytes_per_device': int(stats.temp_size_in_bytes),
    'compile_s': round(seconds, 1),  # lowering included
    'lower_s': round(lower_seconds, 1),
  }
  out['bytes_per_device'] = (
    out['params_bytes'] + out['opt_state_bytes'] + out['batch_bytes'] + out['temp_bytes_per_device']
  )
  out['per_device_batch'] = per_device
  out['devices'] = dp.num_devices
  return out


def device_memory(device_memory_gb: float | None = None) -> tuple[int | None, str]:
  """(bytes, where the figure comes from): --device_memory_gb, else what the device reports, else (CPU) the
  host's memory shared by its devices."""
  if device_memory_gb:
    return int(float(device_memory_gb) * GIB), '--device_memory_gb'
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.platform} memory_stats()'
  if device.platform == 'cpu':
    try:
      total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
      return total // jax.local_device_count(), f'host memory / {jax.local_device_count()} CPU devices'
    except (ValueError, OSError):
      pass
  return None, 'unknown: give --device_memory_gb'


def _divisors(n: int) -> list[int]:
  return [k for k in range(2, n + 1) if n % k == 0]


def _suggest(config, arch, num_classes, crop, limit, first) -> dict | None:
  """The smallest accum_steps (then remat) that fits: each remat's temp memory is measured at its first
  accumulation, later ones estimated as (temp - gradients) / k + gradients, and the pick is compiled."""
  per_device = first['per_device_batch']
  for remat in ('none', 'unit', 'stage'):
    base = first if remat == first['remat'] else measure(config, arch, num_classes, crop, remat=remat)
    if base['bytes_per_device'] <= limit:
      return {'remat': remat, 'accum_steps': 1, 'bytes_per_device': base['bytes_per_device']}
    fixed = base['bytes_per_device'] - base['temp_bytes_per_device']
    grads = base['params_bytes']
    for k in _divisors(per_device):
      estimate = fixed + grads + max(base['temp_bytes_per_device'] - grads, 0) / k
      if estimate > limit:
        continue
      got = measure(config, arch, num_classes, crop, remat=remat, accum_steps=k)
      if got['bytes_per_device'] <= limit:
        return {'remat': remat, 'accum_steps': k, 'bytes_per_device': got['bytes_per_device']}
  return None


def plan(
  config: Any, *, num_classes: int | None = None, device_memory_gb: float | None = None
) -> dict[str, Any]:
  """The memory plan of `config` on the local devices (see the module docstring); a JSON-ready dict."""
  from bit import config as config_lib

  config_lib.check(config)
  arch = architecture(config.model)
  num_classes, crop = _dataset_shapes(config, num_classes)
  result = measure(
    config, arch, num_classes, crop, remat=config.get('remat', 'none'), accum_steps=int(config.accum_steps)
  )
  limit, source = device_memory(device_memory_gb)
  fits = None if limit is None else result['bytes_per_device'] <= limit
  suggest = None
  if fits is False:
    suggest = (
      _suggest(config, arch, num_classes, crop, limit, result)
      or 'nothing fits: use more devices or a smaller crop'
    )
  return {
    'model': str(config.model),
    'architecture': arch,
    'num_classes': num_classes,
    'crop': crop,
    'batch_size': int(config.batch_size),
    **result,
    'device_memory_bytes': limit,
    'device_memory_source': source,
    'fits': fits,
    'suggest': suggest,
  }


def format_plan(p: dict[str, Any]) -> str:
  """The plan as lines for people (the JSON object is printed after them)."""

  def gib(b):
    return f'{b / GIB:8.3f} GiB'

  rows = [
    f'{p["architecture"]} ({p["model"]}), {p["num_classes"]} classes, {p["crop"]} px, batch {p["batch_size"]} '
    f'= {p["per_device_batch"]} per device on {p["devices"]} device(s), accum_steps={p["accum_steps"]}, '
    f'remat={p["remat"]} (lowered and compiled in {p["compile_s"]} s)',
    f'  params           {gib(p["params_bytes"])}',
    f'  optimizer state  {gib(p["opt_state_bytes"])}',
    f'  batch            {gib(p["batch_bytes"])}',
    f'  XLA temporaries  {gib(p["temp_bytes_per_device"])}',
    f'  total per device {gib(p["bytes_per_device"])}',
  ]
  if p['device_memory_bytes'] is None:
    rows.append(f'  device memory    {p["device_memory_source"]}')
  else:
    rows.append(f'  device memory    {gib(p["device_memory_bytes"])} ({p["device_memory_source"]})')
    rows.append(f'  fits: {"yes" if p["fits"] else "no"}')
  s = p['suggest']
  if isinstance(s, dict):
    rows.append(
      f'  fits with --config.accum_steps={s["accum_steps"]} --config.remat={s["remat"]} '
      f'({s["bytes_per_device"] / GIB:.3f} GiB per device)'
    )
  elif s:
    rows.append(f'  {s}')
  return '\n'.join(rows)
