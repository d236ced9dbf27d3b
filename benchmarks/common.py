"""What the benchmarks share with the tests: random weights and checkpoints, made once, in tests/.

`import common` (the benchmarks run as `python benchmarks/NAME.py`, so this folder is on the path) puts
tests/ on the path too: `fast_params(model, seed, head_std)` (random params from the shapes, tests/helpers.py)
and `random_checkpoint(depth, width, classes, seed)` (the official .npz layout, tests/make_checkpoint.py).
"""

import pathlib
import sys

TESTS = pathlib.Path(__file__).resolve().parent.parent / 'tests'
if str(TESTS) not in sys.path:
  sys.path.insert(0, str(TESTS))

from helpers import fast_params  # noqa: E402
from make_checkpoint import random_checkpoint  # noqa: E402

__all__ = ['TESTS', 'fast_params', 'random_checkpoint']
