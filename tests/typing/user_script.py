# pyright: strict
"""A user's script written from the README's library section, type-checked (never run) by tests/test_typing.py:
pyright in strict mode sees a type for everything it uses of bit's public API."""

from typing import Any

import numpy as np
from PIL import Image

import bit
from bit.types import EvalResult, Params, TrainResult


def fine_tune_head(
  model: bit.ResNetV2, params: Params, num_classes: int
) -> tuple[bit.ResNetV2, dict[str, Any]]:
  return bit.reset_head(model, params, num_classes)


def main() -> None:
  print(bit.list_models('BiT-M-*'))
  model, params = bit.load('BiT-M-R50x1', num_classes=10)
  model, params = bit.load('runs/demo/finetune/10shot-seed0/model.npz', keep_head=True)
  size: int | None = model.input_size
  probs = bit.predict(model, params, 'photos/')  # (N, C)
  print(probs.shape, probs.dtype, size)
  probs, idx = bit.predict(model, params, ['cat.jpg', Image.open('dog.png')], top=3)
  names = bit.label_names('runs/demo/finetune/10shot-seed0/model.npz') or []
  print([names[int(i)] for i in idx[:, 0]], probs[:, 0].max())
  x = bit.preprocess('cat.jpg', model.input_size)
  print(x.shape, np.asarray(x).mean())
  for row in bit.predict_files(model, params, ['cat.jpg'], names, top=2):
    print(row['path'])
  model, params = fine_tune_head(model, params, 5)
  result: EvalResult = bit.evaluate(model, params, 'cifar10', split='test', crop=128, batch_size=64)
  print(
    result['top1'], result['mean_per_class_accuracy'], result['confusion'].shape, result['class_names'][0]
  )
  out = bit.export(model, params, 'onnx', 'exports/x', size=224, input='uint8', labels=names, overwrite=True)
  print(out.name)
  bit.ops.set_fast_ops('off')
  with bit.ops.fast_ops('on'):
    pass
  config = bit.config.get_config('BiT-M-R50x1')
  metrics: TrainResult = bit.train_and_evaluate(
    {'model': 'BiT-M-R50x1', 'dataset': 'cifar10'}, 'runs/cifar10'
  )
  print(metrics['top1'], metrics['step'], metrics.get('best_step'), config)
  print(bit.hyperrule.train_resolution((32, 32)), bit.cache_dir())
  try:
    bit.load('nope')
  except bit.CheckpointError as e:
    print(e)
  except bit.BitError as e:
    print(e)


if __name__ == '__main__':
  main()
