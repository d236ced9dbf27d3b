"""The public surface of `import bit`: dir() lists the API only, type checkers find py.typed, no TensorFlow;
models that know their input size, a head changed in memory, errors that name the Python argument."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import fast_params
from PIL import Image

import bit
from bit import checkpoints, models, train
from bit.tools import cli


def test_dir_shows_the_public_api_and_the_modules():
  assert set(dir(bit)) == set(bit.__all__) | set(bit._SUBMODULES) | {'__version__'}
  assert {'ops', 'freeze', 'parallel', 'data', 'models', 'config', 'errors', 'types'} <= set(dir(bit))
  assert not {'os', 'importlib', 'typing', 'malloc', 'xla'} & set(dir(bit))


def test_modules_are_attributes_after_a_bare_import_without_jax():
  code = (
    'import sys, bit; light = not {"jax", "tensorflow"} & set(sys.modules); '
    'bit.ops.set_fast_ops("off"); '
    'print(light, [m for m in dir(bit) if getattr(bit, m, None) is None], callable(bit.export), '
    'bit.freeze.__name__, bit.parallel.__name__, bit.data.__name__, bit.types.Params)'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=True
  ).stdout.split()
  assert out[:6] == ['True', '[]', 'True', 'bit.freeze', 'bit.parallel', 'bit.data'], out
  with pytest.raises(AttributeError, match="no attribute 'opz'"):
    bit.opz  # noqa: B018


def test_py_typed_and_a_light_import():
  assert (pathlib.Path(bit.__file__).parent / 'py.typed').is_file()
  code = 'import sys, bit; print("tensorflow" in sys.modules, "bit.train" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
  assert out.split() == ['False', 'False']  # the TYPE_CHECKING imports do not run


# --- models that know their input size; changing the head in memory ------------------------------------------


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """What bit-train leaves: model.npz (a 3-class R26x1), labels.txt, config.json with the crop it trained at."""
  w = tmp_path_factory.mktemp('run')
  model = models.create_model('R26x1', num_classes=3)
  checkpoints.save_npz(fast_params(model, head_std=0.05), w / 'model.npz')
  (w / 'labels.txt').write_text('cat\ndog\nemu\n')
  (w / 'config.json').write_text(json.dumps({'dataset': 'unused', 'crop': 32, 'model': 'R26x1'}))
  return w


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('photos')
  rng = np.random.default_rng(0)
  for c in ('cat', 'dog', 'emu'):
    (root / 'test' / c).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(root / 'test' / c / '0.png')
  return root


def test_a_loaded_model_knows_its_input_size(run_dir, tmp_path, monkeypatch):
  model, _ = bit.load(run_dir / 'model.npz', keep_head=True)
  assert model.input_size == 32  # the crop of the run's config.json
  assert bit.load(run_dir / 'model.npz', num_classes=5)[0].input_size is None  # a new head: a new task
  (tmp_path / 'model.npz').write_bytes((run_dir / 'model.npz').read_bytes())
  assert bit.load(tmp_path / 'model.npz', keep_head=True)[0].input_size is None  # no run beside it
  cfg = checkpoints.PretrainedCfg('BiT-T-R26x1-size', 'm.npz', 'R26x1', 3, None, 48)
  monkeypatch.setitem(checkpoints.REGISTRY, cfg.name, cfg)
  # Private: the registry's download, stubbed (the tests have no network); `bit.load` is what is tested.
  monkeypatch.setattr(checkpoints, '_fetch', lambda _: run_dir / 'model.npz')
  assert bit.load(cfg.name, keep_head=True)[0].input_size == 48  # the registry's resolution
  with pytest.raises(bit.BitError, match='input_size must be an integer >= 32'):
    models.create_model('R26x1', 3, input_size=16)


def test_evaluate_a_fine_tuned_model_at_its_size(run_dir, photo_folder):
  # Without the model's size, crop=None would take the hyper-rule's crop for these images (128 px).
  model, params = bit.load(run_dir / 'model.npz', keep_head=True)
  result = bit.evaluate(model, params, str(photo_folder), batch_size=4)
  assert result['crop'] == 32 and result['count'] == 3
  assert (
    bit.evaluate(model.clone(input_size=None), params, str(photo_folder), crop=40, batch_size=4)['crop'] == 40
  )


def test_reset_head_in_memory(run_dir):
  model, params = bit.load(run_dir / 'model.npz', keep_head=True)
  new_model, new = bit.reset_head(model, params, 5)
  assert (new_model.num_classes, new_model.input_size, new_model.architecture) == (5, None, 'R26x1')
  assert model.num_classes == 3 and model.input_size == 32  # the model passed in is unchanged
  assert new['head']['kernel'].shape == (2048, 5) and new['head']['bias'].shape == (5,)
  assert not np.any(new['head']['kernel']) and not np.any(new['head']['bias'])  # zeros, as a fine-tune starts
  assert new['block1'] is params['block1']  # the backbone is shared, not copied
  assert params['head']['kernel'].shape == (2048, 3) and np.any(params['head']['kernel'])  # input untouched
  loaded_model, loaded = bit.load(
    run_dir / 'model.npz', num_classes=5
  )  # the same as a new head from the file
  assert new_model == loaded_model
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(loaded), strict=True):
    np.testing.assert_array_equal(a, b)
  probs = bit.predict(new_model, new, np.zeros((1, 32, 32, 3), np.uint8))
  np.testing.assert_allclose(probs, 0.2, rtol=1e-6)
  with pytest.raises(bit.BitError, match='num_classes must be an integer'):
    bit.reset_head(model, params, 2.5)
  with pytest.raises(bit.BitError, match="params= must be .* got the str 'model.npz'"):
    bit.reset_head(model, 'model.npz', 5)
  with pytest.raises(bit.BitError, match=r'model= must be a bit.ResNetV2.*the order is model, params'):
    bit.reset_head(params, model, 5)


def test_reset_head_old_form_warns_and_still_works(run_dir):
  model, params = bit.load(run_dir / 'model.npz', keep_head=True)
  with pytest.warns(
    DeprecationWarning, match=r'model, params = bit.reset_head\(model, params, num_classes\)'
  ):
    new = bit.reset_head(params, 5)
  assert (
    isinstance(new, dict) and new['head']['kernel'].shape == (2048, 5) and not np.any(new['head']['bias'])
  )
  with pytest.warns(DeprecationWarning), pytest.raises(bit.BitError, match='num_classes must be an integer'):
    bit.reset_head(params, 2.5)


# --- the library speaks Python: errors name the argument --------------------------------------------------------


def test_wrong_arguments_get_one_sentence_naming_them(run_dir, photo_folder):
  model, params = bit.load(run_dir / 'model.npz', keep_head=True)
  images = np.zeros((2, 32, 32, 3), np.uint8)
  cases = [
    (lambda: bit.evaluate(model, params, images), r'dataset= must be .* an array .*use bit.predict'),
    (lambda: bit.evaluate(model, params, str(photo_folder), crop='big'), r'crop= must be an image side'),
    (lambda: bit.predict(model, 'model.npz', images), r"params= must be .*bit.load\('model.npz'"),
    (
      lambda: bit.predict(params, model, images),
      r'model= must be a bit.ResNetV2.*the order is model, params',
    ),
    (lambda: bit.predict(model.clone(num_classes=4), params, images), r'params= has a 3-class head'),
    (lambda: bit.predict(model, params, images, batch_size=0), r'batch_size= must be a positive'),
    (lambda: bit.load(42), r'name_or_path= must be'),
  ]
  for call, pattern in cases:
    with pytest.raises(bit.BitError, match=pattern) as e:
      call()
    assert '\n' not in str(e.value)


def test_a_dict_config_is_put_onto_the_defaults(tmp_path):
  from bit import config as config_lib

  config = train.as_config({'model': 'R26x1', 'dataset': 'cifar10', 'crop': 32, 'schedule': [1, 2, 3, 4, 5]})
  expected = config_lib.get_config()
  expected.update(model='R26x1', dataset='cifar10', crop=32, schedule=(1, 2, 3, 4, 5))
  assert config.to_dict() == expected.to_dict()
  with pytest.raises(bit.ConfigError, match=r'unknown keys: datset \(did you mean dataset\?\), zoom;'):
    bit.train_and_evaluate({'datset': 'cifar10', 'zoom': 2}, tmp_path / 'w')
  with pytest.raises(bit.ConfigError, match=r"config\['crop'\]='32' is a str, but crop takes type int"):
    bit.train_and_evaluate({'crop': '32'}, tmp_path / 'w')
  with pytest.raises(bit.ConfigError, match='config= must be an ml_collections.ConfigDict'):
    bit.train_and_evaluate(['cifar10'], tmp_path / 'w')
  # Accepted: it reaches the config checks, whose message speaks Python (the CLI shows it as a flag).
  with pytest.raises(bit.ConfigError, match='set config.dataset=NAME') as e:
    bit.train_and_evaluate({'model': 'R26x1'}, tmp_path / 'w')
  assert '--config.dataset=NAME' in cli.as_flags('bit-train', str(e.value))
  assert not (tmp_path / 'w').exists()  # nothing written for a run that never started
  with pytest.raises(bit.ConfigError, match='workdir= must be a folder path'):
    bit.train_and_evaluate({'model': 'R26x1', 'dataset': 'cifar10'}, None)


def test_type_checkers_see_every_public_name():
  # The lazy __getattr__ hides names from mypy/pyright; the TYPE_CHECKING imports must list each one.
  import ast

  tree = ast.parse(pathlib.Path(bit.__file__).read_text())
  guarded = next(n for n in tree.body if isinstance(n, ast.If) and 'TYPE_CHECKING' in ast.unparse(n.test))
  imported = {a.asname or a.name for n in ast.walk(guarded) if isinstance(n, ast.ImportFrom) for a in n.names}
  assert imported == set(bit.__all__) | set(bit._SUBMODULES)


def test_no_library_error_names_a_flag(run_dir, photo_folder, tmp_path):
  # Each public function with a bad argument: the message names the Python argument or config key; the
  # command-line tools show those as their flags (cli.as_flags).
  from bit import config as config_lib
  from bit import distill, dry_run, parallel

  model, params = bit.load(run_dir / 'model.npz', keep_head=True)
  images = np.zeros((2, 32, 32, 3), np.uint8)
  (tmp_path / 'mine').mkdir()
  plan_config = config_lib.get_config()
  plan_config.update(model='R26x1', dataset=str(tmp_path / 'mine'))
  one_device = parallel.DataParallel('shard_map', jax.devices()[:1])
  calls = {
    'load': lambda: bit.load(42),
    'load (scratch)': lambda: bit.load('R26x1'),
    'create_model': lambda: bit.create_model('R26x1', 3, input_size=16),
    'reset_head': lambda: bit.reset_head(model, params, 0),
    'predict': lambda: bit.predict(model, params, images, batch_size=0),
    'preprocess': lambda: bit.preprocess(images, size=8),
    'evaluate': lambda: bit.evaluate(model, params, str(photo_folder), crop='big'),
    'export (exists)': lambda: bit.export(model, params, 'stablehlo', tmp_path / 'mine'),
    'export (format)': lambda: bit.export(model, params, 'tflite', tmp_path / 'x'),  # type: ignore[arg-type]
    'train_and_evaluate': lambda: bit.train_and_evaluate({'model': 'R26x1'}, tmp_path / 'w'),
    'check_batch': lambda: one_device.check_batch(6, accum_steps=4),
    'DataParallel': lambda: parallel.DataParallel('vmap'),
    'initialize_distributed': lambda: parallel.initialize_distributed('localhost:1234', None, None),
    'dry_run.plan': lambda: dry_run.plan(plan_config),
    'distill.load_teacher': lambda: distill.load_teacher(None, 0),
  }
  messages = {}
  for name, call in calls.items():
    with pytest.raises(bit.BitError) as e:
      call()
    messages[name] = str(e.value)
  assert {name: m for name, m in messages.items() if re.search(r'(?<![\w-])--\w', m)} == {}
  assert 'give another path=, or overwrite=True' in messages['export (exists)']
  assert 'e.g. config.batch_size=8' in messages['check_batch']
  assert 'num_classes=N and config.crop=PIXELS' in messages['dry_run.plan']
  assert 'coordinator_address= ' in messages['initialize_distributed']
  # ... and each command shows them as its own flags.
  assert 'give another --output=, or --overwrite=True' in cli.as_flags(
    'bit-export', messages['export (exists)']
  )
  assert 'e.g. --config.batch_size=8' in cli.as_flags('bit-train', messages['check_batch'])
  assert '--num_classes=N and --config.crop=PIXELS' in cli.as_flags('bit-train', messages['dry_run.plan'])
  assert '--coordinator_address= ' in cli.as_flags('bit-bench', messages['initialize_distributed'])
