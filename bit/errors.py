"""The project's exceptions: messages are for people and say what to do."""


class BitError(Exception):
  """Any error caused by bad input (a file, a key, a name, a value); the message says what to do."""


class CheckpointError(BitError):
  """A checkpoint file is missing, truncated, not an official-layout .npz, or does not fit the model."""


class DownloadError(BitError):
  """A download failed or gave a file that does not pass its size/checksum check."""


class DataError(BitError):
  """A dataset, split, folder or image cannot be used."""


class ConfigError(BitError):
  """A config key or value is wrong, or a workdir holds a different run."""


class NonFiniteLossError(BitError):
  """The loss or the gradients stopped being finite numbers (bit.train: the last good checkpoint is named)."""


class Interrupted(BitError):
  """A run stopped on a signal (SIGTERM, Ctrl-C); `exit_code` is the status to exit with (128 + signal)."""

  def __init__(self, message: str, exit_code: int) -> None:
    super().__init__(message)
    self.exit_code = exit_code
