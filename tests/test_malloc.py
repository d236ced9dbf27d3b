"""bit/malloc.py: XLA's per-call CPU buffers are reused instead of faulted in anew, and the opt-outs hold."""

import json
import os
import subprocess
import sys

import pytest
from helpers import cpu_runtime_only, glibc_only

from bit import malloc

# A fresh process: one jitted computation whose temporary buffers (about 200 MB) are far above glibc's
# mmap threshold, called repeatedly; it prints the minor page faults of the last eight calls and bit's state.
_CODE = """
import json, resource
import bit
bit.configure_cpu()  # what the command-line tools do first; `import bit` alone sets nothing
import jax, jax.numpy as jnp

@jax.jit
def f(x):
  y = jnp.sin(x) @ jnp.cos(x).T           # temporaries of 2048x2048 floats, several of them
  return jnp.sum(jnp.tanh(y) * jnp.exp(-y) + jnp.sqrt(jnp.abs(y)))

x = jnp.ones((2048, 2048)) * 0.01
for _ in range(6):  # the heap settles within the first few calls
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
  f(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({'faults': faults, 'state': bit.malloc.state,
                  'async': jax.config.values['jax_cpu_enable_async_dispatch']}))
"""


def _run(**env):
  full = {k: v for k, v in os.environ.items() if k not in ('BIT_MALLOC', 'XLA_FLAGS', 'LD_PRELOAD')}
  full.update(env)
  out = subprocess.run([sys.executable, '-c', _CODE], capture_output=True, text=True, env=full, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@cpu_runtime_only
def test_buffers_are_reused_instead_of_faulted_in_every_call():
  reuse, system = _run(), _run(BIT_MALLOC='system')
  assert reuse['state'] == {'malloc': True, 'dispatch': True} and reuse['async'] is False
  assert system['state'] == {'malloc': False, 'dispatch': False} and system['async'] is True
  # Under glibc's defaults every call maps fresh pages for its temporaries: some 9,000 faults a call. With
  # bit's settings the heap keeps them (a stray 32 MB block of another thread's arena may still show up).
  assert system['faults'] > 8 * 4_000
  assert reuse['faults'] < system['faults'] / 4


@cpu_runtime_only
def test_dispatch_is_left_alone_once_jax_runs():
  code = """
import jax
jax.devices()  # the backend starts before bit's settings are made
import bit
bit.configure_cpu()
print(bit.malloc.state['malloc'], bit.malloc.state['dispatch'], jax.config.values['jax_cpu_enable_async_dispatch'])
"""
  env = {k: v for k, v in os.environ.items() if k not in ('BIT_MALLOC', 'LD_PRELOAD')}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True)
  assert out.stdout.split() == ['True', 'False', 'True']


@cpu_runtime_only
def test_a_users_own_malloc_setting_wins():
  out = _run(MALLOC_MMAP_MAX_='65536')
  assert out['state'] == {'malloc': False, 'dispatch': False} and out['async'] is True


@glibc_only
def test_reasons_to_leave_malloc_alone(monkeypatch):
  for name in ('BIT_MALLOC', 'MALLOC_MMAP_MAX_', 'GLIBC_TUNABLES', 'LD_PRELOAD'):
    monkeypatch.delenv(name, raising=False)
  assert malloc.reason_to_skip() is None
  monkeypatch.setenv('BIT_MALLOC', 'system')
  assert malloc.reason_to_skip() == 'BIT_MALLOC=system'
  monkeypatch.setenv('BIT_MALLOC', 'fast')
  assert 'fast' in malloc.reason_to_skip() and 'system' in malloc.reason_to_skip()
  with pytest.warns(UserWarning, match="BIT_MALLOC='fast' is not one of"):
    malloc.configure()  # a typo is said, not silently ignored
  monkeypatch.setenv('BIT_MALLOC', 'reuse')
  assert malloc.reason_to_skip() is None
  # Private: the heap settings are made once per process, so each environment's answer is read from the
  # function that decides it rather than from configure() in a fresh process per case.
  assert malloc._malloc_reason_to_skip() is None
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1')
  assert malloc._malloc_reason_to_skip() == 'GLIBC_TUNABLES sets glibc.malloc'
  monkeypatch.delenv('GLIBC_TUNABLES')
  monkeypatch.setenv('LD_PRELOAD', '/usr/lib/libjemalloc.so')
  assert malloc._malloc_reason_to_skip().startswith('LD_PRELOAD is set')
