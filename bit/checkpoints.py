"""The official BiT checkpoints: registry, download, and one strict mapping official .npz <-> Flax params.

  model, params = bit.load('BiT-M-R50x1', num_classes=10)      # registry name: download/cache, new head
  model, params = bit.load('path/to/file.npz', keep_head=True)   # a local official-layout file, its own head
  model, params = bit.load('R50x1', num_classes=10)             # architecture only: random init (scratch)
  bit.save_npz(params, 'model.npz')                             # official layout: timm and big_transfer read it

Official layout (HWIO kernels, 1-D GroupNorm gamma/beta) -> Flax param tree:

  resnet/root_block/standardized_conv2d/kernel           root_block/conv_root/kernel
  resnet/block{b}/unit{uu}/a/group_norm/{gamma,beta}     block{b}/unit{uu}/gn1/{scale,bias}
  resnet/block{b}/unit{uu}/a/standardized_conv2d/kernel  block{b}/unit{uu}/conv1/kernel   (b -> gn2/conv2,
  resnet/block{b}/unit{uu}/a/proj/standardized_conv2d/kernel  .../conv_proj/kernel          c -> gn3/conv3)
  resnet/group_norm/{gamma,beta}                         norm_pre_head/{scale,bias}
  resnet/head/conv2d/kernel (1, 1, F, C), .../bias (C,)  head/kernel (F, C), head/bias (C,)
"""

import collections
import dataclasses
import difflib
import fnmatch
import operator
import os
import pathlib
import re
import warnings
from collections.abc import Mapping
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
from typing_extensions import deprecated

from bit import arguments, files, layout, models
from bit.downloader import cache_dir, cache_path, download
from bit.errors import BitError, CheckpointError, DownloadError
from bit.types import DType, Params, PathLike

__all__ = [
  'REGISTRY',
  'PretrainedCfg',
  'list_models',
  'get_pretrained_cfg',
  'base_url',
  'cache_dir',
  'download',
  'load_npz',
  'npz_to_params',
  'params_to_npz',
  'save_npz',
  'load',
  'reset_head',
  'label_names',
  'official_key',
]

DEFAULT_BASE_URL = 'https://storage.googleapis.com/bit_models/'
IMAGENET1K_LABELS = 'ilsvrc2012_wordnet_lemmas.txt'
IMAGENET21K_LABELS = 'imagenet21k_wordnet_lemmas.txt'


def base_url() -> str:
  """Where the official files live: `$BIT_MODELS_URL` (a mirror, or a local test server) or the GCS bucket."""
  return (os.environ.get('BIT_MODELS_URL') or DEFAULT_BASE_URL).rstrip('/') + '/'


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
  """One released checkpoint. `file` and `labels_file` are relative to `base_url()`."""

  name: str
  file: str
  architecture: str  # 'R50x1', ...
  num_classes: int  # of the checkpoint's own head
  labels_file: str | None = None
  resolution: int | None = None  # the image size the checkpoint was trained (or fine-tuned) at
  description: str = ''
  sha256: str | None = None  # optional integrity data; the bucket publishes none, so these are unset
  size: int | None = None

  @property
  def url(self) -> str:
    return base_url() + self.file

  @property
  def labels_url(self) -> str | None:
    return base_url() + self.labels_file if self.labels_file else None


def _build_registry() -> dict[str, PretrainedCfg]:
  reg = {}

  def add(cfg):
    reg[cfg.name] = cfg

  for arch in models.ARCHITECTURES:
    add(
      PretrainedCfg(
        f'BiT-S-{arch}',
        f'BiT-S-{arch}.npz',
        arch,
        1000,
        IMAGENET1K_LABELS,
        224,
        'BiT-S: upstream on ImageNet-1k (ILSVRC-2012), 1,000-class head.',
      )
    )
  for arch in models.ARCHITECTURES:
    add(
      PretrainedCfg(
        f'BiT-M-{arch}',
        f'BiT-M-{arch}.npz',
        arch,
        21843,
        IMAGENET21K_LABELS,
        224,
        'BiT-M: upstream on ImageNet-21k, 21,843-class head.',
      )
    )
  for arch in models.ARCHITECTURES:
    # Fine-tuned with the BiT-HyperRule, whose ImageNet crop is 480 px.
    add(
      PretrainedCfg(
        f'BiT-M-{arch}-ILSVRC2012',
        f'BiT-M-{arch}-ILSVRC2012.npz',
        arch,
        1000,
        IMAGENET1K_LABELS,
        480,
        'BiT-M fine-tuned on ImageNet-1k (ILSVRC-2012).',
      )
    )
  for res in (224, 160):
    add(
      PretrainedCfg(
        f'BiT-R50x1-distilled-{res}',
        f'distill/R50x1_{res}.npz',
        'R50x1',
        1000,
        IMAGENET1K_LABELS,
        res,
        f'R50x1 distilled from BiT-M-R152x2 on ImageNet-1k at {res} px ("a good teacher is patient and '
        'consistent").',
      )
    )
  for res in (224, 384):
    add(
      PretrainedCfg(
        f'BiT-M-R152x2-teacher-{res}',
        f'distill/R152x2_T_{res}.npz',
        'R152x2',
        1000,
        IMAGENET1K_LABELS,
        res,
        f'The BiT-M-R152x2 ImageNet-1k teacher of the distilled models, at {res} px.',
      )
    )
  return reg


REGISTRY: dict[str, PretrainedCfg] = _build_registry()


def list_models(pattern: str | None = None) -> list[str]:
  """The registry names (optionally filtered by a shell pattern such as 'BiT-M-*'), in registry order."""
  names = list(REGISTRY)
  if pattern:
    names = [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())]
  return names


def _unknown(name: str) -> BitError:
  choices = list(REGISTRY) + list(models.ARCHITECTURES)
  lower = {c.lower(): c for c in choices}
  close = [lower[c] for c in difflib.get_close_matches(str(name).lower(), list(lower), n=5, cutoff=0.6)]
  hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
  return BitError(
    f'Unknown model {name!r}: not a registry name, an architecture (R<depth>x<width>, e.g. R50x1) or an '
    f'existing .npz file.{hint} See bit.list_models() for the released checkpoints.'
  )


def get_pretrained_cfg(name: str) -> PretrainedCfg:
  """The registry entry for `name` (case-insensitive); BitError listing close matches otherwise."""
  if name in REGISTRY:
    return REGISTRY[name]
  for key, cfg in REGISTRY.items():
    if key.lower() == str(name).lower():
      return cfg
  raise _unknown(name)


# --- the one mapping between official keys and Flax param paths --------------------------------------------

_GN = {'gn1': 'a', 'gn2': 'b', 'gn3': 'c'}
_CONV = {'conv1': 'a', 'conv2': 'b', 'conv3': 'c'}
_GN_LEAF = {'scale': 'gamma', 'bias': 'beta'}


def official_key(path: tuple[str, ...]) -> str:
  """The official .npz key of a Flax param path such as ('block1', 'unit01', 'gn1', 'scale')."""
  match tuple(path):
    case ('root_block', 'conv_root', 'kernel'):
      return 'resnet/root_block/standardized_conv2d/kernel'
    case (block, unit, 'conv_proj', 'kernel'):
      return f'resnet/{block}/{unit}/a/proj/standardized_conv2d/kernel'
    case (block, unit, gn, leaf) if gn in _GN and leaf in _GN_LEAF:
      return f'resnet/{block}/{unit}/{_GN[gn]}/group_norm/{_GN_LEAF[leaf]}'
    case (block, unit, conv, 'kernel') if conv in _CONV:
      return f'resnet/{block}/{unit}/{_CONV[conv]}/standardized_conv2d/kernel'
    case ('norm_pre_head', leaf) if leaf in _GN_LEAF:
      return f'resnet/group_norm/{_GN_LEAF[leaf]}'
    case ('head', 'kernel'):
      return 'resnet/head/conv2d/kernel'
    case ('head', 'bias'):
      return 'resnet/head/conv2d/bias'
  raise BitError(f'The param {"/".join(path)} has no official BiT checkpoint name.')


def _official_shape(path, shape) -> tuple[int, ...]:
  # The official head is a 1x1 convolution; ours is a Dense layer.
  return (1, 1, *shape) if tuple(path) == ('head', 'kernel') else tuple(shape)


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def _unflatten(items) -> dict:
  tree = {}
  for path, v in items:
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


# --- reading and writing .npz files -----------------------------------------------------------------------


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  """All arrays of an .npz file, read eagerly; CheckpointError naming the file if it is missing or broken."""
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise CheckpointError(
      f'No checkpoint file at {path}: check the path (or use a registry name, see bit.list_models()).'
    )
  if path.is_dir():
    raise CheckpointError(f'{path} is a directory, not an .npz checkpoint file.')
  try:
    obj = np.load(path, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - numpy raises many types for a bad file; all mean the same here
    raise CheckpointError(
      f'{path} is not a readable .npz file ({type(e).__name__}: {e}). It may be '
      'truncated or corrupt: delete it and download or export it again.'
    ) from e
  if not isinstance(obj, np.lib.npyio.NpzFile):
    raise CheckpointError(f'{path} holds a single array, not an .npz archive of named arrays.')
  try:
    with obj:
      weights = {k: obj[k] for k in obj.files}
  except Exception as e:  # noqa: BLE001 - a member that fails its CRC or ends early
    raise CheckpointError(
      f'{path} is truncated or corrupt ({type(e).__name__}: {e}): delete it and download or export it again.'
    ) from e
  if not weights:
    raise CheckpointError(f'{path} is an empty .npz archive: it holds no arrays.')
  return weights


def _infer(weights, source) -> tuple[int, int, int]:
  """(depth, width, num_classes) of an official-layout checkpoint, from its keys and shapes."""
  units = collections.defaultdict(int)
  for k in weights:
    m = re.match(r'resnet/block(\d+)/unit(\d+)/', k)
    if m:
      units[int(m.group(1))] = max(units[int(m.group(1))], int(m.group(2)))
  counts = tuple(units.get(b, 0) for b in range(1, max(units, default=4) + 1))
  depths = [d for d, blocks in models.BLOCKS.items() if blocks == counts]
  if not depths:
    some = ', '.join(sorted(weights)[:3])
    raise CheckpointError(
      f'{source}: its units per block {counts} match no known depth '
      f'({", ".join(f"{d}: {b}" for d, b in models.BLOCKS.items())}). Is it an official BiT checkpoint '
      f'(keys like resnet/block1/unit01/...)? First keys: {some}.'
    )
  depth = depths[0]
  # The root conv has 64*width channels; fall back on other keys so that a missing root still gets listed
  # among all the other problems instead of hiding them.
  width = None
  for key, axis, per_width in (
    ('resnet/root_block/standardized_conv2d/kernel', -1, 64),
    ('resnet/block1/unit01/a/group_norm/gamma', 0, 64),
    ('resnet/group_norm/gamma', 0, 2048),
  ):
    w = weights.get(key)
    if w is not None and w.ndim >= 1 and w.shape[axis] % per_width == 0 and w.shape[axis] > 0:
      width = w.shape[axis] // per_width
      break
  if width is None:
    raise CheckpointError(
      f'{source}: cannot tell the width: resnet/root_block/standardized_conv2d/kernel is '
      'missing or does not have a multiple of 64 output channels.'
    )
  classes = 1  # a placeholder when the head is missing: the missing keys are reported below
  for key, axis in (('resnet/head/conv2d/kernel', -1), ('resnet/head/conv2d/bias', 0)):
    w = weights.get(key)
    if w is not None and w.ndim >= 1:
      classes = int(w.shape[axis])
      break
  return depth, width, classes


def npz_to_params(
  weights: Mapping[str, np.ndarray], *, source: str = 'checkpoint'
) -> tuple[int, int, int, dict[str, Any]]:
  """Official-layout arrays -> (depth, width, num_classes, params), strictly.

  The architecture and the number of classes are read from the keys and shapes; every key and shape is then
  compared with the model's own param tree (`jax.eval_shape`, nothing allocated). A CheckpointError names
  `source` and lists every missing, unexpected, mis-shaped or non-float array; nothing is half-loaded.
  """
  depth, width, classes = _infer(weights, source)
  arch = models.architecture_name(depth, width)
  try:
    model = models.create_model(arch, classes)
  except BitError as e:
    raise CheckpointError(
      f'{source}: the checkpoint looks like {arch} with {classes} classes, which this '
      f'library cannot build: {e}'
    ) from e
  expected = {}
  for path, leaf in _flatten(models.param_shapes(model)):
    expected[official_key(path)] = (path, _official_shape(path, leaf.shape))
  missing = [f'{k} {shape}' for k, (_, shape) in expected.items() if k not in weights]
  unexpected = [f'{k} {tuple(np.shape(w))}' for k, w in weights.items() if k not in expected]
  misshaped, nonfloat = [], []
  for k, (_, shape) in expected.items():
    if k in weights:
      w = weights[k]
      if tuple(w.shape) != shape:
        misshaped.append(f'{k}: {tuple(w.shape)} in the file, the model expects {shape}')
      elif not np.issubdtype(w.dtype, np.floating):
        nonfloat.append(f'{k}: dtype {w.dtype}')
  if missing or unexpected or misshaped or nonfloat:
    lines = [
      f'{source} does not fit BiT {arch} with {classes} classes (read from its keys); nothing was loaded.'
    ]
    for title, items in (
      ('missing', missing),
      ('unexpected', unexpected),
      ('wrong shape', misshaped),
      ('not floating point', nonfloat),
    ):
      if items:
        lines.append(f'  {title} ({len(items)}):')
        lines.extend(f'    {item}' for item in items)
    lines.append('Use an official BiT .npz checkpoint or one written by bit.save_npz.')
    raise CheckpointError('\n'.join(lines))
  params = _unflatten(
    (path, jnp.asarray(np.asarray(weights[k], np.float32).reshape(_flax_shape(path, weights[k].shape))))
    for k, (path, _) in expected.items()
  )
  return depth, width, classes, params


def _flax_shape(path, official_shape):
  return tuple(official_shape[2:]) if tuple(path) == ('head', 'kernel') else tuple(official_shape)


def params_to_npz(params: Params) -> dict[str, np.ndarray]:
  """Flax params (or {'params': params}) -> official-layout float32 arrays: the exact inverse of npz_to_params."""
  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  out, bad = {}, []
  for path, leaf in _flatten(params):
    try:
      key = official_key(path)
    except BitError:
      bad.append('/'.join(path))
      continue
    arr = np.asarray(jax.device_get(leaf), dtype=np.float32)
    out[key] = arr.reshape(_official_shape(path, arr.shape))
  if bad:
    raise BitError(
      f'These params have no official BiT checkpoint name: {", ".join(bad)}. Is this a '
      'bit ResNetV2 param tree?'
    )
  return out


def save_npz(params: Params, path: PathLike) -> pathlib.Path:
  """Writes params in the official .npz layout, atomically (temp file, then rename); returns the path."""
  return files.save_npz(pathlib.Path(path).expanduser(), **params_to_npz(params))


# --- the public loader ------------------------------------------------------------------------------------


def _resolve(name_or_path):
  """('registry', cfg) | ('file', path) | ('arch', name); BitError for an unknown name."""
  if isinstance(name_or_path, os.PathLike):
    return 'file', pathlib.Path(name_or_path)
  if not isinstance(name_or_path, str):
    raise BitError(
      f'name_or_path= must be a registry name, an .npz path or an architecture, got {arguments.describe(name_or_path)}.'
    )
  s = name_or_path.strip()
  try:
    return 'registry', get_pretrained_cfg(s)
  except BitError:
    pass
  if s.lower().endswith('.npz') or '/' in s or os.sep in s:
    return 'file', pathlib.Path(s)
  try:
    models.parse_architecture(s)
    return 'arch', s
  except BitError:
    pass
  if pathlib.Path(s).expanduser().is_file():
    return 'file', pathlib.Path(s)
  raise _unknown(s)


def _fetch(cfg: PretrainedCfg) -> pathlib.Path:
  return download(cfg.url, cache_path(cfg.url), sha256=cfg.sha256, size=cfg.size)


def load(
  name_or_path: PathLike,
  num_classes: int | None = None,
  *,
  keep_head: bool = False,
  dtype: DType = jnp.float32,
  seed: int = 0,
) -> tuple[models.ResNetV2, dict[str, Any]]:
  """Returns (model, params) for a registry name, a local official-layout .npz, or a bare architecture.

  - A registry name (see `list_models()`) is downloaded once into the cache (`$BIT_CACHE`).
  - A local .npz file: its architecture is read from its keys.
  - An architecture such as 'R50x1': random init (the from-scratch baseline); `num_classes` is required.
  The head is new and zero-initialized with `num_classes` outputs, unless `keep_head=True`, which keeps the
  checkpoint's own head (`num_classes` must then be None or equal to it). `dtype` is the compute dtype;
  params are float32. `seed` drives the random init of a scratch model.

  A model that keeps its head knows the image size it was trained at (`model.input_size`, which
  `bit.evaluate` and `bit.predict` use when given no size): the registry's resolution, or the `crop` of the
  run's config.json beside a local .npz (a bit-train workdir). A new head is a new task: `input_size` None.
  """
  kind, what = _resolve(name_or_path)
  if num_classes is not None:
    try:  # numpy integers (e.g. a label count from a dataset) are fine; 10.0 or '10' is a mistake
      num_classes = operator.index(num_classes)
    except TypeError:
      raise BitError(f'num_classes must be an integer, got {num_classes!r}.') from None
  if kind == 'arch':
    if keep_head:
      raise BitError(
        f'{what!r} is an architecture, not a checkpoint: it has no head to keep. Pass '
        'num_classes instead of keep_head=True.'
      )
    if num_classes is None:
      raise BitError(f'load({what!r}) builds a randomly initialized model: pass num_classes.')
    model = models.create_model(what, num_classes, dtype)
    return model, models.init_params(model, seed=seed)

  if kind == 'registry':
    path = _fetch(what)
    try:
      weights = load_npz(path)
    except CheckpointError as e:
      raise CheckpointError(
        f'{e} (the cached copy of {what.name}; delete {path} and it is downloaded again)'
      ) from e
    depth, width, classes, params = npz_to_params(weights, source=str(path))
    arch = models.architecture_name(depth, width)
    if (arch, classes) != (what.architecture, what.num_classes):
      raise CheckpointError(
        f'{path} holds {arch} with {classes} classes, but {what.name} is {what.architecture} with '
        f'{what.num_classes}: the cached file is not the right one; delete it and it is downloaded again.'
      )
    size = what.resolution
  else:
    path = what
    depth, width, classes, params = npz_to_params(load_npz(path), source=str(path))
    arch = models.architecture_name(depth, width)
    size = _run_crop(path)
  return _finish(arch, classes, params, num_classes, keep_head, dtype, name_or_path, size)


def _run_crop(npz: pathlib.Path) -> int | None:
  """The `crop` of the bit-train run whose model.npz this is (its config.json beside it), if there is one."""
  import json

  config = pathlib.Path(npz).expanduser().parent / layout.CONFIG_FILE
  try:
    crop = json.loads(config.read_text()).get('crop')
  except (OSError, ValueError, AttributeError):
    return None  # not a workdir (or not one of ours): the size is simply unknown
  return crop if isinstance(crop, int) and crop >= models.MIN_IMAGE_SIZE else None


def _finish(arch, classes, params, num_classes, keep_head, dtype, source, size=None):
  if keep_head:
    if num_classes is not None and num_classes != classes:
      raise BitError(
        f'keep_head=True keeps the {classes}-class head of {source}, but num_classes='
        f'{num_classes}: drop num_classes, or drop keep_head for a new head.'
      )
    return models.create_model(arch, classes, dtype, input_size=size), params
  if num_classes is None:
    raise BitError(
      f'load({str(source)!r}): pass num_classes for a new (zero-initialized) head, or '
      f"keep_head=True to keep the checkpoint's {classes}-class head."
    )
  return models.create_model(arch, num_classes, dtype), _zero_head(params, num_classes)


@overload
def reset_head(
  model: models.ResNetV2, params: Params, num_classes: int
) -> tuple[models.ResNetV2, dict[str, Any]]: ...
@overload
@deprecated(
  'bit.reset_head(params, num_classes): use model, params = bit.reset_head(model, params, num_classes)'
)
def reset_head(model: Params, params: int) -> dict[str, Any]: ...
def reset_head(
  model: models.ResNetV2 | Params, params: Params | int, num_classes: int | None = None
) -> tuple[models.ResNetV2, dict[str, Any]] | dict[str, Any]:
  """A new zero-initialized head of `num_classes` outputs, in memory, as `bit.load` gives for fine-tuning.

    model, params = bit.reset_head(model, params, num_classes)

  Returns `model.clone(num_classes=num_classes, input_size=None)` (a new head is a new task: the size it
  trained at no longer applies, as with `bit.load(name, num_classes=n)`) and the params with a zero head;
  `params` itself is not changed (the backbone arrays are shared, not copied). The old form
  `reset_head(params, num_classes)`, which returns the params only, still works, with a DeprecationWarning.
  """
  if not isinstance(model, models.ResNetV2) and num_classes is None:  # the old form (params, num_classes)
    warnings.warn(
      'bit.reset_head(params, num_classes) is deprecated: use model, params = bit.reset_head(model, params, '
      'num_classes), which gives the model its new head too.',
      DeprecationWarning,
      stacklevel=2,
    )
    return _zero_head(model, params)
  model = arguments.check_model(model, 'bit.reset_head')
  new = _zero_head(params, num_classes)
  return model.clone(num_classes=new['head']['bias'].shape[0], input_size=None), new


def _zero_head(params, num_classes) -> dict[str, Any]:
  try:
    num_classes = operator.index(num_classes)
  except TypeError:
    raise BitError(f'num_classes must be an integer, got {num_classes!r}.') from None
  if num_classes < 1:
    raise BitError(f'num_classes must be a positive integer, got {num_classes}.')
  if isinstance(params, Mapping) and set(params) == {'params'}:
    params = params['params']
  head = params.get('head') if isinstance(params, Mapping) else None
  if not isinstance(head, Mapping) or getattr(head.get('kernel'), 'ndim', None) != 2:
    raise BitError(
      f'params= must be the param tree of a bit model (a dict with a head/kernel), got {arguments.describe(params)}.'
    )
  features = head['kernel'].shape[0]
  out = dict(params)
  out['head'] = {
    'kernel': jnp.zeros((features, num_classes), jnp.float32),
    'bias': jnp.zeros((num_classes,), jnp.float32),
  }
  return out


def label_names(name_or_path: PathLike) -> list[str] | None:
  """Class names for a registry checkpoint with a labels file (downloaded and cached), else None.

  For a local .npz file, the names come from a `labels.txt` next to it (as a training workdir writes them),
  one per line; None if there is none.
  """
  kind, what = _resolve(name_or_path)
  if kind == 'arch':
    return None
  if kind == 'file':
    labels = pathlib.Path(what).expanduser().parent / layout.LABELS_FILE
    return _read_labels(labels, None) if labels.is_file() else None
  if what.labels_url is None:
    return None
  path = download(what.labels_url, cache_path(what.labels_url), progress=False)
  return _read_labels(path, what.num_classes)


def _read_labels(path: pathlib.Path, expected: int | None) -> list[str]:
  try:
    names = path.read_text(encoding='utf-8').splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise BitError(f'Cannot read the class names in {path}: {e}.') from e
  while names and not names[-1].strip():
    names.pop()
  names = [n.strip() for n in names]
  if expected is not None and len(names) != expected:
    raise DownloadError(
      f'{path} has {len(names)} class names, expected {expected}: delete it and it is downloaded again.'
    )
  return names
