"""The Hugging Face hub: timm's layout against timm's own logits, downloads through huggingface_hub from a local
fake hub (online, then offline from its cache), bad repos, the timm export round trip, and push_to_hub."""

import importlib
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from helpers import FakeHub, fast_params

from bit import checkpoints, hub, models
from bit.errors import BitError, CheckpointError, DownloadError

DATA = pathlib.Path(__file__).parent / 'data'
_spec = importlib.util.spec_from_file_location('make_timm_fixture', DATA / 'make_timm_fixture.py')
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)
CASES = {c[0]: c for c in fixture.CASES}


def timm_case(name):
  """(timm state dict, config.json, images, timm's logits) of a case of tests/data/timm_bit."""
  folder = DATA / 'timm_bit' / name
  keys = json.loads((folder / 'keys.json').read_text())
  state = fixture.timm_weights(keys, CASES[name][5])
  config = json.loads((folder / 'config.json').read_text())
  return state, config, np.load(folder / 'images.npy'), np.load(folder / 'logits.npy')


def logits_of(model, params, images):
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images))


@pytest.mark.parametrize('name', ['r50x1_s64', 'r26x3_s64'], ids=['R50x1', 'R26x3'])
def test_timm_layout_gives_timms_own_logits(name):
  state, config, images, golden = timm_case(name)
  depth, width, classes, params = hub.timm_to_params(state, source=name)
  assert (models.architecture_name(depth, width), classes) == (
    hub.architecture_from_config(config),
    CASES[name][4],
  )
  model = models.create_model(models.architecture_name(depth, width), classes)
  # timm standardizes with eps 1e-8, BiT with 1e-10: far below this (docs/hub.md has the measured figure).
  np.testing.assert_allclose(logits_of(model, params, images), golden, atol=3e-4, rtol=0)
  # ... and back to timm's names and layouts, exactly.
  back = hub.params_to_timm(params)
  assert sorted(back) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_transformers_bit_at_bits_settings_gives_transformers_own_logits():
  state, config, images, golden = timm_case('hf_r26x1_s64')
  assert hub._not_bit('google/bit-50', config) is None
  depth, width, classes, params = hub.timm_to_params(hub.from_transformers(state), source='transformers')
  assert models.architecture_name(depth, width) == hub.architecture_from_config(config) == 'R26x1'
  model = models.create_model('R26x1', classes)
  np.testing.assert_allclose(logits_of(model, params, images), golden, atol=3e-4, rtol=0)
  assert hub.label_names_from_config(config, classes) == [f'class {i}' for i in range(5)]
  for key, value in (
    ('global_padding', 'SAME'),
    ('layer_type', 'bottleneck'),
    ('embedding_dynamic_padding', True),
  ):
    assert f'{key}={value!r}' in hub._not_bit('x/y', {**config, key: value})


def test_a_state_dict_that_does_not_fit_lists_every_problem():
  state, _, _, _ = timm_case('r50x1_s64')
  state = dict(state)
  del state['stages.1.blocks.0.norm2.bias']
  state['stages.0.blocks.0.conv1.weight'] = state['stages.0.blocks.0.conv1.weight'][:, :32]
  state['head.fc.extra'] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError) as e:
    hub.timm_to_params(state, source='model.safetensors of hub repo x/y')
  msg = str(e.value)
  assert 'model.safetensors of hub repo x/y does not fit BiT R50x1 with 7 classes' in msg
  assert 'missing (1)' in msg and 'stages.1.blocks.0.norm2.bias' in msg
  assert 'unexpected (1)' in msg and 'head.fc.extra' in msg
  assert 'wrong shape (1)' in msg and 'stages.0.blocks.0.conv1.weight: (64, 32, 1, 1)' in msg


# --- a fake hub on 127.0.0.1, served to huggingface_hub itself ----------------------------------------------


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
  """Sets huggingface_hub's environment (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE) as a user would before starting
  Python; huggingface_hub reads it when imported, so its constants are read again here, and at the end."""
  import huggingface_hub.constants

  def apply(endpoint=None, offline=False):
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HUB_DISABLE_TELEMETRY', '1')
    monkeypatch.setenv('HF_HUB_DISABLE_IMPLICIT_TOKEN', '1')
    monkeypatch.setenv('HF_ENDPOINT', endpoint or 'http://127.0.0.1:9')  # port 9: nothing answers
    monkeypatch.setenv('HF_HUB_OFFLINE', '1' if offline else '0')
    importlib.reload(huggingface_hub.constants)

  yield apply
  monkeypatch.undo()
  importlib.reload(huggingface_hub.constants)


@pytest.fixture(scope='module')
def tiny_repo(tmp_path_factory):
  """A timm-format repo of a random R26x1 (3 classes, named), written by bit's own timm writer."""
  model = models.create_model('R26x1', 3)
  params = fast_params(model, seed=5, head_std=0.1)
  out = hub.write_timm(
    params, tmp_path_factory.mktemp('repo'), input_size=96, label_names=['cat', 'dog', 'emu']
  )
  return params, {name: (out / name).read_bytes() for name in (hub.WEIGHTS, hub.CONFIG)}


def test_load_from_the_hub_online_then_offline_from_its_cache(hf_env, tiny_repo):
  params, files = tiny_repo
  name = 'hf-hub:me/bit-tiny'
  with FakeHub({'me/bit-tiny': files}) as server:
    hf_env(endpoint=server.url)
    model, loaded = checkpoints.load(name, keep_head=True)
    assert ('GET', f'/me/bit-tiny/resolve/main/{hub.WEIGHTS}') in server.requests
  assert (model.architecture, model.num_classes, model.input_size) == ('R26x1', 3, 96)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the timm round trip is exact
  # The server is gone: offline, the same names come from huggingface_hub's cache under HF_HOME.
  hf_env(offline=True)
  again, again_params = checkpoints.load(name, num_classes=10)
  assert again.num_classes == 10 and again.input_size is None
  np.testing.assert_array_equal(
    again_params['block4']['unit02']['conv3']['kernel'], params['block4']['unit02']['conv3']['kernel']
  )
  assert checkpoints.label_names(name) == ['cat', 'dog', 'emu']
  # Not in the cache and offline: one line naming the repo and the file.
  with pytest.raises(DownloadError, match=r'config.json of hub repo me/other: HF_HUB_OFFLINE is set') as e:
    checkpoints.load('hf-hub:me/other', num_classes=2)
  assert '\n' not in str(e.value)


def test_bad_hub_repos_are_one_line_errors(hf_env, tiny_repo):
  _, files = tiny_repo
  vit = {hub.CONFIG: json.dumps({'architecture': 'vit_base_patch16_224', 'num_classes': 1000}).encode()}
  hf_bit = {
    hub.CONFIG: json.dumps(
      {
        'model_type': 'bit',
        'architectures': ['BitForImageClassification'],
        'global_padding': 'SAME',
        'layer_type': 'preactivation',
      }
    ).encode()
  }
  repos = {
    'me/vit': vit,
    'google/bit-50': hf_bit,
    'me/noweights': {hub.CONFIG: files[hub.CONFIG]},
    'me/gated': files,
  }
  with FakeHub(repos, gated={'me/gated'}) as server:
    hf_env(endpoint=server.url)
    cases = [
      (
        'hf-hub:me/vit',
        CheckpointError,
        "hub repo me/vit is not a BiT ResNetV2: its config.json says architecture='vit_base_patch16_224'",
      ),
      (
        'hf-hub:google/bit-50',
        CheckpointError,
        "hub repo google/bit-50 is a transformers BiT whose numerics are not BiT's: config.json has "
        "global_padding='SAME'",
      ),
      (
        'hf-hub:me/noweights',
        DownloadError,
        'model.safetensors of hub repo me/noweights: the repo has no such file',
      ),
      ('hf-hub:me/missing', DownloadError, 'config.json of hub repo me/missing: no such repo'),
      ('hf-hub:me/gated', DownloadError, 'config.json of hub repo me/gated: the repo is gated.*HF_TOKEN'),
      ('hf-hub:not a repo', BitError, "'hf-hub:not a repo' is not a hub model name"),
    ]
    for name, error, message in cases:
      with pytest.raises(error, match=message) as e:
        checkpoints.load(name, num_classes=2)
      assert '\n' not in str(e.value), name
  hf_env(endpoint='http://127.0.0.1:9')  # no network: what was fetched comes from the cache, nothing else
  with pytest.raises(CheckpointError, match='me/vit is not a BiT'):
    checkpoints.load('hf-hub:me/vit', num_classes=2)
  with pytest.raises(DownloadError, match='config.json of hub repo me/never: the hub cannot be reached') as e:
    checkpoints.load('hf-hub:me/never', num_classes=2)
  assert '\n' not in str(e.value)


def test_list_models_shows_timms_bit_repos_beside_the_official_names():
  names = checkpoints.list_models()
  assert 'BiT-M-R50x1' in names and 'hf-hub:timm/resnetv2_50x1_bit.goog_in21k' in names
  hub_names = checkpoints.list_models('hf-hub:*')
  assert len(hub_names) == len(hub.HUB_MODELS) == 15
  assert 'hf-hub:timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384' in hub_names


# --- sharing: bit-export --format timm, push_to_hub ------------------------------------------------------


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tiny_repo):
  """A finished bit-train workdir as the tools read it: config.json, model.npz, labels.txt, eval_test.json."""
  params, _ = tiny_repo
  w = tmp_path_factory.mktemp('run')
  checkpoints.save_npz(params, w / 'model.npz')
  (w / 'config.json').write_text(
    json.dumps(
      {'model': 'BiT-M-R50x1', 'dataset': 'tf_flowers', 'crop': 96, 'batch_size': 8, 'base_lr': 0.003}
    )
  )
  (w / 'labels.txt').write_text('cat\ndog\nemu\n')
  (w / 'eval_test.json').write_text(json.dumps({'top1': 0.875, 'top5': 1.0, 'count': 40}))
  return w, params


def test_bit_export_format_timm_writes_timms_hub_layout(workdir, tmp_path, capsys, monkeypatch):
  from helpers import run_cli

  from bit.tools import cli

  w, params = workdir
  out = tmp_path / 'timm'
  argv = ['bit-export', '--workdir', w, '--format', 'timm', '--output', out]
  code, stdout, err = run_cli(cli.export_main, argv, capsys, monkeypatch)
  assert code == 0, err
  assert f'local-dir:{out}' in stdout
  config = json.loads((out / hub.CONFIG).read_text())
  assert config['architecture'] == 'resnetv2_26x1_bit' and config['num_classes'] == 3
  assert config['label_names'] == ['cat', 'dog', 'emu']
  cfg = config['pretrained_cfg']
  assert cfg['input_size'] == [3, 96, 96] and cfg['mean'] == cfg['std'] == [0.5] * 3
  assert (cfg['first_conv'], cfg['classifier']) == ('stem.conv', 'head.fc')
  state = hub.read_safetensors(out / hub.WEIGHTS, 'export')
  assert state['stem.conv.weight'].shape == (64, 3, 7, 7) and state['head.fc.weight'].shape == (3, 2048, 1, 1)
  _, _, _, back = hub.timm_to_params(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # An existing output is refused unless --overwrite; a gray model keeps its channel count.
  code, _, err = run_cli(cli.export_main, argv, capsys, monkeypatch)
  assert code != 0 and 'exists' in err
  gray = {
    **params,
    'root_block': {
      'conv_root': {'kernel': checkpoints.adapt_input_conv(params['root_block']['conv_root']['kernel'], 1)}
    },
  }
  hub.write_timm(gray, tmp_path / 'gray', input_size=64)
  assert json.loads((tmp_path / 'gray' / hub.CONFIG).read_text())['pretrained_cfg']['input_size'] == [
    1,
    64,
    64,
  ]
  _, _, _, gray_back = hub.timm_to_params(hub.read_safetensors(tmp_path / 'gray' / hub.WEIGHTS, 'gray'))
  assert gray_back['root_block']['conv_root']['kernel'].shape == (7, 7, 1, 64)


def test_push_to_hub_uploads_timms_layout_with_a_model_card(workdir, monkeypatch):
  # huggingface_hub's upload protocol (preupload, LFS/xet, commit) is not faked here: the repo creation and
  # the folder upload are recorded, and the folder is checked as it is when upload_folder reads it.
  import huggingface_hub

  w, params = workdir
  calls = []

  def create_repo(self, repo_id, **kwargs):
    calls.append(('create_repo', repo_id, kwargs))

  def upload_folder(self, *, repo_id, folder_path, **kwargs):
    folder = pathlib.Path(folder_path)
    calls.append(('upload_folder', repo_id, {p.name: p.read_bytes() for p in folder.iterdir()}))
    return 'commit-info'

  monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
  monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
  import bit

  assert bit.push_to_hub(str(w), 'me/bit-flowers', private=True) == 'commit-info'
  (_, rid, kwargs), (_, rid2, uploaded) = calls
  assert rid == rid2 == 'me/bit-flowers' and kwargs['private'] is True
  assert sorted(uploaded) == sorted([hub.WEIGHTS, hub.CONFIG, hub.CARD])
  card = uploaded[hub.CARD].decode()
  assert "timm.create_model('hf-hub:me/bit-flowers', pretrained=True)" in card
  assert '| dataset | `"tf_flowers"` |' in card and '| crop | `96` |' in card  # the recipe
  assert '| test | 87.50% | 100.00% | 40 |' in card  # the eval result
  config = json.loads(uploaded[hub.CONFIG])
  assert config['label_names'] == ['cat', 'dog', 'emu'] and config['pretrained_cfg']['input_size'] == [
    3,
    96,
    96,
  ]
  with pytest.raises(BitError, match="repo_id='no-owner'"):
    bit.push_to_hub(str(w), 'no-owner')


def test_bit_train_fine_tunes_a_hub_model(hf_env, tiny_repo, tmp_path):
  from helpers import base_config, make_folder

  from bit import train

  _, files = tiny_repo
  folder = make_folder(tmp_path / 'folder')
  with FakeHub({'me/bit-tiny': files}) as server:
    hf_env(endpoint=server.url)
    result = train.fit(base_config('hf-hub:me/bit-tiny', folder, schedule=(1, 2, 3, 4, 5)), tmp_path / 'w')
  model, params = checkpoints.load(str(tmp_path / 'w' / 'model.npz'), keep_head=True)
  assert model.architecture == 'R26x1' and 0 <= result.metrics['top1'] <= 1
  assert float(np.abs(np.asarray(params['head']['kernel'])).max()) > 0


def test_an_export_keeps_the_input_channels(tiny_repo, tmp_path):
  import bit

  params, _ = tiny_repo
  gray = {
    **params,
    'root_block': {
      'conv_root': {'kernel': checkpoints.adapt_input_conv(params['root_block']['conv_root']['kernel'], 1)}
    },
  }
  model = models.create_model('R26x1', 3, in_chans=1)
  out = bit.export(model, gray, 'stablehlo', tmp_path / 'hlo', size=32)
  assert json.loads((out / 'export.json').read_text())['input']['shape'] == [None, 32, 32, 1]
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  served = jax.export.deserialize((out / 'model.stablehlo').read_bytes()).call(x)
  np.testing.assert_allclose(np.asarray(served['logits']), logits_of(model, gray, x), atol=1e-4)
