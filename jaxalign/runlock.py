"""An exclusive lock on a run directory for the life of a run.

Two `jaxalign train` processes on one workdir would interleave metrics and
overwrite each other's checkpoints. The first to start creates WORKDIR/run.lock
(O_CREAT | O_EXCL, so exactly one creator wins) holding its owner, host, pid and
start time; the second stops with `LockedError` naming the holder. A lock left by
a process that died (kill -9, a crash) on this same host is taken over with a
warning; a lock from another host is never taken over automatically (its process
cannot be checked from here): delete the file when you know that run is gone.

gs:// workdirs: no lock is taken (GCS has no atomic create through the file
API jaxalign uses); a warning says so. In a multi-process job only process 0
locks the directory.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import socket
import time

from jaxalign import paths
from jaxalign.errors import LockedError

log = logging.getLogger("jaxalign")

LOCK_FILE = "run.lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, owned by someone else
    return True
  return True


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on {holder.get('host')} (user {holder.get('owner')}, "
          f"since {holder.get('started', '?')})")


def _owner() -> str:
  try:
    return getpass.getuser()
  except (KeyError, OSError):
    return str(os.getuid())


class RunLock:
  """Takes WORKDIR/run.lock on `acquire`, removes it on `release` (idempotent)."""

  def __init__(self):
    self.path: str | None = None

  def acquire(self, workdir: str) -> None:
    if paths.is_remote(workdir):
      log.warning("%s is a bucket URL: the workdir is not locked, so make sure no other "
                  "run uses it at the same time", workdir)
      return
    path = os.path.join(workdir, LOCK_FILE)
    me = {"owner": _owner(), "host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):  # create; else inspect, maybe take over a stale lock, retry
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read(path)
        if holder is None:  # being written right now, or empty: look again shortly
          time.sleep(0.2)
          holder = _read(path)
        if holder is None:
          holder = {}
        same_host = holder.get("host") == me["host"]
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and pid == os.getpid():
          raise LockedError(f"workdir {workdir} is already locked by this process")
        if same_host and isinstance(pid, int) and not _pid_alive(pid):
          log.warning("taking over the lock %s of %s, which is no longer running", path,
                      _describe(holder))
          try:
            os.unlink(path)
          except FileNotFoundError:
            pass
          continue
        if not holder:
          raise LockedError(f"workdir {workdir} is locked ({path} exists but is unreadable); "
                            "delete it if no run is using this workdir")
        raise LockedError(f"workdir {workdir} is in use by {_describe(holder)}; wait for it "
                          f"to finish or use another --workdir (lock file {path})")
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.path = path
      return
    raise LockedError(f"workdir {workdir}: could not take the lock {path}")

  def release(self) -> None:
    if self.path is None:
      return
    try:
      holder = _read(self.path)
      if holder is not None and holder.get("pid") == os.getpid():
        os.unlink(self.path)
    except OSError as e:
      if e.errno != errno.ENOENT:
        log.warning("could not remove the lock %s: %s", self.path, e)
    self.path = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else None
  except (OSError, ValueError):
    return None
