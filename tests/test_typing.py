"""What a type checker sees of bit: pyright (the [test] extra) on a user's script in strict mode, on a script
with four deliberate mistakes, and `--verifytypes` on the package's public surface."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TYPING = ROOT / 'tests' / 'typing'
MIN_COMPLETENESS = 0.95  # pyright --verifytypes bit --ignoreexternal (README, development section)


def pyright(*args: str) -> dict:
  # The venv's python first on PATH: pyright finds bit through its sys.path (the editable install's .pth, or
  # PYTHONPATH in a checkout), as a user's editor does.
  path = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ['PATH']])
  env = dict(os.environ, PATH=path, PYRIGHT_PYTHON_IGNORE_WARNINGS='1')
  cmd = [sys.executable, '-m', 'pyright', '--outputjson', *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.stdout.startswith('{'), proc.stderr[-2000:]
  return json.loads(proc.stdout)


def errors(report: dict) -> list[tuple[str, int, str]]:
  return [
    (pathlib.Path(d['file']).name, d['range']['start']['line'] + 1, d['message'].splitlines()[0])
    for d in report['generalDiagnostics']
    if d['severity'] == 'error'
  ]


@pytest.fixture(scope='module')
def checked():
  """One pyright run over both scripts (it is the slow part: a few seconds to load numpy's and JAX's stubs)."""
  return errors(pyright(str(TYPING / 'user_script.py'), str(TYPING / 'mistakes.py')))


def test_a_users_script_type_checks_in_strict_mode(checked):
  assert (TYPING / 'user_script.py').read_text().startswith('# pyright: strict\n')
  assert [e for e in checked if e[0] == 'user_script.py'] == []


def test_four_mistakes_get_four_errors_on_their_lines(checked):
  lines = (TYPING / 'mistakes.py').read_text().splitlines()
  marked = [i for i, line in enumerate(lines, 1) if '# error:' in line]
  found = [e for e in checked if e[0] == 'mistakes.py']
  assert len(marked) == 4
  assert [line for _, line, _ in found] == marked, found
  assert 'num_classes' in found[0][2] and '"shape"' in found[1][2]
  assert "'tflite'" in found[2][2] and 'TypedDict' in found[3][2]


def test_the_public_api_is_typed():
  report = pyright('--verifytypes', 'bit', '--ignoreexternal')
  completeness = report['typeCompleteness']
  assert completeness['packageRootDirectory'], 'pyright did not find bit'
  symbols = {s['name']: s for s in completeness['symbols']}
  api = ['bit.load', 'bit.predict', 'bit.evaluate', 'bit.export', 'bit.train_and_evaluate', 'bit.reset_head']
  assert [name for name in api if not symbols[name]['isTypeKnown']] == []
  assert completeness['completenessScore'] >= MIN_COMPLETENESS, sorted(
    name for name, s in symbols.items() if s['isExported'] and not s['isTypeKnown']
  )
