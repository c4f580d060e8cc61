"""Errors that say what the user got wrong and how to fix it.

launch.py prints these as their message alone (no traceback) and exits non-zero; anything else is a bug and
keeps its traceback. Each also derives from the built-in type a caller would catch (ValueError, ...).
"""


class UserError(Exception):
  """A mistake in the input (config, datasets, checkpoints, files) or a run that cannot go on; the message
  names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (checked before anything is read or compiled)."""


class DatasetError(UserError, ValueError):
  """A dataset folder, list file, file name or image that cannot be read as the dataset's release."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that is missing, damaged, from another model, or could not be written."""


class InputFilesError(UserError, ValueError):
  """translate / extract: an input or output path that cannot be used."""


class NonFiniteLossError(UserError, FloatingPointError):
  """Training stopped at a non-finite loss (config.train.on_nonfinite="stop")."""


class WorkdirBusyError(UserError, RuntimeError):
  """Another live run holds the workdir."""


class DatasetMissingError(UserError, FileNotFoundError):
  """A dataset folder, list file or listed image that is not where the release puts it."""


class CheckpointMissingError(UserError, FileNotFoundError):
  """No checkpoint (or not the asked-for step) in the workdir."""


class MissingInputError(UserError, FileNotFoundError):
  """translate / extract: an --input_dir that does not exist or holds no images."""


class StorageError(UserError, OSError):
  """A workdir or output folder that is a file, cannot be written (permissions, a read-only mount) or is
  full."""


class CheckpointDamagedError(CheckpointError):
  """A checkpoint whose files cannot be read or whose arrays do not match the checksums saved with them."""

  def __init__(self, message, step):
    super().__init__(message)
    self.step = step


class MetricsFileError(UserError, ValueError):
  """A workdir's metrics.jsonl holds a line that is not JSON (other than a last line cut short)."""
