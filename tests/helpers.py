"""Shared test helpers: tiny image folders, random checkpoints and the tiny training config, tiny random params, running a console script in-process or bit-train in a subprocess,
two-process runs, a local file server."""

import hashlib
import http.server
import io
import os
import pathlib
import platform
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from bit import config as common
from bit import models
from bit.testing import random_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent

NUM_CLASSES = 10
SCHEDULE = (2, 4, 6, 8, 10)
# Ten well separated colours: a random R26x1 backbone tells them apart, so ten steps of SGD lower the loss.
PALETTE = np.array(
  [
    [220, 30, 30],
    [30, 220, 30],
    [30, 30, 220],
    [220, 220, 30],
    [220, 30, 220],
    [30, 220, 220],
    [240, 240, 240],
    [20, 20, 20],
    [128, 64, 0],
    [0, 100, 128],
  ]
)


def make_folder(root, classes=NUM_CLASSES, train_per_class=4, test_per_class=2, size=32, seed=0):
  """An image folder ROOT/{train,test}/class_i/*.png whose class is the (noisy) colour of the image."""
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  for split, n in (('train', train_per_class), ('test', test_per_class)):
    for c in range(classes):
      d = root / split / f'class_{c}'
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        img = np.clip(PALETTE[c] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f'{i}.png')
  return root


def make_npz(path, classes=5, seed=0):
  """A random R26x1 checkpoint in the official layout (its head is replaced when fine-tuning)."""
  np.savez(path, **random_checkpoint(26, 1, classes, seed))
  return pathlib.Path(path)


def base_config(model, dataset, **overrides):
  """The shared tiny config: the same values as `cli_command` passes on the command line."""
  c = common.get_config()
  c.model, c.dataset = str(model), str(dataset)
  c.batch_size, c.resize, c.crop, c.schedule, c.mixup_alpha = 8, 40, 32, SCHEDULE, 0.1
  c.seed, c.eval_every, c.checkpoint_every, c.log_every = 0, 0, 2, 1
  for k, v in overrides.items():
    c[k] = v
  return c


def flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f'{prefix}{k}/'))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def assert_params_close(a, b, atol=2e-5, rtol=1e-3):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], atol=atol, rtol=rtol, err_msg=k)


def _not_glibc() -> str | None:
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return 'needs glibc malloc (Linux): bit/malloc.py changes nothing elsewhere'
  return None


def _not_cpu_backend() -> str | None:
  if jax.default_backend() != 'cpu':
    return (
      f'measures the CPU backend, and this run uses {jax.default_backend()} (run it with JAX_PLATFORMS=cpu)'
    )
  return None


def _not_cpu_runtime() -> str | None:
  if 'jax_cpu_enable_async_dispatch' not in jax.config.values:
    return f'jax {jax.__version__} has no jax_cpu_enable_async_dispatch, the setting bit/malloc.py makes'
  return _not_glibc() or _not_cpu_backend()


# Tests of what only holds on one platform skip there with the reason, instead of failing elsewhere.
glibc_only = pytest.mark.skipif(_not_glibc() is not None, reason=_not_glibc() or '')
cpu_backend_only = pytest.mark.skipif(_not_cpu_backend() is not None, reason=_not_cpu_backend() or '')
cpu_runtime_only = pytest.mark.skipif(_not_cpu_runtime() is not None, reason=_not_cpu_runtime() or '')


def fast_params(model, seed=0, head_std=0.0):
  """Random params from the shapes alone (no compiled init): standardized convs make any kernel usable.

  GroupNorm scales are ones, biases zeros; `head_std` > 0 gives a random head, so that predictions differ
  between images (a zero head predicts the same for every image).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return np.ones(s.shape, np.float32)
    if 'bias' in name:
      return np.zeros(s.shape, np.float32)
    return rng.normal(0, head_std if 'head' in name else 1.0, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, models.param_shapes(model))


def run_cli(main, argv, capsys, monkeypatch):
  """Runs a console-script entry point in this process; returns (exit code, stdout, stderr)."""
  from absl import flags

  flags.FLAGS.unparse_flags()  # flag values must not leak from one command to the next
  # config_flags defines --config and its --config.<key> overrides when a config is parsed; another
  # command's config (or the same one again) must be able to define them anew.
  for name in [n for n in flags.FLAGS if n == 'config' or n.startswith('config.')]:
    delattr(flags.FLAGS, name)
  monkeypatch.setattr(sys, 'argv', [str(a) for a in argv])
  with pytest.raises(SystemExit) as e:
    main()
  out, err = capsys.readouterr()
  return e.value.code or 0, out, err


def train_command(workdir, model, dataset, *overrides) -> list[str]:
  """bit-train in a subprocess at the tests' tiny settings (batch 8, 40 -> 32 px crops, 10 steps), then `overrides`."""
  return [
    sys.executable,
    '-c',
    'from bit.tools.cli import train_main; train_main()',
    '--config',
    str(ROOT / 'configs' / 'common.py'),
    '--workdir',
    str(workdir),
    f'--config.model={model}',
    f'--config.dataset={dataset}',
    '--config.batch_size=8',
    '--config.resize=40',
    '--config.crop=32',
    '--config.schedule=[2,4,6,8,10]',
    '--config.mixup_alpha=0.1',
    *overrides,
  ]


def free_port() -> int:
  """A port on 127.0.0.1 that was free a moment ago (bound, then closed: nothing listens there)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_two_processes(code: str, *args) -> list[subprocess.Popen]:
  """`python -c code ADDRESS I *args` for I = 0 and 1: a two-process jax.distributed run on 127.0.0.1 with two
  CPU devices per process (`code` calls `parallel.initialize_distributed(ADDRESS, 2, I)`)."""
  address = f'127.0.0.1:{free_port()}'
  env = dict(
    without_compilation_cache(os.environ),  # a cached step deadlocked the gloo collectives of a rerun
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    JAX_PLATFORMS='cpu',
  )
  return [
    subprocess.Popen(
      [sys.executable, '-c', code, address, str(i), *map(str, args)],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]


class _QuietServer(http.server.ThreadingHTTPServer):
  def handle_error(self, request, client_address):
    pass  # a client that hangs up early (as some tests make it) is expected here, not a failure


class _LocalServer:
  """`self.httpd` (set by the subclass before `super().__init__()`) served from a thread while in `with`."""

  def __init__(self):
    self.thread = threading.Thread(
      target=self.httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True
    )

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


class FileServer(_LocalServer):
  """Serves `files` (name -> bytes) on 127.0.0.1 and records every request as (path, Range header).

  Misbehaviour on demand: `ranges=False` ignores Range headers (always 200, whole file); `drops=n` cuts the
  body of the next n responses after `drop_at` bytes and closes the connection (the Content-Length still
  promises the whole body).
  """

  def __init__(self, files):
    self.files = dict(files)
    self.requests = []
    self.ranges = True
    self.drops = 0
    self.drop_at = 0
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 - the http.server API
        rng = self.headers.get('Range')
        server.requests.append((self.path, rng))
        data = server.files.get(self.path.lstrip('/'))
        if data is None:
          self.send_error(404)
          return
        start = 0
        if rng and server.ranges:
          start = int(rng.split('=')[1].split('-')[0])
          if start >= len(data):
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{len(data)}')
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
          self.send_response(206)
          self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        else:
          self.send_response(200)
        if server.ranges:
          self.send_header('Accept-Ranges', 'bytes')
        body = data[start:]
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if server.drops > 0:
          server.drops -= 1
          body = body[: server.drop_at]
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = _QuietServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
    super().__init__()


def checkpoint_bytes(depth=26, classes=10, seed=0) -> bytes:
  """A generated checkpoint in the official layout, as the bytes of its .npz file."""
  buf = io.BytesIO()
  np.savez(buf, **random_checkpoint(depth=depth, width=1, classes=classes, seed=seed))
  return buf.getvalue()


def without_compilation_cache(env):
  """`env` without the session's JAX compilation cache (tests/conftest.py), for processes joined by gloo."""
  return {k: v for k, v in env.items() if k != 'JAX_COMPILATION_CACHE_DIR'}


def kill_after_checkpoint(cmd, workdir, env, *, step: int = 2, cwd=None, timeout: float = 300) -> None:
  """Starts `cmd`, SIGKILLs it as soon as `workdir`'s checkpoint of `step` exists, and checks that the run had
  not finished (no model.npz) by then."""
  workdir = pathlib.Path(workdir)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
  deadline = time.time() + timeout
  while not (workdir / 'checkpoints' / str(step)).exists():
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    assert time.time() < deadline, f'no checkpoint after {timeout:.0f} s'
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert not (workdir / 'model.npz').exists(), 'the run finished before it could be killed'


COMMIT = 'c0ffee' + '0' * 34


class FakeHub(_LocalServer):
  """Serves repos ({repo_id: {filename: bytes}}) the way the hub's resolve endpoint does, recording every
  request as (method, path). `gated` repos answer 403 GatedRepo; with `default`, any other repo id serves those files."""

  def __init__(self, repos, gated=(), default=None):
    self.repos, self.gated, self.requests, self.default = repos, set(gated), [], default
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
        files = hub_.repos.get(repo, hub_.default)
        if files is None:
          return self._error(401, 'RepoNotFound')
        data = files.get('/'.join(rest[2:]))
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
    super().__init__()
