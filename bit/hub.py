"""The Hugging Face hub both ways: timm's BiT repos in, timm's format (and a model card) out.

  model, params = bit.load('hf-hub:timm/resnetv2_50x1_bit.goog_in21k', num_classes=10)
  hub.write_timm(params, 'out/', input_size=128, label_names=names)   # model.safetensors + config.json
  bit.push_to_hub('workdir/', 'me/bit-r50x1-cifar10')                   # the same, plus README.md, uploaded

Files come through `huggingface_hub.hf_hub_download`, so its cache (`HF_HOME`, `HF_HUB_CACHE`), endpoint
(`HF_ENDPOINT`), offline mode (`HF_HUB_OFFLINE=1`) and tokens (`HF_TOKEN`, `hf auth login`) all apply.

timm's layout (PyTorch state dict, OIHW convs, a 1x1-conv head) <-> this project's params:

  stem.conv.weight (O, I, 7, 7)                      root_block/conv_root/kernel (7, 7, I, O)
  stages.{s}.blocks.{b}.norm{n}.{weight,bias}        block{s+1}/unit{b+1:02d}/gn{n}/{scale,bias}
  stages.{s}.blocks.{b}.conv{n}.weight               block{s+1}/unit{b+1:02d}/conv{n}/kernel
  stages.{s}.blocks.{b}.downsample.conv.weight       block{s+1}/unit{b+1:02d}/conv_proj/kernel
  norm.{weight,bias}                                 norm_pre_head/{scale,bias}
  head.fc.weight (C, F, 1, 1), head.fc.bias (C,)     head/kernel (F, C), head/bias (C,)

timm's BiT (`resnetv2_*_bit`) is BiT's network: fixed symmetric padding, zero-padded max-pool, GroupNorm 32
eps 1e-5; its weight standardization uses eps 1e-8 where BiT (and this project) use 1e-10, a difference far
below float32 rounding of the logits (docs/hub.md). transformers' BiT repos (`google/bit-50`) are read too when
their config.json keeps BitConfig's BiT settings (symmetric padding, pre-activation units; see `_not_bit`);
their names (`bit.embedder.convolution`, `bit.encoder.stages.S.layers.B`, `bit.norm`, `classifier.1`) are
timm's under other prefixes, their head a Linear layer.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bit import files, models
from bit.errors import BitError, CheckpointError, DownloadError
from bit.types import Params, PathLike

PREFIX = 'hf-hub:'

# timm's BiT repos on the hub (timm/models/resnetv2.py, default_cfgs with hf_hub_id='timm/').
HUB_MODELS = tuple(
  [
    f'timm/resnetv2_{a}_bit.goog_{t}'
    for t in ('in21k', 'in21k_ft_in1k')
    for a in ('50x1', '50x3', '101x1', '101x3', '152x2', '152x4')
  ]
  + [
    'timm/resnetv2_50x1_bit.goog_distilled_in1k',
    'timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k',
    'timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384',
  ]
)

WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
CARD = 'README.md'
_TIMM_ARCH = re.compile(r'resnetv2_(\d+)x(\d+)_bit(m|m_in21k|_distilled|_teacher(_384)?)?')


def is_hub_name(name: object) -> bool:
  return isinstance(name, str) and name.strip().startswith(PREFIX)


def repo_id(name: str) -> str:
  """'hf-hub:timm/x' -> 'timm/x' (an '@revision' stays on: see `_split_revision`)."""
  rid = name.strip()[len(PREFIX) :].strip()
  if not re.fullmatch(r'[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?', rid):
    raise BitError(
      f'{name!r} is not a hub model name: expected hf-hub:OWNER/REPO, e.g. hf-hub:{HUB_MODELS[0]} '
      '(bit.list_models("hf-hub:*") lists the timm BiT repos).'
    )
  return rid


def _split_revision(rid: str) -> tuple[str, str | None]:
  repo, _, rev = rid.partition('@')
  return repo, rev or None


# --- downloads ---------------------------------------------------------------------------------------------


def download(rid: str, filename: str) -> pathlib.Path:
  """One file of a hub repo, through huggingface_hub's cache; a DownloadError naming repo and file, in one line."""
  try:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors
  except ImportError as e:  # a dependency, but say what to do if an install lacks it
    raise BitError('hf-hub: models need huggingface_hub: pip install huggingface_hub safetensors.') from e
  repo, rev = _split_revision(rid)
  where = f'{filename} of hub repo {repo}' + (f' at revision {rev}' if rev else '')
  try:
    return pathlib.Path(huggingface_hub.hf_hub_download(repo, filename, revision=rev, library_name='bit'))
  except hf_errors.GatedRepoError:
    raise DownloadError(
      f'{where}: the repo is gated: accept its terms on the hub, then log in (hf auth login) or set HF_TOKEN.'
    ) from None
  except hf_errors.RepositoryNotFoundError:
    raise DownloadError(
      f'{where}: no such repo (or a private one: log in with hf auth login or set HF_TOKEN). Check the name; '
      'bit.list_models("hf-hub:*") lists the timm BiT repos.'
    ) from None
  except hf_errors.RevisionNotFoundError:
    raise DownloadError(f'{where}: the repo has no revision {rev!r}.') from None
  except hf_errors.LocalEntryNotFoundError:
    offline = os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')
    why = 'HF_HUB_OFFLINE is set' if offline else 'the hub cannot be reached'
    raise DownloadError(
      f'{where}: {why} and the file is not in the hub cache ({_cache_dir()}): download it once with network '
      '(or copy a filled cache there: HF_HOME / HF_HUB_CACHE).'
    ) from None
  except hf_errors.EntryNotFoundError:
    raise DownloadError(f'{where}: the repo has no such file; is it a timm BiT repo?') from None
  except (hf_errors.HfHubHTTPError, OSError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DownloadError(f'{where}: {first}') from None


def _cache_dir() -> str:
  try:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
  except (ImportError, AttributeError):
    return '$HF_HOME/hub'


def read_config(rid: str) -> dict[str, Any]:
  path = download(rid, CONFIG)
  try:
    config = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{CONFIG} of hub repo {rid} is not readable JSON ({e}).') from e
  if not isinstance(config, dict):
    raise CheckpointError(f'{CONFIG} of hub repo {rid} is not a JSON object.')
  return config


def is_transformers(config: Mapping[str, Any]) -> bool:
  return config.get('model_type') == 'bit' or 'BitForImageClassification' in (
    config.get('architectures') or []
  )


# transformers' BitConfig values that make its network BiT's (BitConfig's defaults, google/bit-50's); any other
# value changes the numerics (see docs/hub.md for what 'SAME' padding costs) or the architecture.
_TRANSFORMERS_BIT = {
  'layer_type': 'preactivation',
  'global_padding': None,
  'embedding_dynamic_padding': False,
  'hidden_act': 'relu',
  'num_groups': 32,
  'output_stride': 32,
}


def _not_bit(rid: str, config: Mapping[str, Any]) -> str | None:
  """Why `config` is not a BiT ResNetV2 with BiT's numerics (None when it is one: timm's or transformers')."""
  if is_transformers(config):
    for key, want in _TRANSFORMERS_BIT.items():
      have = config.get(key, want)
      if (have or None) != (want or None):  # None, False and '' alike: 'not set'
        why = {
          'global_padding': "TF-style 'SAME' padding is asymmetric at stride 2 where BiT pads symmetrically",
          'embedding_dynamic_padding': 'its stem pads dynamically (TF-style SAME) where BiT pads symmetrically',
          'layer_type': "'bottleneck' is the post-activation ResNet of ViT-hybrid backbones, not BiT's",
        }.get(key, "not BiT's")
        return (
          f"hub repo {rid} is a transformers BiT whose numerics are not BiT's: {CONFIG} has {key}={have!r} ({why}); "
          f"bit reads transformers BiT repos with {key}={want!r} only. For BiT's weights use a timm repo, e.g. "
          'hf-hub:timm/resnetv2_50x1_bit.goog_in21k_ft_in1k (docs/hub.md).'
        )
    return None
  arch = config.get('architecture')
  if not isinstance(arch, str) or not _TIMM_ARCH.fullmatch(arch):
    what = f'architecture={arch!r}' if arch else f'architectures={config.get("architectures")!r}'
    return (
      f'hub repo {rid} is not a BiT ResNetV2: its {CONFIG} says {what} (timm BiT repos say '
      'resnetv2_50x1_bit, resnetv2_152x2_bit, ...). bit.list_models("hf-hub:*") lists them.'
    )
  return None


def from_transformers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers' BitForImageClassification names -> timm's (the same layers, the head a Linear layer)."""
  out = {}
  for k, v in state.items():
    if k == 'classifier.1.weight' and getattr(v, 'ndim', 0) == 2:
      out['head.fc.weight'] = np.asarray(v)[:, :, None, None]
      continue
    name = re.sub(r'^bit\.embedder\.convolution\.', 'stem.conv.', k)
    name = re.sub(r'^bit\.encoder\.stages\.(\d+)\.layers\.', r'stages.\1.blocks.', name)
    name = re.sub(r'^bit\.norm\.', 'norm.', name)
    name = re.sub(r'^classifier\.1\.', 'head.fc.', name)
    out[name] = v
  return out


def architecture(name: str) -> str:
  """'R50x1' for a hub model name, from its config.json (a small download, cached)."""
  rid = repo_id(name)
  config = read_config(rid)
  why = _not_bit(rid, config)
  if why:
    raise CheckpointError(why)
  return architecture_from_config(config)


# --- timm's layout <-> params ------------------------------------------------------------------------------


def timm_key(path: tuple[str, ...]) -> str:
  """timm's state-dict name of a param path such as ('block1', 'unit01', 'gn1', 'scale')."""
  leaf = {'scale': 'weight', 'bias': 'bias', 'kernel': 'weight'}
  match tuple(path):
    case ('root_block', 'conv_root', 'kernel'):
      return 'stem.conv.weight'
    case (block, unit, layer, name) if block.startswith('block') and unit.startswith('unit'):
      where = f'stages.{int(block[5:]) - 1}.blocks.{int(unit[4:]) - 1}'
      if layer == 'conv_proj':
        return f'{where}.downsample.conv.weight'
      if re.fullmatch(r'gn[123]', layer):
        return f'{where}.norm{layer[2]}.{leaf[name]}'
      return f'{where}.{layer}.weight'
    case ('norm_pre_head', name):
      return f'norm.{leaf[name]}'
    case ('head', 'kernel'):
      return 'head.fc.weight'
    case ('head', 'bias'):
      return 'head.fc.bias'
  raise BitError(f'The param {"/".join(path)} has no timm name.')


def _to_timm(path: tuple[str, ...], arr: np.ndarray) -> np.ndarray:
  if tuple(path) == ('head', 'kernel'):  # (F, C) -> (C, F, 1, 1)
    return np.ascontiguousarray(arr.T[:, :, None, None])
  if arr.ndim == 4:  # HWIO -> OIHW
    return np.ascontiguousarray(arr.transpose(3, 2, 0, 1))
  return arr


def _timm_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if tuple(path) == ('head', 'kernel'):
    return (shape[1], shape[0], 1, 1)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _from_timm(path: tuple[str, ...], arr: np.ndarray) -> np.ndarray:
  if tuple(path) == ('head', 'kernel'):
    return arr[:, :, 0, 0].T
  if arr.ndim == 4:  # OIHW -> HWIO
    return arr.transpose(2, 3, 1, 0)
  return arr


def _infer(state: Mapping[str, np.ndarray], source: str) -> tuple[int, int, int, int]:
  """(depth, width, num_classes, in_chans) of a timm ResNetV2 state dict, from its names and shapes."""
  units = collections.defaultdict(int)
  for k in state:
    m = re.match(r'stages\.(\d+)\.blocks\.(\d+)\.', k)
    if m:
      units[int(m.group(1))] = max(units[int(m.group(1))], int(m.group(2)) + 1)
  counts = tuple(units.get(s, 0) for s in range(max(units, default=3) + 1))
  depths = [d for d, blocks in models.BLOCKS.items() if blocks == counts]
  if not depths:
    raise CheckpointError(
      f'{source}: its blocks per stage {counts} match no BiT depth '
      f'({", ".join(f"{d}: {b}" for d, b in models.BLOCKS.items())}); is it a timm ResNetV2 BiT state dict '
      f'(names like stages.0.blocks.0.conv1.weight)? First names: {", ".join(sorted(state)[:3])}.'
    )
  stem = state.get('stem.conv.weight')
  if stem is None or stem.ndim != 4 or stem.shape[0] % 64:
    raise CheckpointError(f'{source}: stem.conv.weight is missing or has no multiple of 64 output channels.')
  head = state.get('head.fc.bias')
  classes = int(head.shape[0]) if head is not None and head.ndim == 1 else 1
  return depths[0], stem.shape[0] // 64, classes, int(stem.shape[1])


def timm_to_params(
  state: Mapping[str, np.ndarray], *, source: str = 'checkpoint'
) -> tuple[int, int, int, dict[str, Any]]:
  """timm-layout arrays -> (depth, width, num_classes, params), strictly: every missing, unexpected,
  mis-shaped or non-float array listed in one CheckpointError naming `source`; nothing half-loaded."""
  depth, width, classes, in_chans = _infer(state, source)
  arch = models.architecture_name(depth, width)
  try:
    model = models.create_model(arch, classes, in_chans=in_chans)
  except BitError as e:
    raise CheckpointError(
      f'{source}: looks like {arch} with {classes} classes, which bit cannot build: {e}'
    ) from e
  from bit.param_tree import flatten as _flatten
  from bit.param_tree import strict_check
  from bit.param_tree import unflatten as _unflatten

  expected = {
    timm_key(p): (p, _timm_shape(p, leaf.shape)) for p, leaf in _flatten(models.param_shapes(model))
  }
  strict_check(
    state,
    {k: s for k, (_, s) in expected.items()},
    f'{source} does not fit BiT {arch} with {classes} classes (read from its names); nothing was loaded.',
    'Use a timm BiT ResNetV2 state dict (resnetv2_*_bit) or one written by bit-export --format timm.',
  )
  import jax.numpy as jnp

  params = _unflatten(
    (p, jnp.asarray(np.ascontiguousarray(_from_timm(p, np.asarray(state[k], np.float32)))))
    for k, (p, _) in expected.items()
  )
  return depth, width, classes, params


def params_to_timm(params: Params) -> dict[str, np.ndarray]:
  """Params -> timm's state dict (float32 numpy, contiguous): the exact inverse of `timm_to_params`."""
  import jax

  from bit.param_tree import flatten as _flatten

  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  return {timm_key(p): _to_timm(p, np.asarray(jax.device_get(v), np.float32)) for p, v in _flatten(params)}


def read_safetensors(path: pathlib.Path, source: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise BitError('hf-hub: models need safetensors: pip install safetensors.') from e
  try:
    return load_file(str(path))
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a broken file
    raise CheckpointError(
      f'{source} is not a readable safetensors file ({type(e).__name__}: {e}); delete it from the hub cache '
      'and it is downloaded again.'
    ) from e


def load(name: str) -> tuple[str, int, dict[str, Any], int | None, list[str] | None]:
  """(arch, classes, params, input_size, label_names) of a hub model name; see `bit.load`."""
  rid = repo_id(name)
  config = read_config(rid)
  why = _not_bit(rid, config)
  if why:
    raise CheckpointError(why)
  path = download(rid, WEIGHTS)
  source = f'{WEIGHTS} of hub repo {rid}'
  state = read_safetensors(path, source)
  if is_transformers(config):
    state = from_transformers(state)
  depth, width, classes, params = timm_to_params(state, source=source)
  arch = models.architecture_name(depth, width)
  said = architecture_from_config(config)
  if said != arch:
    raise CheckpointError(f'hub repo {rid}: {CONFIG} describes {said}, its weights are {arch}.')
  return arch, classes, params, input_size(config), label_names_from_config(config, classes)


def architecture_from_config(config: Mapping[str, Any]) -> str:
  """'R50x1' from a timm config.json (its architecture) or a transformers one (depths, width_factor)."""
  if is_transformers(config):
    depths = tuple(config.get('depths') or ())
    found = [d for d, blocks in models.BLOCKS.items() if blocks == depths]
    if not found:
      raise CheckpointError(
        f'transformers BiT with depths={list(depths)}: no BiT depth has those units per stage.'
      )
    return models.architecture_name(found[0], int(config.get('width_factor') or 1))
  depth, width = _TIMM_ARCH.fullmatch(config['architecture']).group(1, 2)
  return models.architecture_name(int(depth), int(width))


def input_size(config: Mapping[str, Any]) -> int | None:
  size = (config.get('pretrained_cfg') or {}).get('input_size')
  if isinstance(size, list | tuple) and len(size) == 3 and size[1] == size[2] and isinstance(size[1], int):
    return size[1] if size[1] >= models.MIN_IMAGE_SIZE else None
  return None


def label_names_from_config(config: Mapping[str, Any], classes: int) -> list[str] | None:
  """timm's `label_names` (a list, or {index: name}), or transformers' `id2label`."""
  names = config.get('label_names') or config.get('id2label')
  if isinstance(names, Mapping):  # timm allows {index: name} when there are gaps
    try:
      names = [str(names.get(str(i), names.get(i, ''))) for i in range(classes)]
    except (TypeError, ValueError):
      return None
  if isinstance(names, list | tuple) and len(names) == classes:
    return [str(n) for n in names]
  return None


def label_names(name: str) -> list[str] | None:
  rid = repo_id(name)
  config = read_config(rid)
  classes = config.get('num_classes')
  if not isinstance(classes, int) and isinstance(config.get('id2label'), Mapping):
    classes = len(config['id2label'])
  return label_names_from_config(config, classes) if isinstance(classes, int) else None


# --- writing timm's format, and the hub upload -------------------------------------------------------------


def timm_config(
  arch: str,
  num_classes: int,
  *,
  input_size: int | None,
  label_names: Sequence[str] | None = None,
  in_chans: int = 3,
) -> dict[str, Any]:
  """config.json as timm's `save_for_hf` writes it for a BiT ResNetV2 (so timm builds the model from it)."""
  depth, width = models.parse_architecture(arch)
  size = int(input_size or 224)
  config = {
    'architecture': f'resnetv2_{depth}x{width}_bit',
    'num_classes': int(num_classes),
    'num_features': 2048 * width,
    'global_pool': 'avg',
  }
  if label_names is not None:
    config['label_names'] = [str(n) for n in label_names]
  config['model_args'] = {'num_classes': int(num_classes), 'in_chans': int(in_chans), 'global_pool': 'avg'}
  config['pretrained_cfg'] = {
    'custom_load': False,
    'input_size': [int(in_chans), size, size],
    'fixed_input_size': False,
    'interpolation': 'bilinear',
    'crop_pct': 1.0,
    'crop_mode': 'center',
    'mean': [0.5] * in_chans,
    'std': [0.5] * in_chans,
    'num_classes': int(num_classes),
    'pool_size': [-(-size // 32)] * 2,
    'first_conv': 'stem.conv',
    'classifier': 'head.fc',
  }
  return config


def write_timm(
  params: Params, output: PathLike, *, input_size: int | None = None, label_names: Sequence[str] | None = None
) -> pathlib.Path:
  """Writes `output/model.safetensors` + `output/config.json` in timm's hub layout; returns `output`.

  `timm.create_model('local-dir:OUTPUT', pretrained=True)` builds the model with these weights (and, uploaded,
  'hf-hub:user/repo'); `bit.load('hf-hub:...')` reads the uploaded repo back exactly.
  """
  from safetensors.numpy import save

  state = params_to_timm(params)
  from bit.param_tree import root_kernel as _root_kernel

  p = params['params'] if isinstance(params, Mapping) and set(params) == {'params'} else params
  in_chans = int(_root_kernel(p).shape[2])
  width = state['stem.conv.weight'].shape[0] // 64
  depth = _infer(state, 'params')[0]
  classes = int(state['head.fc.bias'].shape[0])
  if label_names is not None and len(label_names) != classes:
    raise BitError(f'{len(label_names)} label names for a {classes}-class head.')
  output = pathlib.Path(output).expanduser()
  output.mkdir(parents=True, exist_ok=True)
  with files.atomic_write(output / WEIGHTS, 'wb') as f:
    f.write(save(state, metadata={'format': 'pt'}))  # timm's (PyTorch) layout, as timm's own files say
  config = timm_config(
    models.architecture_name(depth, width),
    classes,
    input_size=input_size,
    label_names=label_names,
    in_chans=in_chans,
  )
  files.write_json(output / CONFIG, config)
  return output
