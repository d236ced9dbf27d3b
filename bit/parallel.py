"""Data parallelism: the device mesh, multi-host start-up, and the two ways of running one per-device step.

A step is written once, for one device, and reduces across devices with collectives over the axis named
`DATA_AXIS` (`lax.pmean`, `lax.psum`). `DataParallel.wrap` runs it on every device:

- `'shard_map'` (default): `jax.shard_map` under `jax.jit` over a 1-D `('data',)` mesh of all devices. The
  state is a replicated global `jax.Array`, the batch is sharded along its first axis.
- `'pmap'`: `jax.pmap` over the local devices with the same axis name. The state carries a leading axis
  of one copy per local device, the batch is reshaped to (local devices, per-device batch, ...).

Either way the caller gives and gets host-side (numpy) trees through `replicate`, `shard` and `unreplicate`,
so the training loop does not care which one runs. In a multi-process run each process feeds only its slice
of the global batch (`jax.make_array_from_process_local_data`); collectives span every device of every
process.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bit import xla
from bit.errors import ConfigError

DATA_AXIS = 'data'
MODES = ('shard_map', 'pmap')


def data_mesh(devices: Any) -> Mesh:
  """The 1-D mesh over `devices` along `DATA_AXIS` that every data-parallel computation of bit uses."""
  return Mesh(np.array(list(devices)), (DATA_AXIS,))


# JAX warns when a donated input buffer could not be reused for an output. On a GPU or TPU that is memory the
# step holds twice, so the warning stays; on CPU it is only noise, so it is silenced there, and only around
# the calls of the functions `DataParallel.wrap` returns (never process-wide).
_DONATION_WARNING = 'Some donated buffers were not usable'


def _without_donation_warning(fn):
  """`fn` (and its `.lower`) with the donation warning silenced while it runs."""

  def quiet(f):
    @functools.wraps(f)
    def call(*args, **kwargs):
      with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=_DONATION_WARNING)
        return f(*args, **kwargs)

    return call

  wrapped = quiet(fn)
  wrapped.lower = quiet(fn.lower)
  return wrapped


# --- joining a multi-process run -------------------------------------------------------------------------

DISTRIBUTED = ('auto', 'off')

# What SLURM, Open MPI and Kubernetes set in every task, as jax's cluster detection reads them
# (jax/_src/clusters/*.py): (kind, the variable whose presence means "a task of a cluster job",
# the variables jax needs then, the process-count variable).
_SLURM_NEEDS = ('SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
_OMPI_NEEDS = ('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK')


@dataclasses.dataclass(frozen=True)
class Cluster:
  """What `initialize_distributed` found and did. True when this process joined a multi-process run.

  `kind`: 'flags' (the three arguments or JAX_COORDINATOR_ADDRESS & co.), 'slurm', 'ompi', 'tpu', 'k8s', or
  'none' (no cluster: one process). `num_processes` / `process_id` are what the environment says (None for
  TPU and Kubernetes, which jax asks itself); after joining, `jax.process_count()` is the truth.
  """

  kind: str = 'none'
  num_processes: int | None = 1
  process_id: int | None = 0
  joined: bool = False
  note: str = ''

  def __bool__(self) -> bool:
    return self.joined

  def describe(self) -> str:
    """The start line: 'cluster: slurm (job 42), process 1 of 2, 2 local devices (cpu)'."""
    note = f' ({self.note})' if self.note else ''
    local = jax.local_devices()
    return (
      f'cluster: {self.kind}{note}, process {jax.process_index()} of {jax.process_count()}, '
      f'{len(local)} local device{"s" if len(local) != 1 else ""} ({local[0].platform})'
    )


def _ints(env: Mapping[str, str], names: tuple[str, ...], kind: str) -> dict[str, int]:
  missing = [n for n in names if not env.get(n)]
  if missing:
    raise ConfigError(
      f'A {kind} task without {", ".join(missing)} in its environment: jax cannot tell the processes of the '
      f'run apart. Launch with srun/mpirun as usual (which set them), set them, pass --coordinator_address '
      '--num_processes --process_id, or --distributed=off for one process.'
    )
  out = {}
  for n in names:
    if n == 'SLURM_STEP_NODELIST':
      continue
    try:
      out[n] = int(env[n].split('(')[0])  # SLURM_NTASKS may read '4(x2)' in some versions
    except ValueError:
      raise ConfigError(f'{n}={env[n]!r} in the {kind} environment is not an integer.') from None
  return out


def detect_cluster(environ: Mapping[str, str] | None = None) -> Cluster:
  """The cluster this process runs in, from its environment alone (the rules of jax's own detection).

  - SLURM: SLURM_JOB_ID and a job step (SLURM_STEP_ID or SLURM_STEP_NODELIST: a task started by srun); then
    SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID must all be set. A batch script or an
    salloc shell outside srun is one process.
  - Open MPI: OMPI_MCA_orte_hnp_uri (mpirun/mpiexec of Open MPI < 5), with OMPI_COMM_WORLD_SIZE, _RANK and
    _LOCAL_RANK. Open MPI 5 sets no coordinator jax can read: an error asking for the flags.
  - Cloud TPU VM with more than one worker (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES on GKE, the
    metadata server on GCE): 'tpu'.
  - Kubernetes indexed Job (KUBERNETES_SERVICE_HOST and JOB_COMPLETION_INDEX): 'k8s' (needs jax[k8s]).
  One task (SLURM_NTASKS=1, a one-rank mpirun, a one-worker TPU VM) is one process. ConfigError for a
  partial environment, naming what is missing.
  """
  env = os.environ if environ is None else environ
  if 'SLURM_JOB_ID' in env and ('SLURM_STEP_ID' in env or 'SLURM_STEP_NODELIST' in env):
    v = _ints(env, _SLURM_NEEDS, 'SLURM')
    n, i = v['SLURM_NTASKS'], v['SLURM_PROCID']
    if not 0 <= i < n:
      raise ConfigError(f'SLURM_PROCID={i} is not a task of SLURM_NTASKS={n}.')
    return Cluster('slurm', n, i, note=f'job {env["SLURM_JOB_ID"]}')
  if 'OMPI_MCA_orte_hnp_uri' in env:
    v = _ints(env, _OMPI_NEEDS, 'Open MPI')
    return Cluster('ompi', v['OMPI_COMM_WORLD_SIZE'], v['OMPI_COMM_WORLD_RANK'])
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    raise ConfigError(
      f'An Open MPI run of {env["OMPI_COMM_WORLD_SIZE"]} ranks without OMPI_MCA_orte_hnp_uri (Open MPI 5 or '
      'later): jax cannot find the coordinator. Pass --coordinator_address=HOST_OF_RANK_0:PORT '
      '--num_processes=$OMPI_COMM_WORLD_SIZE --process_id=$OMPI_COMM_WORLD_RANK.'
    )
  if 'KUBERNETES_SERVICE_HOST' in env and 'JOB_COMPLETION_INDEX' in env:
    import importlib.util

    if importlib.util.find_spec('kubernetes') is None:
      raise ConfigError(
        'A Kubernetes indexed Job (JOB_COMPLETION_INDEX is set), but the kubernetes package that jax uses '
        'to find the other pods is not installed: pip install "jax[k8s]", or pass the three flags.'
      )
    return Cluster('k8s', None, None)
  workers = _tpu_workers()
  if workers is not None and workers > 1:
    return Cluster('tpu', workers, None)
  return Cluster()


def _tpu_workers() -> int | None:
  """The number of processes of this Cloud TPU slice, or None when this is no Cloud TPU VM."""
  try:
    from jax._src import cloud_tpu_init
    from jax._src.clusters import cloud_tpu_cluster
  except ImportError:  # another jax layout: no TPU detection, flags still work
    return None
  if not cloud_tpu_init.running_in_cloud_tpu_vm:
    return None
  for env in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
    if env.is_env_present():
      return env.get_process_count()
  return None


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  distributed: str = 'auto',
) -> Cluster:
  """Joins a multi-process run with `jax.distributed.initialize`; the result is true if one was joined.

  Arguments win over the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). With
  neither and `distributed='auto'`, the cluster `detect_cluster` finds is joined (SLURM, Open MPI, a TPU pod
  slice, a Kubernetes indexed Job) the way `jax.distributed.initialize()` joins it; outside one, or in a
  one-task job, this is a single-process run and nothing happens. `distributed='off'` skips the detection.
  Must run before anything touches the devices. On CPU the collectives across processes go through gloo.
  `result.describe()` is the line to print.
  """
  if distributed not in DISTRIBUTED:
    raise ConfigError(f'distributed={distributed!r} is not one of {", ".join(DISTRIBUTED)}.')
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  if num_processes is None and os.environ.get('JAX_NUM_PROCESSES'):
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and os.environ.get('JAX_PROCESS_ID'):
    process_id = int(os.environ['JAX_PROCESS_ID'])
  if coordinator_address is None and num_processes is None and process_id is None:
    if distributed == 'off':
      return Cluster(note='detection off')
    found = detect_cluster()
    if found.kind == 'none' or found.num_processes == 1:
      return found
    if not jax.distributed.is_initialized():
      _use_gloo_on_cpu()
      # SLURM and Open MPI by name, so that a SLURM job started with mpirun is read as what we reported.
      method = found.kind if found.kind in ('slurm', 'ompi') else None
      jax.distributed.initialize(cluster_detection_method=method)
    return dataclasses.replace(found, joined=True)
  if coordinator_address is None or num_processes is None or process_id is None:
    raise ConfigError(
      'A multi-process run needs all three of coordinator_address= (host:port of process 0), '
      f'num_processes= and process_id=; got coordinator_address={coordinator_address!r}, '
      f'num_processes={num_processes!r}, process_id={process_id!r}.'
    )
  if not 0 <= int(process_id) < int(num_processes):
    raise ConfigError(f'process_id= must be in [0, {num_processes}), got {process_id}.')
  joined = Cluster('flags', int(num_processes), int(process_id), joined=True)
  if jax.distributed.is_initialized():
    return joined
  _use_gloo_on_cpu()
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=int(num_processes),
    process_id=int(process_id),
  )
  return joined


def _use_gloo_on_cpu() -> None:
  # gloo is jax's CPU default today; set it explicitly so CPU-only clusters keep working if that changes.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def select_devices(num_devices: int = 0) -> list[Any]:
  """All devices (0), or the first `num_devices` of a single-process run (for tests and debugging)."""
  devices = jax.devices()
  if not num_devices:
    return devices
  if jax.process_count() > 1 and num_devices != len(devices):
    raise ConfigError(
      f'config.num_devices={num_devices} cannot pick devices in a {jax.process_count()}-process run; '
      'set it to 0 to use all devices.'
    )
  if not 0 < num_devices <= len(devices):
    raise ConfigError(
      f'config.num_devices={num_devices} but {len(devices)} devices are available; '
      f'set it to 0 (all) or a number in 1..{len(devices)}.'
    )
  return devices[:num_devices]


class DataParallel:
  """Runs per-device functions over a 1-D data mesh with `shard_map` (default) or `pmap`."""

  def __init__(self, mode: str = 'shard_map', devices: Any = None) -> None:
    if mode not in MODES:
      raise ConfigError(
        f'config.parallelism={mode!r} is not one of {MODES}; use config.parallelism=shard_map.'
      )
    self.mode = mode
    self.devices: list[Any] = list(devices) if devices is not None else jax.devices()
    self.local_devices: list[Any] = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh: Any = data_mesh(self.devices)
    # pmap only ever sees this process's devices; its arrays are stacked along a leading device axis.
    self._local_mesh = data_mesh(self.local_devices)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def num_local_devices(self) -> int:
    return len(self.local_devices)

  def check_batch(self, global_batch_size: int, accum_steps: int = 1, key: str = 'batch_size') -> None:
    """ConfigError unless the global batch splits evenly over processes, devices and micro-batches."""
    n = self.num_devices * accum_steps
    if global_batch_size <= 0 or global_batch_size % n:
      what = f'{self.num_devices} devices' + (f' x accum_steps={accum_steps}' if accum_steps > 1 else '')
      multiple = n * max(1, round(max(global_batch_size, 1) / n))
      raise ConfigError(
        f'config.{key}={global_batch_size} does not divide over {what}; use a multiple of {n}, '
        f'e.g. config.{key}={multiple}.'
      )

  def replicate(self, tree: Any) -> Any:
    """A host tree (the same on every process) -> one copy on every device, ready for `wrap`'s functions."""
    if self.mode == 'pmap':
      n = self.num_local_devices
      sharding = NamedSharding(self._local_mesh, P(DATA_AXIS))
      return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding), tree
      )
    sharding = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)

  def shard(self, local_batch: Any) -> Any:
    """This process's slice of a global batch (numpy, leading batch axis) -> the device batch."""
    if self.mode == 'pmap':
      n = self.num_local_devices
      sharding = NamedSharding(self._local_mesh, P(DATA_AXIS))
      return jax.tree.map(
        lambda x: jax.device_put(np.reshape(x, (n, x.shape[0] // n) + x.shape[1:]), sharding), local_batch
      )
    sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )

  def unreplicate(self, tree: Any) -> Any:
    """A replicated device tree -> one host (numpy) copy, read from this process's first device."""

    def get(x):
      x = np.asarray(x.addressable_shards[0].data)
      return x[0] if self.mode == 'pmap' else x

    return jax.tree.map(get, tree)

  def wrap(self, fn: Any, *, donate: bool = False, extra_inputs: int = 0) -> Any:
    """Runs `fn(replicated, batch, *extra) -> replicated outputs` on every device.

    `fn` is written for one device and must reduce its outputs over `DATA_AXIS` itself (pmean/psum), so
    they are the same on every device. `donate` hands the first argument's buffers to the outputs.
    `extra_inputs` more arguments follow the batch: replicated like the first (`replicate`) and never
    donated, so they stay valid from call to call (e.g. a distillation teacher's params).
    """
    donate_argnums = (0,) if donate else ()
    if self.mode == 'pmap':
      # pmap maps over local devices; the axis still spans every device of every process.
      wrapped = jax.pmap(fn, axis_name=DATA_AXIS, devices=self.devices, donate_argnums=donate_argnums)
    else:
      # check_vma=False: fn is also the body of pmap, so it cannot carry shard_map's varying-axis
      # annotations; replication of the outputs is guaranteed by fn's own collectives.
      in_specs = (P(), P(DATA_AXIS)) + (P(),) * int(extra_inputs)
      mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
      wrapped = xla.jit(mapped, donate_argnums=donate_argnums)
    if donate and all(d.platform == 'cpu' for d in self.devices):
      wrapped = _without_donation_warning(wrapped)
    return wrapped


def prefetch_to_device(batches: Iterable[Any], put: Callable[[Any], Any], size: int = 2) -> Iterator[Any]:
  """Yields `put(batch)` for every batch of `batches`, in order, with `size` batches already put ahead.

  `put` (e.g. `DataParallel.shard`) starts the host-to-device transfer and returns at once (JAX transfers
  asynchronously), so the next batches travel while the current step runs, as flax's `prefetch_to_device`.
  The order is unchanged: only when each batch is put moves earlier. The batches put ahead of a stop are
  dropped, which costs nothing: every batch is a function of its step, so a resume makes them again.
  """
  import collections
  import itertools

  queue = collections.deque()
  batches = iter(batches)

  def enqueue(n):
    for batch in itertools.islice(batches, n):
      queue.append(put(batch))

  enqueue(size + 1)
  while queue:
    yield queue.popleft()
    enqueue(1)


class LaggedMax:
  """The max over every process of a small host integer, agreed without waiting for the devices.

  `push(value)` dispatches this step's reduction (a one-integer all-reduce over all devices, queued behind
  the step in flight) and returns the result of the push `lag` pushes earlier, whose step has finished by
  now, so the host keeps running up to `lag` steps ahead of the devices. `drain()` waits for every pushed
  reduction and returns their max. Every process must call `push` and `drain` in the same sequence (once
  per step, and at the same steps): then every process reads the same values at the same steps.
  """

  def __init__(self, lag: int = 2, devices=None):
    import collections

    self.lag: int = int(lag)
    self._pending = collections.deque()
    devices = list(jax.devices() if devices is None else devices)
    self._mesh = data_mesh(devices)
    self._local = [d for d in devices if d.process_index == jax.process_index()]
    self._max = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(self._mesh, P()))

  def _issue(self, value: int):
    local = np.full((len(self._local),), int(value), np.int32)
    global_ = jax.make_array_from_process_local_data(NamedSharding(self._mesh, P(DATA_AXIS)), local)
    self._pending.append(self._max(global_))

  @staticmethod
  def _read(result) -> int:
    return int(np.asarray(result.addressable_shards[0].data))

  def push(self, value: int) -> int:
    self._issue(value)
    got = 0
    while len(self._pending) > self.lag:
      got = max(got, self._read(self._pending.popleft()))
    return got

  def drain(self) -> int:
    got = 0
    while self._pending:
      got = max(got, self._read(self._pending.popleft()))
    return got
