"""The process-wide CPU runtime settings bit's speed figures were measured with, applied only when asked.

`import bit` changes nothing global. The command-line tools (bit-train, bit-eval, bit-predict, bit-probe,
bit-bench, `python -m bit.tools.speed`, `python -m bit.tools.input_speed`, the demo) call `configure_tool()`
first thing, before JAX's backend starts; a program that uses bit as a library can call
`bit.configure_cpu()` itself, before its first JAX computation. What `configure_cpu()` changes:

- `XLA_FLAGS` gains `--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_dot` (bit/xla.py): XLA's
  CPU backend keeps convolutions in its own (Eigen) kernels instead of YNNPACK, for computations bit does not
  compile itself (bit's own jits get the same setting per compilation anyway). A user's own setting of the
  flag wins; other jaxlib versions than the measured ones are left alone.
- glibc's `mallopt` (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GB) and JAX's `jax_cpu_enable_async_dispatch` off
  (bit/malloc.py): XLA's per-step buffers are reused instead of faulted in anew. `BIT_MALLOC=system` skips it.

What each setting buys is in docs/performance.md, with the command that measured it. Off a CPU backend
it costs nothing and changes nothing that matters (the malloc settings hold for host memory only).
"""

from __future__ import annotations

import os

from bit import malloc, xla

# bit uses TensorFlow only for tf.data: its C++ start-up chatter (INFO lines, the oneDNN notice) is noise to a
# user of the tools. setdefault: a user's own setting wins.
TOOL_ENVIRONMENT = {'TF_CPP_MIN_LOG_LEVEL': '2', 'TF_ENABLE_ONEDNN_OPTS': '0'}


def configure_cpu() -> dict[str, bool]:
  """Applies the CPU settings above; returns {'xla_flag': bool, 'malloc': bool, 'dispatch': bool}.

  Call it before the first JAX computation: once JAX's backend runs, the XLA flag and the dispatch setting
  can no longer take effect (the malloc settings still do). Safe to call again.
  """
  xla.configure_environment()
  state = malloc.configure()
  return {'xla_flag': xla.FLAG in os.environ.get('XLA_FLAGS', ''), **state}


def configure_tool() -> dict[str, bool]:
  """What every command-line tool runs before JAX starts: TensorFlow kept quiet, then `configure_cpu()`."""
  for name, value in TOOL_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
  return configure_cpu()
