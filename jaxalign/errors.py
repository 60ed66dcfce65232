"""Every exception type jaxalign raises on purpose, in one module at the bottom layer.

Any module may import this one (it imports nothing of jaxalign). The types are
also re-exported from the modules that raise them (`jaxalign.config.ConfigError`,
`jaxalign.data.formats.DataError`, `jaxalign.checkpoint.CorruptCheckpointError`,
...), so those import paths keep working.

Two families the CLI tells apart:
- a bad input (`ConfigError`, `DataError`, ...: ValueError) is reported before
  anything is compiled or written, naming the config key or the file:row:field;
- a run fault (`RunError`: a needed file is missing or corrupt, the workdir is
  locked) is found while running; `jaxalign train` prints it on one line.
"""

import os


# Bad input, found before compiling.

class ConfigError(ValueError):
  """A config key holds a value that cannot work; the message names the key."""


class ResumeMismatchError(ConfigError):
  """A resume refused: the config's objective or model shape, the data, or the
  reference table differs from the run it would resume (a usage error: exit 2)."""


class HfConfigError(ValueError):
  """model.hf_path names no readable Hugging Face checkpoint of a supported architecture."""


class DataError(ValueError):
  """A malformed data record; the message starts with ``file:row: field:``."""


class DistributedError(ValueError):
  """The multi-process flags are incomplete or inconsistent."""


class RewardError(ValueError):
  """A reward function returned something that is not one finite float per completion."""


# Faults found while running.

class RunError(RuntimeError):
  """A run cannot go on (a file it needs is missing or corrupt).

  The message names the file or checkpoint step and what to do.
  """


class LockedError(RunError):
  """Another live run holds the workdir; the message names it."""


class CorruptCheckpointError(RunError):
  """A complete-looking checkpoint step could not be read back (truncated array
  file, garbage in the data-iterator JSON, a broken manifest)."""

  def __init__(self, message: str, *, step: int):
    super().__init__(message)
    self.step = step


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, unwritable directory).

  Earlier complete checkpoints are untouched; the message names the directory
  and the latest complete step.
  """


class OutputWriteError(OSError):
  """An output file could not be written (disk full, read-only directory).

  The message names the file and the cause. The partial file is removed; what
  was complete before is kept (a prepared set's finished shards), and nothing
  left behind looks complete (no manifest, no config.json of an export).
  """


def write_failure(path: str, e: BaseException) -> OutputWriteError:
  """OutputWriteError for `path` from the OSError (or ArrayRecord's RuntimeError) `e`."""
  if isinstance(e, OSError) and e.strerror:
    cause = e.strerror          # the path is named once, in front
  else:                         # "write() failed: No space left on device; writing ...; at byte"
    cause = str(e).split(";")[0].strip() or type(e).__name__
  return OutputWriteError(f"{path}: cannot be written ({cause})")


class NonFiniteError(RuntimeError):
  """The loss or a gradient was not finite; the last good checkpoint is kept."""


class DivergenceError(RuntimeError):
  """The loss, gradient norm or parameter norm blew up; the last good checkpoint is kept."""


class PassInterrupted(Exception):
  """SIGTERM or SIGINT stopped a pass over the data before training (the reference
  log-probs, the prompt embeddings) at a batch boundary. Not a fault: the message
  says where it stopped and what was kept (train/passes.py); the run then returns
  a RunResult stopped by `signal_name`, and the CLI exits as for a stop in training.
  """

  def __init__(self, message: str, *, signal_name: str):
    super().__init__(message)
    self.signal_name = signal_name


class PlanError(RuntimeError):
  """The plan cannot be made here (no libtpu, unknown topology, too few devices)."""


def debug_enabled() -> bool:
  """Whether full tracebacks were asked for (JAXALIGN_DEBUG=1 or the CLI's --verbose)."""
  return os.environ.get("JAXALIGN_DEBUG", "") not in ("", "0", "false", "False")
