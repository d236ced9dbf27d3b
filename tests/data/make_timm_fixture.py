"""Writes tests/data/timm_bit/<case>/: timm's own logits for random BiT weights in timm's format.

Run in a separate venv with torch and timm (never bit's; see tests/data/README.md):

  python3 -m venv /work/venvs/timm && /work/venvs/timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
  /work/venvs/timm/bin/python tests/data/make_timm_fixture.py

Per case (a name, timm's ResNetV2 at BiT's settings, a seed):
- keys.json: timm's state_dict names and shapes, in order (the weights are not stored: `timm_weights` draws
  them from the seed with numpy, in this order, here and in tests/test_hub.py alike);
- config.json: what timm's `save_for_hf` writes beside model.safetensors for that model (a hub repo's file);
- images.npy: 2 NHWC float32 images in [-1, 1] at 64 px; logits.npy: timm's float32 logits for them.
"""

import json
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent / 'timm_bit'
# (case, timm architecture name for config.json, layers, width, classes, seed, label names?)
CASES = [
  ('r50x1_s64', 'resnetv2_50x1_bit', (3, 4, 6, 3), 1, 7, 0, True),
  ('r26x3_s64', 'resnetv2_26x3_bit', (2, 2, 2, 2), 3, 5, 1, False),
  # transformers' BitForImageClassification at BitConfig's defaults (google/bit-50's), 2 units per stage
  ('hf_r26x1_s64', 'transformers', (2, 2, 2, 2), 1, 5, 2, True),
]


def timm_weights(keys: dict, seed: int) -> dict:
  """Random timm-format weights (name -> float32 array) for the names and shapes of `keys`, from `seed`."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in keys.items():
    if name.startswith(('head.', 'classifier.')):
      std, mean = (0.05, 0.0) if name.endswith('weight') else (0.1, 0.0)
    elif len(shape) == 4:  # a standardized conv: any scale works
      std, mean = 1.0, 0.0
    else:  # GroupNorm weight / bias
      std, mean = (0.2, 1.0) if name.endswith('weight') else (0.1, 0.0)
    out[name] = (mean + std * rng.standard_normal(shape)).astype(np.float32)
  return out


def images(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)


def main() -> None:
  import functools
  import tempfile

  import timm
  import torch
  from timm.layers import StdConv2d
  from timm.models import resnetv2

  torch.manual_seed(0)
  for case, arch, layers, width, classes, seed, labels in CASES:
    out = HERE / case
    out.mkdir(parents=True, exist_ok=True)
    if arch == 'transformers':
      transformers_case(out, layers, classes, seed)
      continue
    if arch in timm.list_models():
      model = timm.create_model(arch, num_classes=classes)
    else:  # a small-depth, width-3 BiT that timm builds but does not register
      model = resnetv2.ResNetV2(
        layers=list(layers),
        width_factor=width,
        num_classes=classes,
        stem_type='fixed',
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
      )
      model.pretrained_cfg = {**timm.create_model('resnetv2_50x3_bit').pretrained_cfg, 'architecture': arch}
    model.eval()
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    weights = timm_weights(keys, seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    x = images(seed)
    with torch.no_grad():
      logits = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    model_config = {'label_names': [f'class {i}' for i in range(classes)]} if labels else None
    with tempfile.TemporaryDirectory() as tmp:
      try:
        timm.models.save_for_hf(model, tmp, model_config=model_config)
        config = json.loads((pathlib.Path(tmp) / 'config.json').read_text())
      except Exception as e:  # noqa: BLE001 - an unregistered model: write timm's layout by hand
        print(f'{case}: save_for_hf failed ({e}); writing the config by hand', file=sys.stderr)
        cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ('url', 'hf_hub_id', 'tag')}
        cfg.update(num_classes=classes, custom_load=False)
        config = {
          'architecture': arch,
          'num_classes': classes,
          'num_features': model.num_features,
          'global_pool': 'avg',
          'pretrained_cfg': cfg,
        }
    config['pretrained_cfg']['input_size'] = [3, 64, 64]
    (out / 'keys.json').write_text(json.dumps(keys) + '\n')
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    np.save(out / 'images.npy', x)
    np.save(out / 'logits.npy', logits.astype(np.float32))
    print(case, arch, logits.shape, float(np.abs(logits).max()), f'{torch.__version__=} {timm.__version__=}')


def transformers_case(out, layers, classes, seed) -> None:
  import torch
  import transformers

  config = transformers.BitConfig(
    depths=list(layers), num_labels=classes, id2label={i: f'class {i}' for i in range(classes)}
  )
  model = transformers.BitForImageClassification(config).eval()
  keys = {k: list(v.shape) for k, v in model.state_dict().items()}
  weights = timm_weights(keys, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  x = images(seed)
  with torch.no_grad():
    logits = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
  (out / 'keys.json').write_text(json.dumps(keys) + '\n')
  (out / 'config.json').write_text(config.to_json_string())
  np.save(out / 'images.npy', x)
  np.save(out / 'logits.npy', logits.astype(np.float32))
  print(out.name, 'transformers', logits.shape, float(np.abs(logits).max()), f'{transformers.__version__=}')


if __name__ == '__main__':
  main()
