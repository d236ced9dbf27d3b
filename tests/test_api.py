"""The public surface of `import bit`: dir() lists the API only, type checkers find py.typed, no TensorFlow."""

import pathlib
import subprocess
import sys

import bit


def test_dir_shows_the_public_api_only():
  assert set(dir(bit)) == set(bit.__all__) | {'__version__'}
  assert not {'os', 'importlib', 'typing', 'malloc', 'xla'} & set(dir(bit))


def test_py_typed_and_a_light_import():
  assert (pathlib.Path(bit.__file__).parent / 'py.typed').is_file()
  code = 'import sys, bit; print("tensorflow" in sys.modules, "bit.train" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
  assert out.split() == ['False', 'False']  # the TYPE_CHECKING imports do not run
