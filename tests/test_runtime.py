"""bit/runtime.py: `import bit` changes nothing global; the tools and `bit.configure_cpu()` make the settings."""

import json
import os
import subprocess
import sys

from helpers import cpu_runtime_only

# The variables bit's runtime settings read or write: the child starts without them, as a user's program would.
_OURS = ('XLA_FLAGS', 'TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS', 'BIT_MALLOC', 'LD_PRELOAD')


def _clean_env():
  return {k: v for k, v in os.environ.items() if k not in _OURS and not k.startswith('MALLOC_')}


# A fresh process: everything global is recorded, bit and the modules a library user touches are imported
# (and a model traced), and the same things are recorded again. glibc's malloc state is judged as
# tests/test_malloc.py does: a computation with ~200 MB of temporaries faults in thousands of pages per call
# under glibc's defaults and almost none under bit's settings.
_NO_SIDE_EFFECTS = """
import json, os, resource, warnings
import flax.linen, jax, optax  # bit's dependencies first: flax's import sets TF_CPP_MIN_LOG_LEVEL itself
env0, filters0 = dict(os.environ), list(warnings.filters)
config0 = {k: repr(v) for k, v in jax.config.values.items()}
import bit, bit.malloc
import bit.models, bit.ops, bit.parallel, bit.train_state, bit.train, bit.evaluation, bit.prediction
import jax.numpy as jnp
model = bit.create_model('R26x1', 3)
bit.models.param_shapes(model)  # traces the model: every op picks its form for this backend
config1 = {k: repr(v) for k, v in jax.config.values.items()}

@jax.jit
def f(x):
  y = jnp.sin(x) @ jnp.cos(x).T
  return jnp.sum(jnp.tanh(y) * jnp.exp(-y) + jnp.sqrt(jnp.abs(y)))

x = jnp.ones((2048, 2048)) * 0.01
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x).block_until_ready()
print(json.dumps({
  'env': sorted(k for k in set(env0) | set(os.environ) if env0.get(k) != os.environ.get(k)),
  'config': sorted(k for k in config0 if config0[k] != config1.get(k)),
  'filters_same': warnings.filters == filters0,
  'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
  'malloc_state': bit.malloc.state,
}))
"""


@cpu_runtime_only
def test_import_bit_changes_nothing_global():
  out = subprocess.run(
    [sys.executable, '-c', _NO_SIDE_EFFECTS], capture_output=True, text=True, env=_clean_env(), check=True
  )
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got['env'] == []  # XLA_FLAGS, TF_* and every other variable as they were
  assert got['config'] == []  # jax.config, jax_cpu_enable_async_dispatch among it
  assert got['filters_same']
  assert got['malloc_state'] == {'malloc': False, 'dispatch': False}
  assert got['faults'] > 4 * 4_000  # glibc's own malloc: fresh pages at every call


_TOOL = """
import json, os, sys
from bit import malloc
from bit.tools import cli
sys.argv = ['bit-eval']
try:
  cli.eval_main()  # stops at the missing --workdir, after the runtime set-up
except SystemExit:
  pass
import jax
print(json.dumps({'state': malloc.state, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                  'tf': os.environ.get('TF_CPP_MIN_LOG_LEVEL'),
                  'async': jax.config.values['jax_cpu_enable_async_dispatch']}))
"""


@cpu_runtime_only
def test_command_line_tools_make_the_cpu_settings_before_jax_starts():
  from bit import xla

  out = subprocess.run([sys.executable, '-c', _TOOL], capture_output=True, text=True, env=_clean_env())
  assert '--workdir is required' in out.stderr
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got['state'] == {'malloc': True, 'dispatch': True} and got['async'] is False
  assert got['tf'] == '2'
  # Private: whether the installed jaxlib is one the flag is known to be accepted by (a version table).
  assert (xla.FLAG in got['xla_flags']) == xla._jaxlib_known()


def test_configure_cpu_is_exported_and_reports_what_it_did():
  import bit
  from bit import runtime

  assert 'configure_cpu' in bit.__all__ and bit.configure_cpu is runtime.configure_cpu
  state = bit.configure_cpu()  # conftest made the settings already: calling again changes nothing
  assert set(state) == {'xla_flag', 'malloc', 'dispatch'}
