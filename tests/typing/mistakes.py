"""Four deliberate mistakes a user makes with bit's API; tests/test_typing.py expects exactly one error on each
line marked `# error`, and no other."""

import bit


def main() -> None:
  model, params = bit.load('BiT-M-R50x1', num_classes='10')  # error: num_classes is an int
  probs = bit.predict(model, params, 'photos/', top=3)
  print(probs.shape)  # error: with top=k, predict gives (probabilities, indices)
  bit.export(model, params, 'tflite', 'exports/x')  # error: not an export format
  print(bit.evaluate(model, params, 'cifar10')['top_1'])  # error: the key is 'top1'
