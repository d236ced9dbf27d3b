"""The command-line entry points; the only module that parses flags.

  bit-train --config configs/<dataset>.py --workdir DIR [--config.key=value ...]

Each `*_main` defines its own flags (so `--help` shows only those) and runs through `_run`, which turns
bad input (a `BitError`, a flag or config override that does not parse) into one line on stderr and a
non-zero exit code, without a traceback. To add a command: write `_define_<cmd>_flags()` and
`_<cmd>(argv)`, then `def <cmd>_main(): _run('bit-<cmd>', _define_<cmd>_flags, _<cmd>)`.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging

from bit.errors import BitError

FLAGS = flags.FLAGS
EXIT_BAD_INPUT = 2


def _fail(prog: str, message: str, code: int = EXIT_BAD_INPUT):
  # One line: the message, collapsed. Tools and people both read the first line of stderr.
  message = ' '.join(str(message).split())
  print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


# The library's errors name Python arguments (`dataset=`, `workdir=`) and config keys (`config.crop=`); each
# command shows them as its flags.
_CONFIG_ARGUMENTS = {
  'dataset': '--config.dataset',
  'data_dir': '--config.data_dir',
  'model': '--config.model',
}
_MULTI_PROCESS = {name: f'--{name}' for name in ('coordinator_address', 'num_processes', 'process_id')}
_FLAGS_OF_ARGUMENTS = {
  'bit-train': {
    **_CONFIG_ARGUMENTS,
    **_MULTI_PROCESS,
    'workdir': '--workdir',
    'num_classes': '--num_classes',
  },
  'bit-bench': {**_CONFIG_ARGUMENTS, **_MULTI_PROCESS, 'workdir': '--workdir'},
  'bit-distill': {**_CONFIG_ARGUMENTS, **_MULTI_PROCESS, 'workdir': '--workdir'},
  'bit-probe': {
    'dataset': '--dataset',
    'model': '--model',
    'data_dir': '--config.data_dir',
    'workdir': '--workdir',
  },
  'bit-eval': {'workdir': '--workdir'},
  'bit-predict': {'workdir': '--workdir', 'model': '--model', 'size': '--size', 'batch_size': '--batch_size'},
  'bit-export': {
    'workdir': '--workdir',
    'model': '--model',
    'num_classes': '--num_classes',
    'path': '--output',
    'output': '--output',
    'overwrite': '--overwrite',
    'size': '--size',
    'input': '--input',
  },
}


def as_flags(prog: str, message: str) -> str:
  """A library error message with its Python argument names (`dataset=`) written as `prog`'s flags."""
  names = _FLAGS_OF_ARGUMENTS.get(prog, {})
  # A message may start with the Python function it comes from (bit.predict_files: ...); the command is its own.
  message = re.sub(r'^bit\.\w+: ', '', message)
  if names:
    pattern = r'(?<![\w.-])(' + '|'.join(map(re.escape, names)) + r')='
    message = re.sub(pattern, lambda m: names[m.group(1)] + '=', message)
  if prog in ('bit-train', 'bit-bench', 'bit-probe', 'bit-distill'):
    message = re.sub(r'(?<![\w.-])config\.(\w+)=', r'--config.\1=', message)
  return message


def _describe_flag_error(e: BaseException) -> str:
  """A flag/config parsing exception -> what went wrong and what to do."""
  if isinstance(e, (AttributeError, KeyError)):
    # An override of a key the (locked) config does not have; ml_collections adds a "Did you mean".
    text = str(e)
    key = re.search(r"'([^'\\]+)", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (
      f'unknown config key {key.group(1) if key else text!r}'
      + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
      + '; bit/config.py lists every key.'
    )
  if isinstance(e, OSError) and 'config file' in str(e):
    missing = re.findall(r'\[Errno \d+\] ([^\n]+)', str(e))
    why = missing[-1] if missing else str(e).splitlines()[0]
    return f'cannot load the --config file ({why}); give a path such as configs/common.py.'
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _flags_parser(prog: str, config_flag: str | None):
  def parse(argv):
    try:
      rest = FLAGS(argv)
      if config_flag and FLAGS[config_flag].present:
        config = getattr(FLAGS, config_flag)
        if config is not None:
          config.keys()  # a config file that failed to load only raises when the config is read
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
      _fail(prog, _describe_flag_error(e) + ' (--helpshort lists the flags)')
    return rest

  return parse


def _run(prog: str, define_flags, main, *, positional: bool = False) -> None:
  """Defines the command's flags, parses them and runs `main(argv)`, reporting bad input in one line.

  `positional=True` lets the command take arguments after the flags (bit-predict's image files).
  """
  from bit import runtime

  # The CPU runtime settings (malloc, dispatch, XLA flag, TensorFlow's log level) before JAX starts.
  runtime.configure_tool()
  main_module = sys.modules.get('__main__')
  if main_module is not None and not getattr(main_module, '__doc__', None):
    main_module.__doc__ = main.__doc__ or f'{prog} [flags]'  # absl prints it as the --help usage
  # orbax logs every save at INFO; warnings and errors are what a user needs (--verbosity=0 shows INFO).
  absl_logging.set_verbosity(absl_logging.WARNING)
  define_flags()

  def guarded(argv):
    if len(argv) > 1 and not positional:
      _fail(prog, f'unexpected arguments {argv[1:]}: every setting is a flag, e.g. --config.batch_size=64')
    try:
      return main(argv)
    except BitError as e:
      code = getattr(e, 'exit_code', None)
      if code:  # a run stopped on a signal (bit.errors.Interrupted): not bad input, its own status
        print(f'{prog}: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
        sys.exit(code)
      _fail(prog, as_flags(prog, str(e)))
    except OSError as e:  # a file or folder that cannot be written or read (read-only, full disk, ...)
      if e.filename is None:
        raise
      _fail(prog, f'{e.filename}: {e.strerror or e}; fix it (a writable folder, free disk space) and rerun.')
    except KeyboardInterrupt:
      # Outside the training loop, which reports its own checkpoint (bit.errors.Interrupted).
      _fail(
        prog,
        'interrupted; rerunning the same command resumes from the last checkpoint if one was saved '
        '(it logs the step), or starts over and says so',
        code=130,
      )

  app.run(guarded, flags_parser=_flags_parser(prog, 'config' if 'config' in FLAGS else None))


def _main_module() -> str:
  # absl's --help lists the flags of the program's main module; the console script is that module.
  return sys.argv[0] if sys.argv and sys.argv[0] else __name__


def _define(kind: str, name: str, default, help_text: str) -> None:
  if name not in FLAGS:  # tolerate a second definition when several commands run in one process
    getattr(flags, f'DEFINE_{kind}')(name, default, help_text, module_name=_main_module())


def _define_multihost_flags() -> None:
  _define(
    'string',
    'coordinator_address',
    None,
    'Multi-host: host:port of process 0 (or env JAX_COORDINATOR_ADDRESS).',
  )
  _define('integer', 'num_processes', None, 'Multi-host: number of processes (or env JAX_NUM_PROCESSES).')
  _define(
    'integer', 'process_id', None, 'Multi-host: this process, 0..num_processes-1 (or env JAX_PROCESS_ID).'
  )
  if 'distributed' not in FLAGS:
    flags.DEFINE_enum(
      'distributed',
      'auto',
      ['auto', 'off'],
      'auto: without the three flags above, join the cluster jax detects (SLURM, Open MPI, TPU pod, '
      'Kubernetes; docs/clusters.md); off: one process unless the flags say otherwise.',
      module_name=_main_module(),
    )


def _join_cluster() -> None:
  from bit import parallel

  cluster = parallel.initialize_distributed(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, distributed=FLAGS.distributed
  )
  if cluster.kind != 'none':  # a single-process run outside a cluster has nothing to report
    print(cluster.describe(), file=sys.stderr, flush=True)


def _define_config_flag(default=None) -> None:
  from ml_collections import config_flags

  if 'config' not in FLAGS:
    config_flags.DEFINE_config_file(
      'config',
      default,
      'Config file, e.g. configs/cifar10.py (optionally configs/x.py:MODEL); override keys '
      'with --config.key=value.',
      lock_config=True,
    )
    FLAGS.register_flag_by_module(_main_module(), FLAGS['config'])


# --- bit-train -------------------------------------------------------------------------------------------


def _define_train_flags() -> None:
  _define_config_flag()
  _define('string', 'workdir', None, 'Directory for checkpoints, metrics.jsonl, model.npz; rerun to resume.')
  _define(
    'boolean',
    'dry_run',
    False,
    'Compile the train step from shapes only and print its memory per device (reads no data, trains nothing).',
  )
  _define('integer', 'num_classes', None, '--dry_run: the number of classes (default: from local metadata).')
  _define(
    'float',
    'device_memory_gb',
    None,
    '--dry_run: device memory to plan for (default: what the device reports).',
  )
  _define_multihost_flags()


def _train(argv) -> None:
  """bit-train --config configs/<dataset>.py --workdir DIR [--config.key=value ...]

  Fine-tunes a BiT model (config.model) on config.dataset; rerunning the same command resumes. Every key of
  bit/config.py (configs/common.py) can be overridden, e.g. --config.batch_size=64 --config.schedule=[50,100,150,200,250].
  Several hosts: --coordinator_address=HOST0:PORT --num_processes=N --process_id=I on each host.
  --dry_run prints the memory plan per device instead (add --num_classes=N --config.crop=PX for a dataset
  that is not available here). SIGTERM or Ctrl-C: checkpoint of the step, exit 143 or 130; rerun resumes.
  """
  if FLAGS.config is None:
    raise BitError('--config is required, e.g. --config configs/common.py --config.dataset=cifar10.')
  if FLAGS.dry_run:
    from bit import dry_run

    _join_cluster()
    plan = dry_run.plan(FLAGS.config, num_classes=FLAGS.num_classes, device_memory_gb=FLAGS.device_memory_gb)
    print(dry_run.format_plan(plan))
    print(json.dumps(plan), flush=True)
    return
  if not FLAGS.workdir:
    raise BitError('--workdir is required: the directory that receives checkpoints, metrics and model.npz.')
  # configs/demo.py says config.run = 'demo': the offline demo's stages (pretrain, fine-tune, scratch).
  if FLAGS.config.get('run') == 'demo':
    _launch('bit.tools.demo:run_demo', report=False)
  else:
    _launch('bit.train:train_and_evaluate')


def _launch(target: str, report: bool = True) -> None:
  """Joins the cluster (`--distributed`, `--coordinator_address` ...), then runs `target` ('module:function',
  imported only now) on --config and --workdir; with `report`, process 0 prints the metrics it returns as one
  JSON line."""
  import importlib

  _join_cluster()
  module, name = target.split(':')
  result = getattr(importlib.import_module(module), name)(FLAGS.config, FLAGS.workdir)
  import jax

  if report and jax.process_index() == 0:
    print(json.dumps(result), flush=True)


def train_main() -> None:
  """bit-train: fine-tune a BiT model; see `bit.train.train_and_evaluate` and bit/config.py (every key)."""
  _run('bit-train', _define_train_flags, _train)


# --- bit-eval, bit-predict, bit-probe ----------------------------------------------------------------------


def _define_eval_flags() -> None:
  _define('string', 'workdir', None, 'A finished bit-train workdir (config.json, model.npz, labels.txt).')
  _define('string', 'split', None, "Split to evaluate (default: the run's test split).")
  _define('integer', 'batch_size', 64, 'Images per evaluation batch.')
  _define('boolean', 'json', False, 'Print the metrics as one JSON object instead of a table.')


def _eval(argv) -> None:
  if not FLAGS.workdir:
    raise BitError('--workdir is required: the directory of a finished bit-train run.')
  from bit import evaluation, workdir

  result, paths = workdir.evaluate(
    FLAGS.workdir, split=FLAGS.split, batch_size=FLAGS.batch_size, progress=not FLAGS.json
  )
  if FLAGS.json:
    print(
      json.dumps({**evaluation.summary(result), 'files': {k: str(v) for k, v in paths.items()}}), flush=True
    )
  else:
    print(evaluation.format_result(result))
    print('wrote ' + ', '.join(str(p) for p in paths.values()), flush=True)


def eval_main() -> None:
  """bit-eval: top-1, top-5, per-class accuracy and the confusion matrix (PNG + CSV) of a workdir's model."""
  _run('bit-eval', _define_eval_flags, _eval)


def _define_predict_flags() -> None:
  _define('string', 'workdir', None, 'A finished bit-train workdir: its model, class names and resolution.')
  _define(
    'string', 'model', None, 'Instead of --workdir: a checkpoint with its head, e.g. BiT-M-R50x1-ILSVRC2012.'
  )
  _define('integer', 'top', 3, 'How many classes to show per image.')
  _define(
    'integer', 'size', None, "Resize images to size x size (default: the model's evaluation resolution)."
  )
  _define('integer', 'batch_size', 32, 'Images per batch.')
  _define('boolean', 'json', False, 'Print one JSON object per image instead of text.')


def _predict(argv) -> None:
  import warnings

  from bit import prediction

  images = argv[1:]
  if not images:
    raise BitError(
      'no image files given: bit-predict --workdir W [--top 3] IMAGE [IMAGE ...] (folders work too).'
    )
  if FLAGS.top < 1:
    raise BitError(f'--top must be at least 1, got {FLAGS.top}.')
  for folder in (p for p in images if os.path.isdir(os.path.expanduser(p))):
    if not prediction.expand_paths([folder]):
      raise BitError(
        f'{folder} holds no image files ({"/".join(prediction.IMAGE_SUFFIXES)}) directly in it: give image '
        'files, or a folder that holds them (its subfolders are not searched).'
      )
  model, params, names, size = prediction.load_for_prediction(workdir=FLAGS.workdir, model=FLAGS.model)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # bad files are reported below, once
    results = prediction.predict_files(
      model, params, images, names, top=FLAGS.top, size=FLAGS.size or size, batch_size=FLAGS.batch_size
    )
  if FLAGS.json:
    for r in results:
      print(json.dumps(r), flush=True)
  else:
    print(prediction.format_results([r for r in results if 'error' not in r]), flush=True)
  failed = [r for r in results if 'error' in r]
  for r in failed:
    print(f'bit-predict: error: {r["error"]}', file=sys.stderr, flush=True)
  if failed:
    sys.exit(1)


def predict_main() -> None:
  """bit-predict: the top classes, by name, of image files; a bad file is reported and the rest predicted."""
  _run('bit-predict', _define_predict_flags, _predict, positional=True)


def _define_probe_flags() -> None:
  _define_config_flag()
  _define('string', 'workdir', None, 'Directory for the feature cache (features/) and probe.json.')
  _define('string', 'model', None, 'Model whose frozen features are probed (overrides config.model).')
  _define('string', 'dataset', None, 'TFDS name or image folder (overrides config.dataset).')
  _define('string', 'method', 'ridge', "Probe: 'ridge' (closed form, as big_vision's few-shot) or 'logreg'.")
  _define('float', 'l2_reg', 2.0**10, 'L2 strength of the ridge probe.')
  _define('list', 'shots', [], 'Also run the few-shot protocol for these k, e.g. --shots=1,5,10,25.')
  _define('integer', 'seeds', 3, 'Few-shot: number of seeds per k.')
  _define('integer', 'batch_size', 64, 'Images per feature-extraction batch.')


def _probe(argv) -> None:
  if not FLAGS.workdir:
    raise BitError('--workdir is required: it caches the extracted features and receives probe.json.')
  from bit import probe

  config = FLAGS.config.to_dict() if FLAGS.config is not None else {}
  for key in ('model', 'dataset'):
    if getattr(FLAGS, key):
      config[key] = getattr(FLAGS, key)
  if not config.get('model') or not config.get('dataset'):
    raise BitError('give the model and the dataset: --config configs/<x>.py, or --model M --dataset D.')
  try:
    shots = [int(k) for k in FLAGS.shots]
  except ValueError:
    raise BitError(
      f'--shots must be integers, e.g. --shots=1,5,10,25; got {",".join(FLAGS.shots)}.'
    ) from None
  result = probe.run_probe(
    config,
    FLAGS.workdir,
    method=FLAGS.method,
    l2_reg=FLAGS.l2_reg,
    shots=shots,
    seeds=FLAGS.seeds,
    batch_size=FLAGS.batch_size,
    progress=True,
  )
  print(
    f'linear probe ({result["method"]}) of {result["model"]} on {result["dataset"]}: top-1 '
    f'{100 * result["top1"]:.2f}% (train {result["train_size"]}, test {result["test_size"]}, '
    f'{result["num_features"]} features)'
  )
  for row in result.get('few_shot_report', []):
    print(row)
  sys.stdout.flush()


def probe_main() -> None:
  """bit-probe: a linear classifier on frozen pre-logits features (and the few-shot protocol)."""
  _run('bit-probe', _define_probe_flags, _probe)


# --- bit-bench ---------------------------------------------------------------------------------------------


def _define_bench_flags() -> None:
  _define_config_flag()
  _define(
    'string',
    'workdir',
    None,
    'Directory for the cells (one workdir each) and results.md/results.csv; rerun to resume.',
  )


def _bench(argv) -> None:
  """bit-bench --config configs/bench_demo.py --workdir DIR [--config.key=value ...]

  Runs a grid of fine-tunes (model x dataset x examples per class x seed), each cell in DIR/cells/<cell>,
  and writes DIR/results.md and DIR/results.csv: measured top-1 next to the official figures. Rerunning skips
  finished cells and resumes an interrupted one; cells that cannot run here are marked, never filled in.
  """
  if FLAGS.config is None:
    raise BitError(
      '--config is required, e.g. --config configs/bench_demo.py (offline) or configs/bench_paper.py.'
    )
  if not FLAGS.workdir:
    raise BitError('--workdir is required: the directory that receives the cells and results.md.')
  from bit.tools.accuracy_grid import run_bench

  run_bench(FLAGS.config, FLAGS.workdir)


def bench_main() -> None:
  """bit-bench: a grid of fine-tunes against the official figures; see `bit.tools.accuracy_grid` and configs/bench_*.py."""
  _run('bit-bench', _define_bench_flags, _bench)


# --- bit-distill -------------------------------------------------------------------------------------------


def _define_distill_flags() -> None:
  _define_config_flag()
  _define(
    'string', 'workdir', None, 'Directory for the student: checkpoints, metrics, model.npz; rerun to resume.'
  )
  _define_multihost_flags()


def _distill(argv) -> None:
  """bit-distill --config configs/distill.py --workdir DIR --config.teacher=T --config.dataset=D [...]

  Distills a fine-tuned teacher (config.teacher: a bit-train workdir, an .npz or a registry name) into a
  student (config.student) on config.dataset, plus unlabeled images (config.unlabeled); rerunning the same
  command resumes. configs/demo_distill.py runs the offline demo (teacher, distilled and labels-only students).
  """
  if FLAGS.config is None:
    raise BitError('--config is required, e.g. --config configs/distill.py --config.teacher=WORKDIR.')
  if not FLAGS.workdir:
    raise BitError('--workdir is required: the directory that receives the student.')
  if 'distill_demo' in FLAGS.config:  # configs/demo_distill.py: the offline demo's stages, then the students
    _launch('bit.tools.distill_demo:run_distill_demo', report=False)
  else:
    _launch('bit.distill:distill')


def distill_main() -> None:
  """bit-distill: distill a fine-tuned teacher into a small student; see bit.distill and configs/distill.py."""
  _run('bit-distill', _define_distill_flags, _distill)


# --- bit-export --------------------------------------------------------------------------------------------


def _define_export_flags() -> None:
  _define('string', 'workdir', None, 'A finished bit-train workdir: its model.npz, labels.txt and crop.')
  _define('string', 'model', None, 'Instead of --workdir: a registry name or an official-layout .npz.')
  _define(
    'integer', 'num_classes', None, 'With --model: a new (zero) head of this many classes, as bit.load.'
  )
  _define('boolean', 'keep_head', False, "With --model: keep the checkpoint's own head, as bit.load.")
  _define(
    'string',
    'format',
    None,
    'savedmodel (TensorFlow), onnx (needs the [export] extra), stablehlo, or timm (model.safetensors + '
    "config.json as timm's hub repos have them; docs/hub.md).",
  )
  _define('string', 'output', None, 'The directory to write; it must not exist (or --overwrite an export).')
  _define('integer', 'size', None, "Image side the export takes (default: the run's crop, or 224).")
  _define(
    'string',
    'input',
    'float32',
    'float32 (NHWC in [-1, 1]), uint8 (RGB 0..255, scaled inside) or raw (uint8 RGB at any size, resized and '
    'scaled inside; a SavedModel also gets serving_bytes for encoded JPEG/PNG).',
  )
  _define('boolean', 'overwrite', False, 'Replace an existing export at --output.')


def _export(argv) -> None:
  """bit-export --workdir W --format savedmodel|onnx|stablehlo --output DIR [--size 224] [--input uint8|raw]

  Writes the model's inference function (images -> logits, probabilities; any batch size) for serving
  outside JAX, with labels.txt and export.json (size, input convention, source sha256, how to call it).
  """
  from bit.exporter import FORMATS, INPUTS, check_format, check_size, export, load_source

  if not FLAGS.format:
    raise BitError(f'--format is required: one of {", ".join(FORMATS)}, timm.')
  if not FLAGS.output:
    raise BitError('--output is required: the directory that receives the export.')
  if FLAGS.format == 'timm':  # timm's hub layout (bit/sharing.py), not an inference function
    from bit import hub, sharing

    path = sharing.export_timm(
      FLAGS.output,
      workdir=FLAGS.workdir,
      model=FLAGS.model,
      num_classes=FLAGS.num_classes,
      keep_head=FLAGS.keep_head,
      size=FLAGS.size,
      overwrite=FLAGS.overwrite,
    )
    print(
      f"wrote {path} (timm: {hub.WEIGHTS} + {hub.CONFIG}; timm.create_model('local-dir:{path}', pretrained=True))"
    )
    return
  check_format(FLAGS.format)
  if FLAGS.size is not None:
    check_size(FLAGS.size)
  if FLAGS.input not in INPUTS:
    raise BitError(f'--input must be one of {", ".join(INPUTS)}, got {FLAGS.input!r}.')
  model, params, names, size, source = load_source(
    workdir=FLAGS.workdir, model=FLAGS.model, num_classes=FLAGS.num_classes, keep_head=FLAGS.keep_head
  )
  path = export(
    model,
    params,
    FLAGS.format,
    FLAGS.output,
    size=FLAGS.size or size,
    input=FLAGS.input,
    labels=names,
    source=source,
    overwrite=FLAGS.overwrite,
  )
  print(
    f'wrote {path} ({FLAGS.format}, {FLAGS.size or size} px, {FLAGS.input} input); see {path}/export.json'
  )


def export_main() -> None:
  """bit-export: the inference function as a TF SavedModel, ONNX or serialized StableHLO; see bit.export (bit/exporter.py)."""
  _run('bit-export', _define_export_flags, _export)


if __name__ == '__main__':
  train_main()
