"""The BiT-HyperRule: the fine-tuning recipe of Big Transfer as a handful of pure functions.

`resolution`, `mixup_alpha`, `schedule` and `learning_rate` follow the official `bit_hyperrule.py`
(google-research/big_transfer) exactly; the dataset size is the number of training examples actually used
(k x classes in few-shot runs). `lr_schedule` is the same learning rate as an in-graph optax schedule, for
the hyper-rule's boundaries or for explicit ones (`supports=`, what the training loop uses).

Two project additions, both explicit:
- `train_resolution` is the training default of this project: resize 512 / crop 224 for images of 96x96 and
  up (the paper's 480 costs about 4.6 times the compute per image), 160/128 for small images; pass
  `crop=480` for the paper's value. `resolution` itself stays the paper's rule.
- Batch-size scaling (lr x B/512, steps x 512/B, as the official colab suggests) is off unless a
  `batch_size` is passed.
"""

from __future__ import annotations

from typing import Any

from bit.errors import ConfigError

# The official recipe was tuned for this global batch size.
BASE_BATCH_SIZE = 512
# The project's default training crop for images of 96x96 and up (the paper uses 480).
DEFAULT_CROP = 224


def resolution(original_resolution: Any) -> tuple[int, int]:
  """Returns the paper's (resize, crop) for an image size (h, w): (160, 128) below 96x96 pixels, else (512, 480)."""
  h, w = original_resolution[:2]
  area = int(h) * int(w)
  return (160, 128) if area < 96 * 96 else (512, 480)


def train_resolution(original_resolution: Any, crop: int | None = None) -> tuple[int, int]:
  """Returns the project's training (resize, crop) for an image size (h, w).

  Small images (area below 96x96) keep the paper's 160/128 unless `crop` is given. Larger images are resized
  to 512 and randomly cropped to `crop` (default 224; 480 is the paper's value). The resize grows with the crop
  when a crop above 512 is asked for, keeping the paper's 512/480 margin.
  """
  resize, paper_crop = resolution(original_resolution)
  if crop is None:
    crop = paper_crop if resize == 160 else DEFAULT_CROP
  crop = int(crop)
  if crop <= 0:
    raise ConfigError(f'crop must be a positive number of pixels, got {crop}')
  if crop > resize:
    # Keep the official ratio of resize to crop (512/480) so the random crop still has room to move.
    resize = -(-crop * 512 // 480)
  return resize, crop


def mixup_alpha(dataset_size: int) -> float:
  """Returns the MixUp alpha: 0.0 for fewer than 20,000 training examples, else 0.1."""
  return 0.0 if dataset_size < 20_000 else 0.1


def schedule(dataset_size: int, *, batch_size: int | None = None) -> list[int]:
  """Returns the step boundaries [warmup, decay1, decay2, decay3, total] for a dataset size.

  [100, 200, 300, 400, 500] below 20k examples, [500, 3000, 6000, 9000, 10000] below 500k, else
  [500, 6000, 12000, 18000, 20000]. With `batch_size` given, each boundary is scaled by 512 / batch_size
  (rounded, at least one step apart) so the run sees the same number of examples; off by default.
  """
  if dataset_size < 20_000:
    supports = [100, 200, 300, 400, 500]
  elif dataset_size < 500_000:
    supports = [500, 3000, 6000, 9000, 10_000]
  else:
    supports = [500, 6000, 12_000, 18_000, 20_000]
  if batch_size is None:
    return supports
  batch_size = _check_batch_size(batch_size)
  scaled, last = [], 0
  for s in supports:
    # Strictly increasing: a boundary that collapsed onto the previous one would skip a whole phase.
    last = max(last + 1, round(s * BASE_BATCH_SIZE / batch_size))
    scaled.append(last)
  return scaled


def base_learning_rate(base_lr: float = 0.003, *, batch_size: int | None = None) -> float:
  """Returns the peak learning rate: `base_lr`, times batch_size / 512 when a batch size is given."""
  if batch_size is None:
    return base_lr
  return base_lr * _check_batch_size(batch_size) / BASE_BATCH_SIZE


def learning_rate(
  step: int, dataset_size: int, base_lr: float = 0.003, *, batch_size: int | None = None
) -> Any:
  """Returns the learning rate at `step`, or None once training is over (step >= total), as official `get_lr`.

  Linear warmup from 0 over the first boundary, then `base_lr` divided by 10 once for each decay boundary that
  is strictly below `step`.
  """
  supports = schedule(dataset_size, batch_size=batch_size)
  lr = base_learning_rate(base_lr, batch_size=batch_size)
  if step < supports[0]:
    return lr * step / supports[0]
  if step >= supports[-1]:
    return None
  for s in supports[1:]:
    if s < step:
      lr /= 10
  return lr


def lr_schedule(
  dataset_size: int | None = None,
  base_lr: float = 0.003,
  *,
  batch_size: int | None = None,
  supports: Any = None,
) -> Any:
  """Returns an optax-compatible schedule `step -> lr` (jnp, traceable under jit) equal to `learning_rate`.

  The boundaries come from `schedule(dataset_size, batch_size=...)`, or are given explicitly as
  `supports=[warmup, decay1, decay2, decay3, total]` in steps (a config's `schedule`; then `dataset_size` is
  not used and must be None). Linear warmup from 0 over `warmup` steps (none if it is 0), then `base_lr`
  divided by 10 for each decay boundary strictly below the step. At and after the total number of steps,
  where `learning_rate` returns None, the schedule keeps the last value (base_lr / 1000) instead of ending,
  because an in-graph schedule must return a number.
  """
  import jax.numpy as jnp

  if (supports is None) == (dataset_size is None):
    raise ConfigError(
      'lr_schedule needs exactly one of dataset_size (the hyper-rule picks the steps) and '
      f'supports=[warmup, decay1, decay2, decay3, total]; got dataset_size={dataset_size!r}, '
      f'supports={supports!r}.'
    )
  if supports is None:
    supports = schedule(dataset_size, batch_size=batch_size)
  else:
    supports = check_supports(supports)
  lr = base_learning_rate(base_lr, batch_size=batch_size)
  warmup, decays = supports[0], supports[1:-1]

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    # Count the decay boundaries strictly below the step, exactly as the official loop does.
    num_decays = sum((step > s).astype(jnp.float32) for s in decays)
    decayed = lr * jnp.power(jnp.float32(0.1), num_decays)
    if warmup == 0:
      return decayed
    return jnp.where(step < warmup, lr * step / warmup, decayed)

  return fn


def check_supports(supports: Any) -> list[int]:
  """Returns explicit step boundaries as ints; ConfigError unless warmup <= decay1 < decay2 < decay3 < total."""
  try:
    s = [int(x) for x in supports]
    ok = len(s) == 5 and s == [float(x) for x in supports] and 0 <= s[0] <= s[1] < s[2] < s[3] < s[4]
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(
      f'schedule {supports!r} is not [warmup, decay1, decay2, decay3, total] in steps with '
      'warmup <= decay1 < decay2 < decay3 < total, e.g. [100, 200, 300, 400, 500].'
    )
  return s


def _check_batch_size(batch_size) -> int:
  if int(batch_size) != batch_size or batch_size <= 0:
    raise ConfigError(f'batch_size must be a positive integer, got {batch_size!r}')
  return int(batch_size)
