"""The command-line tools built on the library: `cli` (the bit-* console scripts), `accuracy_grid` (bit-bench),
`speed` and `input_speed` (`python -m bit.tools.speed` / `python -m bit.tools.input_speed`), and `demo` (the
offline demo behind `bit-train --config configs/demo.py`). The library (`import bit`) never imports them."""
