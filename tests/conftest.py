"""Test set-up: four virtual CPU devices for the whole session (multi-device tests use them; single-device
tests use the first), TensorFlow kept off accelerators and quiet, and the CPU runtime settings of the tools."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # noqa: E402

import pytest  # noqa: E402

from bit import runtime  # noqa: E402

# The tests run under the settings the command-line tools make (as fast as they are); `import bit` makes none.
runtime.configure_tool()

DATA = pathlib.Path(__file__).parent / 'data'


@pytest.fixture(scope='session')
def data_dir():
  return DATA
