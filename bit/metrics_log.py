"""Where a run's numbers go: `WORKDIR/metrics.jsonl` (one JSON object per line) and TensorBoard events.

metrics.jsonl is only ever appended to: a resumed run adds a `{"step": S, "resumed_from_step": S}` line and
continues, so a step that was logged before an interruption and redone after it appears twice; readers keep
the last line for each (step, kind). Every line has `step`; train lines have `loss`, `lr`, `images_per_sec`;
eval lines have `top1`, `top5`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

from bit.errors import NonFiniteLossError
from bit.layout import METRICS_FILE


def _jsonable(value):
  if hasattr(value, 'item'):  # numpy / jax scalars
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Infinity; keep the line valid for strict readers
  return value


class MetricsWriter:
  """Appends metric lines to metrics.jsonl and TensorBoard; a no-op on processes other than the first."""

  def __init__(
    self, workdir: str | os.PathLike[str], *, enabled: bool = True, tensorboard: bool = True
  ) -> None:
    self.enabled = enabled
    self.path: pathlib.Path = pathlib.Path(workdir) / METRICS_FILE
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir))

  def write(self, step: int, metrics: dict[str, Any], *, prefix: str = '') -> None:
    """One line `{"step": step, **metrics}`; numeric values also go to TensorBoard as `prefix/name`."""
    if not self.enabled:
      return
    line = {'step': int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
    # One write call per line, flushed, so a killed run leaves whole lines behind.
    with open(self.path, 'a') as f:
      f.write(json.dumps(line) + '\n')
      f.flush()
    if self._tb is not None:
      for k, v in line.items():
        if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f'{prefix}/{k}' if prefix else k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """All lines of WORKDIR/metrics.jsonl, in order (a line cut short by a kill is skipped)."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = []
  for raw in path.read_text().splitlines():
    try:
      lines.append(json.loads(raw))
    except json.JSONDecodeError:
      continue
  return lines


class TrainLog:
  """Train metrics between two writes: the device metrics of the steps since, fetched together on `flush`.

  Fetching every step would stall the devices; `flush` fetches, stops on a non-finite loss and writes one
  train line (mean loss, last lr and gradient norm, images per second since the last line).
  """

  def __init__(
    self,
    writer: MetricsWriter,
    bar: Any,
    dp: Any,
    *,
    batch_size: int,
    start: int,
    checkpoint_dir: str | os.PathLike[str],
  ) -> None:
    self.writer, self.bar, self.dp = writer, bar, dp
    self.batch_size, self.checkpoint_dir = batch_size, checkpoint_dir
    self.pending = []  # (step, device metrics)
    self.last_loss = None
    self.tick, self.tick_step = time.perf_counter(), start

  def add(self, step: int, metrics: Any) -> None:
    self.pending.append((step, metrics))

  def pause_clock(self) -> None:
    """Evaluation and checkpoint time are not training throughput."""
    self.tick = time.perf_counter()

  def flush(self, step: int, last_good: int | None) -> float | None:
    """Returns the mean loss of the pending steps (or the last one, if none are pending)."""
    if not self.pending:
      return self.last_loss
    import jax
    import numpy as np

    fetched = [(s, jax.device_get(self.dp.unreplicate(m))) for s, m in self.pending]
    self.pending = []
    for s, m in fetched:
      if not (math.isfinite(float(m['loss'])) and math.isfinite(float(m['grad_norm']))):
        where = (
          f'step {last_good} in {self.checkpoint_dir} (rerunning the same command resumes from it)'
          if last_good
          else 'none: no checkpoint was saved yet'
        )
        raise NonFiniteLossError(
          f'The training loss became {float(m["loss"])} (gradient norm {float(m["grad_norm"])}) at step {s}; '
          f'the last good checkpoint is {where}. Lower config.base_lr= or set config.dtype=float32.'
        )
    now = time.perf_counter()
    loss = float(np.mean([float(m['loss']) for _, m in fetched]))
    ips = (step - self.tick_step) * self.batch_size / max(now - self.tick, 1e-9)
    self.tick, self.tick_step = now, step
    line = {
      'loss': loss,
      'lr': float(fetched[-1][1]['lr']),
      'grad_norm': float(fetched[-1][1]['grad_norm']),
      'images_per_sec': ips,
    }
    self.writer.write(step, line, prefix='train')
    self.bar.set_postfix(loss=f'{loss:.4f}', lr=f'{line["lr"]:.2e}', img_s=f'{ips:.1f}', refresh=False)
    self.last_loss = loss
    return loss
