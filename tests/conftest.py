"""Test set-up: four virtual CPU devices for the whole session (multi-device tests use them; single-device
tests use the first), TensorFlow kept off accelerators and quiet, the CPU runtime settings of the tools, and
one JAX compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Compiling is most of the suite's time, and the tests and the command-line runs they start compile the same
# tiny steps again (a rerun in a new process, a fresh jit of the same function). The cache is new for every
# session, so that no run depends on an earlier one, and the environment variable hands it to the child
# processes. Tests of several processes joined by gloo collectives take it out of their children's
# environment (`without_compilation_cache`): a cached step deadlocked the collectives of a rerun.
_JAX_CACHE = tempfile.mkdtemp(prefix='bit-tests-jax-cache-')
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _JAX_CACHE)

import pathlib  # noqa: E402

import pytest  # noqa: E402

from bit import data_sources, runtime  # noqa: E402

# The tests run under the settings the command-line tools make (as fast as they are); `import bit` makes none.
runtime.configure_tool()

DATA = pathlib.Path(__file__).parent / 'data'


@pytest.fixture(scope='session')
def data_dir():
  return DATA


@pytest.fixture(autouse=True)
def _fresh_split_cache():
  """Every test reads its datasets afresh: the splits a process has read are kept by name
  (`data_sources.clear_cache`), and a mock TFDS dataset of another size under the same name ('cifar10') in an
  earlier test of the same process would otherwise be the one read."""
  data_sources.clear_cache()
  yield
  data_sources.clear_cache()
