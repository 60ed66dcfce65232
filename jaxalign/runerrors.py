"""Run errors: a fault found while running (not a bad config), reported in one line.

`jaxalign train` prints `RunError`'s message on one stderr line and exits 1. With
`--verbose` or JAXALIGN_DEBUG=1 the CLI prints the full traceback as well.
"""

import os


class RunError(RuntimeError):
  """A run cannot go on (a file it needs is missing or corrupt, the data changed).

  The message names the file or checkpoint step and what to do.
  """


def debug_enabled() -> bool:
  """Whether full tracebacks were asked for (JAXALIGN_DEBUG=1 or the CLI's --verbose)."""
  return os.environ.get("JAXALIGN_DEBUG", "") not in ("", "0", "false", "False")
