"""Host-memory settings that let XLA's CPU runtime reuse its buffers instead of faulting them in every step.

XLA's CPU runtime mallocs each computation's temporary buffers at every call and frees them after it: for a
train step of R50x1 at 128 px, batch 16, some 650 MB. glibc serves blocks that large with a fresh `mmap` and
gives them back with `munmap`, so at every step the kernel faults in and zeroes every page again: a large
share of the step goes to system time (the figures, with the command that made them: docs/performance.md).

`configure()` makes two settings (the command-line tools call it through `bit.runtime`, library users through
`bit.configure_cpu()`; `import bit` does not):
- glibc's `mallopt`: M_MMAP_MAX 0 (large blocks come from the heap, not from `mmap`) and M_TRIM_THRESHOLD
  2**31-1 (memory freed at the top of the heap stays there for the next step). This holds for the calling
  thread's heap (glibc's main arena); other threads have arenas of their own, which `mmap` large blocks anyway.
- JAX's `jax_cpu_enable_async_dispatch` off: JAX runs single-device CPU computations in the calling thread,
  so their buffers come from that heap. A jitted call on CPU then returns when its result is ready (on a
  2-core CPU the computation had both cores anyway). Computations over several CPU devices stay asynchronous.
  JAX reads the setting when its CPU backend starts, so `configure` imports JAX to set it; if the
  backend already runs, it is left as it is (`state['dispatch']` stays False). A later
  `jax.config.update('jax_cpu_enable_async_dispatch', True)` wins.

The page faults per step (`train_page_faults_per_step` of `python -m bit.tools.speed`) all but vanish; what
that buys is in docs/performance.md. The cost: memory freed at the top of the heap is given back to the
kernel only beyond 2 GB, so the process keeps up to that much of its peak heap, much as tcmalloc and
jemalloc keep theirs.

Nothing is changed when `BIT_MALLOC=system`, off glibc (macOS, musl), or when the user set glibc's malloc
themselves (`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, `glibc.malloc.*` in `GLIBC_TUNABLES`, `LD_PRELOAD`):
the dispatch setting is only worth it together with the heap's.
"""

import ctypes
import os
import sys
import warnings
from typing import Any

ENV = 'BIT_MALLOC'
# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
_USER_SETTINGS = ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_', 'MALLOC_MMAP_THRESHOLD_')

# What `configure` did: whether the mallopt settings are in force, and whether it turned JAX's CPU async
# dispatch off.
state: dict[str, bool] = {'malloc': False, 'dispatch': False}


def reason_to_skip() -> str | None:
  """Why `configure` leaves everything alone, or None."""
  value = os.environ.get(ENV, '')
  if value == 'system':
    return f'{ENV}=system'
  if value not in ('', 'reuse'):
    return f'{ENV}={value!r} is not one of "reuse" (the default) or "system"; malloc was left as it is'
  return None


def _malloc_reason_to_skip() -> str | None:
  if not sys.platform.startswith('linux') or not _glibc():
    return 'the C library is not glibc'
  for name in _USER_SETTINGS:
    if name in os.environ:
      return f'{name} is set'
  if 'glibc.malloc.' in os.environ.get('GLIBC_TUNABLES', ''):
    return 'GLIBC_TUNABLES sets glibc.malloc'
  if os.environ.get('LD_PRELOAD', ''):
    return 'LD_PRELOAD is set (possibly another allocator)'
  return None


def _glibc() -> bool:
  # The C library this process runs on (platform.libc_ver() instead reads the Python executable's file).
  try:
    return os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc')
  except (AttributeError, ValueError, OSError):
    return False


def configure() -> dict[str, Any]:
  """Applies the settings above unless told not to; returns `state`. Safe to call again."""
  reason = reason_to_skip()
  if reason is not None:
    if not reason.startswith(f'{ENV}=system'):
      warnings.warn(f'bit: {reason}. Set {ENV}=reuse or {ENV}=system, or unset it.', stacklevel=2)
    return state
  if not state['malloc'] and _malloc_reason_to_skip() is None:
    try:
      mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
      mallopt = None
    if mallopt is not None:
      mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
      state['malloc'] = all([mallopt(param, value) == 1 for param, value in SETTINGS])
  if state['malloc'] and not state['dispatch']:
    import jax  # noqa: PLC0415 - only when the heap settings hold

    if not _backend_started():
      jax.config.update('jax_cpu_enable_async_dispatch', False)
      state['dispatch'] = True
  return state


def _backend_started() -> bool:
  """Whether JAX's backends already run (then the dispatch setting could no longer take effect)."""
  try:
    from jax._src import xla_bridge  # noqa: PLC0415 - JAX's own test of it; private, so guarded

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False
