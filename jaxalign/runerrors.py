"""Run errors: a fault found while running (not a bad config), reported in one line.

`jaxalign train` prints `RunError`'s message on one stderr line and exits 1. With
`--verbose` or JAXALIGN_DEBUG=1 the CLI prints the full traceback as well. The
types live in jaxalign/errors.py; this module keeps their old import path.
"""

from jaxalign.errors import RunError, debug_enabled

__all__ = ["RunError", "debug_enabled"]
