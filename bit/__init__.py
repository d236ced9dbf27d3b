"""bit: Big Transfer (BiT) ResNets in JAX/Flax.

The public API, re-exported lazily so `import bit` stays fast and does not pull in TensorFlow or JAX. Importing
bit changes nothing global (environment, XLA flags, malloc, jax.config, warning filters); `bit.configure_cpu()`
applies the CPU runtime settings the command-line tools use (see bit/runtime.py):

  model, params = bit.load('BiT-M-R50x1', num_classes=10)
  logits = model.apply({'params': params}, images)     # NHWC float32 in [-1, 1]
  probs = bit.predict(model, params, 'photos/')        # files, folders, PIL images or arrays
"""

import importlib
import typing

__version__ = '0.1.0'

# name -> module that defines it. The modules behind bit.evaluate and bit.predict are named
# evaluation.py and prediction.py so that importing them does not shadow the functions.
_EXPORTS = {
  # model
  'ResNetV2': 'bit.models',
  'create_model': 'bit.models',
  'init_params': 'bit.models',
  'ARCHITECTURES': 'bit.models',
  'parse_architecture': 'bit.models',
  # checkpoints
  'load': 'bit.checkpoints',
  'reset_head': 'bit.checkpoints',
  'save_npz': 'bit.checkpoints',
  'list_models': 'bit.checkpoints',
  'download': 'bit.checkpoints',
  'load_npz': 'bit.checkpoints',
  'label_names': 'bit.checkpoints',
  'cache_dir': 'bit.checkpoints',
  'REGISTRY': 'bit.checkpoints',
  # recipe
  'hyperrule': 'bit',
  # training and the workflow
  'train_and_evaluate': 'bit.train',
  'evaluate': 'bit.evaluation',
  'predict': 'bit.prediction',
  'predict_files': 'bit.prediction',
  'preprocess': 'bit.prediction',
  'export': 'bit.export',
  # the CPU runtime settings of the tools, on request
  'configure_cpu': 'bit.runtime',
  # errors
  'BitError': 'bit.errors',
  'CheckpointError': 'bit.errors',
  'DownloadError': 'bit.errors',
  'DataError': 'bit.errors',
  'ConfigError': 'bit.errors',
}

__all__ = sorted(_EXPORTS)

# The library's modules, as attributes after a bare `import bit` (PEP 562: each is imported on first use, so
# `import bit` still loads neither JAX nor TensorFlow), e.g. `bit.ops.set_fast_ops('off')`. `dir(bit)` lists
# them beside the API; `bit.export` and `bit.hyperrule` are in the API already (`bit.export` is the function).
_SUBMODULES = (
  'checkpoints',
  'config',
  'data',
  'data_sources',
  'distill',
  'errors',
  'evaluation',
  'freeze',
  'images',
  'models',
  'ops',
  'parallel',
  'plots',
  'prediction',
  'probe',
  'runtime',
  'train',
  'types',
  'workdir',
)

# Real signatures for mypy/pyright; at run time the names load lazily (no TensorFlow at `import bit`).
if typing.TYPE_CHECKING:
  # The submodules (`as` re-exports them to type checkers).
  from bit import checkpoints as checkpoints
  from bit import config as config
  from bit import data as data
  from bit import data_sources as data_sources
  from bit import distill as distill
  from bit import errors as errors
  from bit import evaluation as evaluation
  from bit import freeze as freeze
  from bit import hyperrule  # noqa: F401
  from bit import images as images
  from bit import models as models
  from bit import ops as ops
  from bit import parallel as parallel
  from bit import plots as plots
  from bit import prediction as prediction
  from bit import probe as probe
  from bit import runtime as runtime
  from bit import train as train
  from bit import types as types
  from bit import workdir as workdir
  from bit.checkpoints import (  # noqa: F401
    REGISTRY,
    cache_dir,
    download,
    label_names,
    list_models,
    load,
    load_npz,
    reset_head,
    save_npz,
  )
  from bit.errors import BitError, CheckpointError, ConfigError, DataError, DownloadError  # noqa: F401
  from bit.evaluation import evaluate  # noqa: F401
  from bit.export import export  # noqa: F401
  from bit.models import ARCHITECTURES, ResNetV2, create_model, init_params, parse_architecture  # noqa: F401
  from bit.prediction import predict, predict_files, preprocess  # noqa: F401
  from bit.runtime import configure_cpu  # noqa: F401
  from bit.train import train_and_evaluate  # noqa: F401


# Hidden from type checkers: a module-level __getattr__ would make every misspelt `bit.name` type as Any.
if not typing.TYPE_CHECKING:

  def __getattr__(name: str) -> typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
      if name in _SUBMODULES:  # importing binds it as an attribute of the package
        return importlib.import_module(f'bit.{name}')
      raise AttributeError(f"module 'bit' has no attribute {name!r}")
    if module == 'bit':  # a submodule exported under its own name
      value = importlib.import_module(f'bit.{name}')
    else:
      value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
  # The public API and the library's modules, not the modules used to set it up (importlib, typing).
  return sorted([*__all__, *_SUBMODULES, '__version__'])
