"""The Hugging Face hub: timm's layout against timm's own logits, downloads through huggingface_hub from a local
fake hub (online, then offline from its cache), bad repos, the timm export round trip, and push_to_hub."""

import hashlib
import http.server
import importlib
import importlib.util
import json
import pathlib
import threading

import jax
import numpy as np
import pytest
from helpers import fast_params

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


@pytest.mark.parametrize(
  'name', ['r50x1_s64', pytest.param('r26x3_s64', marks=pytest.mark.slow)], ids=['R50x1', 'R26x3']
)
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

COMMIT = 'c0ffee' + '0' * 34


class FakeHub:
  """Serves repos ({repo_id: {filename: bytes}}) the way the hub's resolve endpoint does, recording every
  request as (method, path). `gated` repos answer 403 GatedRepo."""

  def __init__(self, repos, gated=()):
    self.repos, self.gated, self.requests = repos, set(gated), []
    hub_ = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def _answer(self, body: bool):
        hub_.requests.append((self.command, self.path))
        parts = self.path.split('?')[0].strip('/').split('/')
        repo, rest = '/'.join(parts[:2]), parts[2:]
        if len(rest) < 3 or rest[0] != 'resolve':
          return self._error(404, 'RepoNotFound')
        if repo in hub_.gated:
          return self._error(403, 'GatedRepo')
        if repo not in hub_.repos:
          return self._error(401, 'RepoNotFound')
        data = hub_.repos[repo].get('/'.join(rest[2:]))
        if data is None:
          return self._error(404, 'EntryNotFound')
        self.send_response(200)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if body:
          self.wfile.write(data)

      def _error(self, code, error_code):
        self.send_response(code)
        self.send_header('X-Error-Code', error_code)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('Content-Length', '0')
        self.end_headers()

      def do_HEAD(self):  # noqa: N802 - the http.server API
        self._answer(body=False)

      def do_GET(self):  # noqa: N802
        self._answer(body=True)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
    self.thread = threading.Thread(
      target=self.httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True
    )

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


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
      ('hf-hub:google/bit-50', CheckpointError, "hub repo google/bit-50 is a transformers BiT .*'SAME'"),
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
