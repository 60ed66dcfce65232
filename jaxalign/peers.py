"""A process of a multi-process job that dies is named in one line by the survivors.

When one process of a multi-process job dies, JAX's coordination service ends the
others from C++: a fatal log line ("Terminating process because the JAX
distributed service detected fatal errors"), a stack trace and SIGABRT (exit
134). A survivor aborts within a second when the dead process is process 0 (it
hosts the service: the survivor's error poll loses its socket), and after the
heartbeat timeout (`--heartbeat_timeout`) otherwise (the service stops hearing
from the dead one). jax 0.10 gives Python no way to pre-empt this: the client's
`missed_heartbeat_callback` (only reachable through jaxlib's private
`get_distributed_runtime_client`) terminates the process with `std::bad_cast`
when it is a Python callable, the error poll cannot be switched off from Python,
and a watchdog thread cannot beat an abort that comes 0.4 s after process 0 dies.

So in a multi-process job `jaxalign train` runs the training as its child and
watches it (`supervise`): the child's stdout passes through, its stderr too except
from its own error line, a traceback or the coordination service's first log line
on, which are held back (a collective or checkpoint write that failed because the
peer died ends the child with an error line, then its exit waits at JAX's shutdown
barrier for the service's verdict); when the child dies of that abort naming a lost
process, the supervisor prints one line naming it and exits with
`PEER_LOST_STATUS`. Held lines of a child that goes on are let through after
`hold_s`, and in full with any other ending. SIGTERM and SIGINT sent to the
supervisor go to the child (it runs in its own process group, so a terminal's
Ctrl-C reaches it once, through here); the child gets SIGKILL if the supervisor
dies. `JAXALIGN_SUPERVISED=1` in the environment runs the training in place.

A checkpoint that was being written when the peer died is never finalized:
Orbax renames a step's temporary directory to the step only after every process
wrote its part, so the last complete step stays the one a resume loads.

This module imports nothing of JAX, and the supervisor starts no JAX backend.
"""

from __future__ import annotations

import functools
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

PEER_LOST_STATUS = 3
ENV_SUPERVISED = "JAXALIGN_SUPERVISED"

_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
# glog-style lines ("E1207 13:07:26.244824   31374 coordination_service.cc:1549] ...")
# from the coordination service, its agent and JAX's distributed client.
_SERVICE_LINE = re.compile(
    r"^[WEF]\d{4} [\d:.]+\s+\d+ (coordination_service\w*|client|preemption_sync_manager)"
    r"\.(cc|h):\d+\]")


def _holds(line: bytes) -> bool:
  """Whether held back from here on: the child's own error line or a traceback (a
  collective, barrier or checkpoint write that failed because the peer died comes
  first), or the coordination service's log."""
  return line.startswith((b"jaxalign train: error:", b"Traceback (most recent call last)",
                          b"Exception in thread")) or bool(
      _SERVICE_LINE.match(line.decode("utf-8", "replace")))


def supervised() -> bool:
  """Whether this process is the training child (or supervision is switched off)."""
  return os.environ.get(ENV_SUPERVISED, "") not in ("", "0")


def lost_processes(text: str, *, me: int | None) -> list[int]:
  """The process indices the coordination service's messages in `text` report lost.

  A task that stopped sending heartbeats is named by the service ("Task 1 heartbeat
  timeout", "... stopped sending heartbeats):\\n1"); a survivor that cannot reach
  the service has lost process 0, which hosts it.
  """
  found = {int(m) for m in re.findall(r"Task (\d+) heartbeat timeout", text)}
  for block in re.findall(r"stopped sending heartbeats\):\s*\n([\d,\s]+)", text):
    found.update(int(m) for m in re.findall(r"\d+", block))
  if not found and ("Failed to send RPC to coordination service" in text
                    or "leader task" in text):
    found.add(0)
  return sorted(found - {me})


def _complete_steps(workdir: str) -> list[int] | None:
  """Finalized checkpoint steps in WORKDIR/checkpoints (a step's directory is named
  by its number only once every process wrote its part); None where not local."""
  if "://" in workdir:
    return None
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def lost_line(text: str, *, me: int | None, num_processes: int | None,
              workdir: str) -> str:
  """The one line a survivor prints: who was lost, and what a rerun resumes from."""
  lost = lost_processes(text, me=me)
  of = f" of {num_processes}" if num_processes else ""
  who = (f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))}{of}"
         if lost else "a peer process")
  why = ("process 0 hosts the coordination service, which is gone" if lost == [0]
         else "it stopped sending heartbeats to the coordination service")
  me_s = "this process" if me is None else f"process {me}"
  steps, where = _complete_steps(workdir), f"{workdir.rstrip('/')}/checkpoints"
  ckpt = (f"the last complete checkpoint is step {steps[-1]} in {where}" if steps
          else "no checkpoint was complete yet" if steps is not None
          else f"a resume loads the last complete checkpoint in {where}")
  return (f"jaxalign train: error: lost {who} ({why}); {me_s} stopped; {ckpt}; "
          "rerun the job on every process to resume")


def _die_with_parent(parent: int) -> None:   # runs in the child between fork and exec
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
  except (OSError, AttributeError):   # not Linux: the child may outlive a killed parent
    return
  if os.getppid() != parent:   # the parent died before the line above
    os._exit(128 + signal.SIGKILL)


def supervise(command: list[str], *, workdir: str, process_id: int | None,
              num_processes: int | None, hold_s: float = 120.0) -> int:
  """Runs `command` (`python -m jaxalign.cli train ...`) as this process's child and
  returns its exit status (128 + N when signal N ended it), or prints `lost_line`
  and returns PEER_LOST_STATUS when the coordination service aborted it because a
  peer process died."""
  env = {**os.environ, ENV_SUPERVISED: "1"}
  child = subprocess.Popen(command, env=env,
                           stderr=subprocess.PIPE, process_group=0,
                           preexec_fn=functools.partial(_die_with_parent, os.getpid()))

  def forward(signum, frame):
    del frame
    try:
      child.send_signal(signum)
    except OSError:
      pass

  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, forward)
    except ValueError:   # not the main thread: signals reach the child only directly
      break
  lines: queue.Queue = queue.Queue()

  def read():
    for line in iter(child.stderr.readline, b""):
      lines.put(line)
    lines.put(None)

  threading.Thread(target=read, daemon=True).start()
  err = sys.stderr.buffer
  held: list[bytes] = []
  held_since = None   # when the first held line came
  try:
    while (line := _next(lines)) is not None:
      if line:
        if held_since is None and _holds(line):
          held_since = time.monotonic()
        if held_since is None:
          err.write(line)
          err.flush()
        else:
          held.append(line)
      if held_since is not None and time.monotonic() - held_since > hold_s:
        err.writelines(held)   # the child went on: not the fatal abort
        err.flush()
        held, held_since = [], None
    status = child.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  text = b"".join(held).decode("utf-8", "replace")
  if held and status != 0 and _FATAL in text and lost_processes(text, me=process_id):
    print(lost_line(text, me=process_id, num_processes=num_processes, workdir=workdir),
          file=sys.stderr, flush=True)
    return PEER_LOST_STATUS
  err.writelines(held)
  err.flush()
  return status if status >= 0 else 128 - status   # killed by a signal: the shell's status


def _next(lines: queue.Queue) -> bytes | None:
  """The next stderr line of the child, b"" after a second without one, None at its end."""
  try:
    return lines.get(timeout=1.0)
  except queue.Empty:
    return b""
