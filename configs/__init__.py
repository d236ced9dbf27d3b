"""Training configs: `get_config(arg=None) -> ml_collections.ConfigDict`, one file per benchmark dataset.

`common.py` holds every key with its default; the dataset files start from it. Use them with
`bit-train --config configs/<name>.py --workdir DIR [--config.key=value ...]`.
"""
