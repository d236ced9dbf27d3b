"""Early stopping (`config.early_stopping_patience=N`): the best eval so far, its step, params and result.

The loop calls `BestEval.update` after each evaluation; once N evaluations in a row have not improved the
best top-1 it stops, and the run exports the best eval's params. The state is saved in every checkpoint
(`to_tree`/`from_tree`), so a resumed run stops where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from bit import evaluation


def _numbers(result) -> dict:
  """The `evaluation.RESULT_KEYS` of an eval result: arrays as numpy, scalars as Python numbers (for JSON)."""
  out = {}
  for k in evaluation.RESULT_KEYS:
    v = np.asarray(result[k])
    out[k] = v.item() if v.ndim == 0 else v.copy()
  return out


@dataclasses.dataclass
class BestEval:
  """The early-stopping state: the best eval top-1 so far, its step, params and result.

  `bad_evals` counts the evaluations since the best one; `stopped` is set once it reaches the patience.
  It is checkpointed with the train state, so a resumed run stops where an uninterrupted one would.
  """

  params: dict[str, Any]
  result: dict[str, Any]
  top1: float = -1.0
  step: int = -1
  bad_evals: int = 0
  stopped: bool = False

  @classmethod
  def initial(cls, params: Any, num_classes: int) -> BestEval:
    """Before any eval: placeholders of the right shapes (what a checkpoint is restored into)."""
    result = evaluation.empty_result(num_classes)
    return cls(params=jax.tree.map(np.array, params), result=result)

  def update(self, step: int, result: dict[str, Any], params_fn: Any, patience: int) -> bool:
    """Records an eval at `step`; returns True when training should stop. `params_fn()` gives host params."""
    if result['top1'] > self.top1:  # strictly better: a tie keeps the earlier (shorter-trained) model
      self.top1, self.step, self.bad_evals = float(result['top1']), int(step), 0
      self.params = jax.tree.map(np.array, params_fn())  # a copy: the device buffers are donated next step
      self.result = _numbers(result)
      return False
    self.bad_evals += 1
    self.stopped = self.bad_evals >= patience
    return self.stopped

  def to_tree(self) -> dict[str, Any]:
    return {
      'params': self.params,
      'result': {k: np.asarray(v) for k, v in self.result.items()},
      # 0-d arrays, not numpy scalars: orbax saves and restores arrays.
      'top1': np.asarray(self.top1, np.float64),
      'step': np.asarray(self.step, np.int64),
      'bad_evals': np.asarray(self.bad_evals, np.int64),
      'stopped': np.asarray(self.stopped, np.int64),
    }

  @classmethod
  def from_tree(cls, tree: Any) -> BestEval:
    return cls(
      params=jax.tree.map(np.asarray, tree['params']),
      result=_numbers(tree['result']),
      top1=float(tree['top1']),
      step=int(tree['step']),
      bad_evals=int(tree['bad_evals']),
      stopped=bool(int(tree['stopped'])),
    )
