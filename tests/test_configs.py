"""Config files are found by path: installing the package puts no top-level `configs` into site-packages, and
every configs/*.py, the demo and the accuracy grid work where `import configs` fails."""

import pathlib
import subprocess
import sys
import zipfile

from bit import config

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Run where `configs` cannot be imported (as in an installed package, whatever sys.path holds).
NO_CONFIGS_PACKAGE = r"""
import sys

class NoConfigs:
  def find_spec(self, name, path=None, target=None):
    if name == 'configs' or name.startswith('configs.'):
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)
    return None

sys.meta_path.insert(0, NoConfigs())
"""

CHECKS = r"""
import pathlib
from absl import flags
from ml_collections import config_flags
from bit import config
from bit.tools import accuracy_grid, demo

root = pathlib.Path(sys.argv[1])
for path in sorted((root / 'configs').glob('*.py')):
  assert config.load_module(path).get_config() is not None, path

# bit-train's --config flag, with a config argument
config_flags.DEFINE_config_file('config')
flags.FLAGS(['bit-train', '--config', f'{root}/configs/common.py:BiT-S-R50x1'])
assert flags.FLAGS.config.model == 'BiT-S-R50x1', flags.FLAGS.config.model

demo_config = config.load_module(root / 'configs' / 'demo.py').get_config()
stage = demo.pretrain_config(demo_config, 'digits')
assert stage.model == 'R26x1' and set(stage) == set(config.DEFAULTS), sorted(stage)

grid = accuracy_grid.load_config(root / 'configs' / 'bench_demo.py')
assert accuracy_grid.cells(grid) and grid.demo.pretrain_steps == demo_config.demo.pretrain_steps
print('ok')
"""


def test_the_wheel_installs_no_top_level_configs(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for name in ('pyproject.toml', 'README.md', 'bit/py.typed'):
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_bytes((ROOT / name).read_bytes())
  for sub in ('bit', 'configs'):
    for path in (ROOT / sub).rglob('*.py'):
      if '__pycache__' not in path.parts:
        (src / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        (src / path.relative_to(ROOT)).write_bytes(path.read_bytes())
  cmd = [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', 'out', '.']
  proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (wheel,) = (src / 'out').glob('*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split('/')[0] for n in names if not n.split('/')[0].endswith('.dist-info')} == {'bit'}
  assert 'bit/tools/cli.py' in names and 'bit/config.py' in names and 'bit/py.typed' in names


def test_configs_the_demo_and_the_grid_work_without_a_configs_package(tmp_path):
  code = NO_CONFIGS_PACKAGE + CHECKS
  env = {'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
    [sys.executable, '-c', code, str(ROOT)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]


def test_the_defaults_are_what_get_config_gives():
  c = config.get_config()
  assert {k: c[k] for k in c} == {k: config.default(k) for k in config.DEFAULTS}
  assert config.get_config('BiT-S-R50x1').model == 'BiT-S-R50x1'
  assert config.load_module(ROOT / 'configs' / 'common.py').get_config().to_dict() == c.to_dict()
