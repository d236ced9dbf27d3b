"""bit-train on bad input: one line saying what to do, a non-zero exit code, no traceback.

(The successful command, killed and resumed, is in test_train.py.) The failing commands run in this process
(`helpers.run_cli`): what is checked is the entry point's handling of bad input, not a process of its own.
"""

import json
import pathlib
import re

import pytest
from helpers import make_folder, make_npz, run_cli

from bit.tools import cli

CONFIG = str(pathlib.Path(__file__).parent.parent / 'configs' / 'common.py')


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  folder = make_folder(root / 'folder', classes=2, train_per_class=2, test_per_class=1)
  npz = make_npz(root / 'm.npz')
  other = root / 'other_run'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps({'model': 'R50x1', 'dataset': 'cifar10', 'seed': 3}))
  ok = [
    '--config',
    CONFIG,
    f'--config.model={npz}',
    f'--config.dataset={folder}',
    '--config.batch_size=8',
    '--config.schedule=[1,2,3,4,5]',
    '--config.resize=40',
    '--config.crop=32',
  ]
  return {
    'unknown_key': ['--config', CONFIG, '--workdir', root / 'a', '--config.bach_size=8'],
    'bad_value': ['--config', CONFIG, '--workdir', root / 'a', '--config.batch_size=lots'],
    'missing_config_file': ['--config', root / 'nope.py', '--workdir', root / 'a'],
    'no_dataset': ['--config', CONFIG, '--workdir', root / 'a'],
    'missing_dataset': [*ok, '--workdir', root / 'b', f'--config.dataset={root / "no_such_folder"}'],
    'missing_model': [*ok, '--workdir', root / 'c', f'--config.model={root / "no_such.npz"}'],
    'unknown_model': [*ok, '--workdir', root / 'c2', '--config.model=BiT-Q-R99x9'],
    'batch_not_dividing': [*ok, '--workdir', root / 'd', '--config.batch_size=6'],
    'other_run': [*ok, '--workdir', other],
    'bad_schedule': [*ok, '--workdir', root / 'e', '--config.schedule=[5,4,3,2,1]'],
  }


@pytest.mark.parametrize(
  'case,expected',
  [
    ('unknown_key', r"unknown config key 'bach_size' \(did you mean 'batch_size'\?\)"),
    ('bad_value', r'batch_size=lots'),
    ('missing_config_file', r'cannot load the --config file.*nope\.py'),
    ('no_dataset', r'config\.dataset is not set'),
    ('missing_dataset', r'no_such_folder.*does not exist'),
    ('missing_model', r'no_such\.npz'),
    ('unknown_model', r'BiT-Q-R99x9'),
    ('batch_not_dividing', r'batch_size=6 does not divide over 4 devices; use a multiple of 4'),
    ('other_run', r'holds a different run.*new --workdir'),
    ('bad_schedule', r'config\.schedule'),
  ],
)
def test_bad_input_is_one_line_without_traceback(cases, case, expected, capsys, monkeypatch):
  code, out, err = run_cli(cli.train_main, ['bit-train', *cases[case]], capsys, monkeypatch)
  assert code != 0, (out, err)
  assert 'Traceback' not in err, err
  lines = [line for line in err.splitlines() if line.startswith('bit-train: error:')]
  assert len(lines) == 1, err
  assert re.search(expected, lines[0]), lines[0]
