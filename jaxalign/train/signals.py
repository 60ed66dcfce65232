"""SIGTERM and SIGINT (Ctrl-C) as a request to stop at the next step (or batch) boundary.

The first signal sets a flag the loop reads once per step: it saves a checkpoint
there and stops (the CLI then exits 0 for SIGTERM, 130 for SIGINT, the shell's
convention for an interrupted command). The passes over the data before training
(train/passes.py) read it once per batch and stop there, keeping the reference
pass's complete batches for the rerun; the CLI exits with the same statuses.

A second SIGINT exits at once with status 130: it first waits for an async
checkpoint write already in flight to complete (the loop registers
`wait_for_writes`), unless the loop is inside a save call, or a third Ctrl-C
arrives during the wait; then it leaves without waiting. An unfinished write is
left as Orbax's temporary directory, which is never listed as a step, so the
restart resumes from the last complete one.
"""

import os
import signal
import sys

INTERRUPTED_STATUS = 130


class Preemption:
  """Context manager turning SIGTERM/SIGINT into `requested` (and `signal_name`)."""

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self.wait_for_writes = None   # set by the loop: blocks until async saves finish
    self.in_save = False          # set by the loop around a save call
    self._interrupts = 0
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no signal handling
        break
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts >= 2:
        self._exit_now()
    self.signal_name = self.signal_name or signal.Signals(signum).name
    self.requested = True

  def _exit_now(self):
    waited = False
    if self._interrupts == 2 and self.wait_for_writes is not None and not self.in_save:
      print("jaxalign train: second interrupt: waiting for the checkpoint write in flight "
            "(Ctrl-C again to leave without it)", file=sys.stderr, flush=True)
      try:
        self.wait_for_writes()
        waited = True
      except Exception:  # a failed write is left incomplete, never loaded
        pass
    print("jaxalign train: interrupted: exiting now"
          + ("" if waited else "; an unfinished checkpoint write is discarded")
          + "; rerun to resume from the last complete checkpoint", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_STATUS)

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      if previous is not None:
        signal.signal(sig, previous)
