"""Checks that `bit-export --format timm` output is read by timm itself and gives bit's logits.

Two steps, two venvs (torch never enters bit's):

  python benchmarks/timm_export_check.py write /tmp/timm_export [--arch R50x1 --size 128]   # bit's venv
  /work/venvs/timm/bin/python benchmarks/timm_export_check.py check /tmp/timm_export        # torch + timm

`write` saves a random BiT (a random head too) in timm's format with bit's own logits for 4 random images
(bit_logits.npy, images.npy); `check` builds it with timm.create_model('local-dir:DIR', pretrained=True) and
prints the largest absolute difference of timm's logits from bit's, as one JSON line.
"""

import json
import pathlib
import sys

import numpy as np


def write(out: pathlib.Path, arch: str, size: int) -> None:
  import jax

  from bit import hub, models

  model = models.create_model(arch, 10)
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return (1 + 0.2 * rng.standard_normal(s.shape)).astype(np.float32)
    if 'bias' in name:
      return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    return rng.normal(0, 0.05 if 'head' in name else 1.0, s.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, models.param_shapes(model))
  images = rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images))
  hub.write_timm(params, out, input_size=size, label_names=[f'c{i}' for i in range(10)])
  np.save(out / 'images.npy', images)
  np.save(out / 'bit_logits.npy', logits)


def check(out: pathlib.Path) -> None:
  import timm
  import torch

  model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
  images = torch.from_numpy(np.load(out / 'images.npy')).permute(0, 3, 1, 2)
  with torch.no_grad():
    logits = model(images).numpy()
  bit_logits = np.load(out / 'bit_logits.npy')
  print(
    json.dumps(
      {
        'architecture': model.pretrained_cfg.get('architecture'),
        'input_size': list(model.pretrained_cfg.get('input_size')),
        'label_names': (model.pretrained_cfg.get('label_names') or [None])[:2],
        'max_abs_diff': float(np.abs(logits - bit_logits).max()),
        'max_abs_logit': float(np.abs(bit_logits).max()),
        'timm': timm.__version__,
        'torch': torch.__version__,
      }
    )
  )


if __name__ == '__main__':
  cmd, out = sys.argv[1], pathlib.Path(sys.argv[2])
  if cmd == 'write':
    args = dict(zip(sys.argv[3::2], sys.argv[4::2], strict=True))
    write(out, args.get('--arch', 'R50x1'), int(args.get('--size', 128)))
  else:
    check(out)
