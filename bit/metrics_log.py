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
from typing import Any

METRICS_FILE = 'metrics.jsonl'


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
