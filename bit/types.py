"""The types of bit's public API, for annotations in user code (`from bit.types import Params`).

Nothing here runs at import beyond defining names: no JAX, no TensorFlow.

  Params        the 'params' collection of a model: a nested mapping of arrays (what `bit.load` returns)
  PathLike      a file or folder path: `str` or any `os.PathLike[str]` (pathlib.Path)
  Images        what `bit.predict` and `bit.preprocess` take: image files, folders, PIL images, arrays
  Format        an export format: 'savedmodel', 'onnx', 'stablehlo', 'timm'
  Input         what an export takes: 'float32' ([-1, 1] at the model's size), 'uint8' (0..255 at the model's
                size), 'raw' (uint8 at any size, resized inside)
  Mode          a transfer mode: 'full', 'head', 'partial'
  DType         a compute dtype: 'float32', 'bfloat16' or a JAX/NumPy dtype
  EvalResult, TrainResult, ExportManifest: the dicts that `bit.evaluate`, `bit.train_and_evaluate` and
                export.json hold (TypedDicts: plain dicts at run time)
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict, Union

import numpy as np
import numpy.typing as npt

if typing.TYPE_CHECKING:
  import PIL.Image

# 'PIL.Image.Image' is a string: PIL is imported for type checkers only.
Params = Mapping[str, Any]
PathLike = Union[str, os.PathLike[str]]
ImageLike = Union[
  str, os.PathLike[str], 'PIL.Image.Image', npt.ArrayLike
]  # one image (or an NHWC batch, or a folder)
Images = Union[ImageLike, Sequence[ImageLike]]
Format = Literal['savedmodel', 'onnx', 'stablehlo', 'timm']
Input = Literal['float32', 'uint8', 'raw']
Mode = Literal['full', 'head', 'partial']
DType = Union[Literal['float32', 'bfloat16'], npt.DTypeLike]
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

__all__ = [
  'DType',
  'EvalResult',
  'ExportManifest',
  'FloatArray',
  'Format',
  'ImageLike',
  'Images',
  'Input',
  'IntArray',
  'Mode',
  'Params',
  'PathLike',
  'TrainResult',
]


class EvalResult(TypedDict):
  """What `bit.evaluate` returns (a plain dict)."""

  top1: float
  top5: float
  loss: float  # mean cross-entropy
  count: int  # the examples evaluated
  skipped: int  # files that did not decode (logged by path, left out)
  mean_per_class_accuracy: float
  per_class_accuracy: npt.NDArray[np.floating[Any]]  # NaN for a class with no examples
  class_counts: npt.NDArray[np.integer[Any]]
  confusion: npt.NDArray[np.integer[Any]]  # [true, predicted]
  class_names: list[str]
  split: str
  crop: int


class _TrainResultRequired(TypedDict):
  step: int
  top1: float
  top5: float
  eval_loss: float
  mean_per_class_accuracy: float
  num_examples: int


class TrainResult(_TrainResultRequired, total=False):
  """What `bit.train_and_evaluate` returns (a plain dict): the final (or best) evaluation and the step."""

  loss: float  # the last training loss, when a step ran
  best_step: int  # with early stopping / keep-best
  stopped_early: bool


class ExportManifest(TypedDict, total=False):
  """export.json of a `bit.export` directory (a plain dict; `bit.export.read_manifest(path)` reads it)."""

  format: str
  file: str
  architecture: str
  num_classes: int
  size: int
  input: dict[str, Any]
  outputs: dict[str, Any]
  labels: str | None
  source: str | None
  source_sha256: str | None
  how_to_call: str
