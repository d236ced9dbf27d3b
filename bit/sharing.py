"""Sharing a model the way PyTorch users take models: `bit-export --format timm` (`export_timm`: a workdir or a
model name -> timm's hub layout, model.safetensors + config.json) and `bit.push_to_hub` (the same plus a model
card, uploaded through huggingface_hub). Reading from the hub is `bit.hub`, which `bit.checkpoints` uses; this
module sits above both.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from bit import files, models
from bit.errors import BitError
from bit.hub import (
  CARD,
  CONFIG,
  WEIGHTS,
  architecture_from_config,
  write_timm,
)
from bit.types import Params, PathLike


def export_timm(
  output: PathLike,
  *,
  workdir: PathLike | None = None,
  model: PathLike | None = None,
  num_classes: int | None = None,
  keep_head: bool = False,
  size: int | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """`bit-export --format timm`: a bit-train workdir (or a model name, as `bit.load`) -> timm's hub layout in
  `output` (model.safetensors, config.json with the run's crop as input_size and its class names)."""
  import shutil
  import tempfile

  from bit.exporter import check_size, load_source

  output = pathlib.Path(output).expanduser()
  if output.exists():
    if not overwrite:
      raise BitError(f'{output} exists: give another output=, or overwrite=True to replace that export.')
    if not (output / CONFIG).is_file() or not (output / WEIGHTS).is_file():
      raise BitError(
        f'{output} exists and is not a timm export (no {CONFIG} and {WEIGHTS} in it): overwrite=True replaces '
        'only a previous export; give another output=.'
      )
  net, params, names, default_size, _ = load_source(
    workdir=workdir, model=model, num_classes=num_classes, keep_head=keep_head
  )
  size = check_size(size or default_size)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=output.parent, prefix=f'.{output.name}.', suffix='.tmp'))
  try:
    write_timm(params, tmp, input_size=size, label_names=names)
    files.replace_dir(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  del net
  return output


def model_card(
  config: Mapping[str, Any], evals: Mapping[str, Mapping[str, Any]], *, repo_id: str, arch: str, size: int
) -> str:
  """README.md for the hub: what the model is, the recipe (the run's config.json) and its eval results."""
  recipe_keys = (
    'model', 'dataset', 'train_split', 'test_split', 'batch_size', 'base_lr', 'schedule', 'mixup_alpha',
    'resize', 'crop', 'transfer', 'dtype', 'seed',
  )  # fmt: skip
  recipe = {k: config[k] for k in recipe_keys if k in config}
  lines = [
    '---',
    'library_name: timm',
    'license: apache-2.0',
    'tags: [image-classification, timm, bit, jax]',
    '---',
    f'# {repo_id}',
    '',
    f'BiT {arch} fine-tuned with [bit](https://github.com/google-research/big_transfer)-style JAX code '
    f"(BiT-HyperRule), exported in timm's format. Images: {size}x{size} RGB, scaled to [-1, 1] "
    '(mean = std = 0.5).',
    '',
    '```python',
    'import timm',
    f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
    '# or, in JAX: model, params = bit.load(' + repr(f'hf-hub:{repo_id}') + ', keep_head=True)',
    '```',
    '',
    '## Recipe',
    '',
    '| key | value |',
    '| --- | --- |',
    *(f'| {k} | `{json.dumps(v)}` |' for k, v in recipe.items()),
    '',
    '## Evaluation',
    '',
  ]
  if evals:
    lines += ['| split | top-1 | top-5 | examples |', '| --- | --- | --- | --- |']
    for split, r in sorted(evals.items()):
      top1, top5 = r.get('top1'), r.get('top5')
      fmt = lambda v: f'{100 * v:.2f}%' if isinstance(v, int | float) else '-'  # noqa: E731
      lines.append(f'| {split} | {fmt(top1)} | {fmt(top5)} | {r.get("count", r.get("examples", "-"))} |')
  else:
    lines.append('No evaluation was recorded in the run (no eval_<split>.json in its workdir).')
  return '\n'.join(lines) + '\n'


def _read_evals(workdir: pathlib.Path) -> dict[str, Any]:
  evals = {}
  for path in sorted(workdir.glob('eval_*.json')):
    try:
      evals[path.stem[len('eval_') :]] = json.loads(path.read_text())
    except (OSError, ValueError):
      continue  # an unreadable eval file is left out of the card, not fatal
  return evals


def hub_folder(
  workdir_or_params: PathLike | Params,
  folder: PathLike,
  *,
  repo_id: str,
  model: models.ResNetV2 | None = None,
  input_size: int | None = None,
  label_names: Sequence[str] | None = None,
) -> pathlib.Path:
  """Writes what `push_to_hub` uploads into `folder`: model.safetensors, config.json and README.md."""
  folder = pathlib.Path(folder)
  if isinstance(workdir_or_params, str | os.PathLike):
    from bit import workdir as workdir_lib

    workdir = pathlib.Path(workdir_or_params).expanduser()
    run = workdir_lib.load(workdir)
    config, params, names = run.config, run.params, run.class_names
    size = int(input_size or config.get('crop') or 224)
    evals = _read_evals(workdir)
    label_names = label_names if label_names is not None else names
  else:
    params, config, evals = workdir_or_params, {}, {}
    size = int(input_size or getattr(model, 'input_size', None) or 224)
  write_timm(params, folder, input_size=size, label_names=label_names)
  arch = architecture_from_config(json.loads((folder / CONFIG).read_text()))
  files.write_text(folder / CARD, model_card(config, evals, repo_id=repo_id, arch=arch, size=size))
  return folder


def push_to_hub(
  workdir_or_params: PathLike | Params,
  repo_id: str,
  *,
  model: models.ResNetV2 | None = None,
  input_size: int | None = None,
  label_names: Sequence[str] | None = None,
  private: bool | None = None,
  token: str | None = None,
  commit_message: str = 'Upload BiT model (bit)',
) -> Any:
  """Uploads a fine-tuned model to the hub repo `repo_id` (created if needed) in timm's format, with a model
  card stating the recipe and the eval results; returns huggingface_hub's CommitInfo.

  `workdir_or_params`: a finished bit-train workdir (its model.npz, labels.txt, config.json recipe and
  eval_<split>.json results), or a param tree (then `model`/`input_size`/`label_names` describe it). Anyone can
  then `timm.create_model('hf-hub:REPO', pretrained=True)` or `bit.load('hf-hub:REPO', keep_head=True)`.
  Token: `token`, else HF_TOKEN / `hf auth login`.
  """
  import tempfile

  try:
    from huggingface_hub import HfApi
  except ImportError as e:
    raise BitError('push_to_hub needs huggingface_hub: pip install huggingface_hub safetensors.') from e
  rid = repo_id.strip()
  if not re.fullmatch(r'[\w.\-]+/[\w.\-]+', rid):
    raise BitError(f'repo_id={repo_id!r} is not OWNER/NAME, e.g. my-user/bit-r50x1-flowers.')
  with tempfile.TemporaryDirectory(prefix='bit-hub-') as tmp:
    folder = hub_folder(
      workdir_or_params, tmp, repo_id=rid, model=model, input_size=input_size, label_names=label_names
    )
    api = HfApi(token=token)
    api.create_repo(rid, private=private, exist_ok=True)
    return api.upload_folder(repo_id=rid, folder_path=str(folder), commit_message=commit_message)
