"""XLA settings that make bit's computations fast on CPU, applied to every function bit compiles.

XLA's CPU backend sends convolutions to YNNPACK by default, where several of BiT's (the 7x7 root, the 3x3s at
64 channels) run single-threaded, several times slower than in XLA's own (Eigen) convolution; YNNPACK's
matmuls and reductions are fast, so they are kept. The figures, with the command that made them, are in
docs/performance.md.

A user's own `--xla_cpu_experimental_ynn_fusion_type` in `XLA_FLAGS` always wins: then nothing is changed.
`jit` applies the setting to each function bit compiles (on CPU); `configure_environment` puts it in
`XLA_FLAGS`, which only `bit.runtime` (the tools, `bit.configure_cpu()`) calls.
"""

import functools
import importlib.metadata
import os
from typing import Any

FLAG = 'xla_cpu_experimental_ynn_fusion_type'
# The library fusions YNNPACK keeps: matmuls (alone and fused) and reductions, not convolutions.
_ENV_VALUE = 'dot,reduce,individual_dot'
_OPTION_VALUE = 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'


_OURS = f'--{FLAG}={_ENV_VALUE}'
# The jaxlib releases whose XLA has the flag and where it was measured (an XLA that does not know a flag in
# XLA_FLAGS aborts the process, so other versions are left alone).
KNOWN_JAXLIB = ((0, 10), (0, 11))


@functools.lru_cache(maxsize=1)
def _jaxlib_known() -> bool:
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return False
  try:
    return tuple(int(v) for v in version.split('.')[:2]) in KNOWN_JAXLIB
  except ValueError:
    return False


def user_has_set() -> bool:
  """Whether XLA_FLAGS sets the flag, not counting the one `configure_environment` added."""
  return FLAG in os.environ.get('XLA_FLAGS', '').replace(_OURS, '')


def configure_environment() -> None:
  """Adds the flag to XLA_FLAGS (for computations bit does not compile itself, and for pmap).

  Takes effect only if JAX's CPU backend has not started yet; `jit` below covers bit's own functions anyway.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if FLAG not in flags and _jaxlib_known():
    os.environ['XLA_FLAGS'] = f'{flags} {_OURS}'.strip()


def compiler_options() -> dict[str, Any] | None:
  """The per-compilation form of the same setting, or None off CPU or when the user set the flag."""
  import jax  # here: bit.runtime imports this module before JAX's settings are made (bit/malloc.py)

  if user_has_set() or not _jaxlib_known() or jax.default_backend() != 'cpu' or not _options_accepted():
    return None
  return {FLAG: _OPTION_VALUE}


@functools.lru_cache(maxsize=1)
def _options_accepted() -> bool:
  """Whether this XLA takes the option (one tiny compilation, once per process)."""
  import jax
  import jax.numpy as jnp

  try:
    jax.jit(lambda x: x + 1, compiler_options={FLAG: _OPTION_VALUE}).lower(jnp.zeros(2)).compile()
  except Exception:  # noqa: BLE001 - an XLA without the option: compile without it
    return False
  return True


def jit(fn: Any = None, **kwargs: Any) -> Any:
  """`jax.jit` with `compiler_options()`; usable as `@jit` or `jit(fn, donate_argnums=...)`."""
  if fn is None:
    return functools.partial(jit, **kwargs)
  import jax

  options = compiler_options()
  if options is not None:
    kwargs.setdefault('compiler_options', options)
  return jax.jit(fn, **kwargs)
