"""An exclusive lock on a run directory for the life of a run.

Two `jaxalign train` processes on one workdir would interleave metrics and
overwrite each other's checkpoints. A run holds `fcntl.flock` on WORKDIR/run.lock
from `acquire` to `release`, and writes its owner, host, pid and start time into
the file for the message a second run shows (`LockedError` naming the holder).

Who holds the lock is decided by the kernel's flock, never by reading the file,
so taking over is atomic: of any number of runs started together on a workdir,
exactly one holds the lock. The kernel drops a flock when its process dies
(kill -9, a crash), so a lock left behind is free whatever its content: a dead
process's, an empty one (the disk filled before it was written) or a torn one is
taken over with a warning. The file is only unlinked by its holder at release;
a run that opened a file since unlinked sees that it is not the path's file and
looks again, so two runs never hold two files of one name.

Two cases stay refused though no flock is held, because their process cannot be
checked from here: a file naming a live process on this host (a run of a jaxalign
that did not flock) and a file naming another host (flock may not cross hosts on
a network filesystem): delete the file when you know that run is gone.

`acquire` creates the workdir if needed (the lock is the first thing a run does,
before its data is read); `release` removes what it created unless the run said
it uses the directory (`keep_workdir`), so a run refused by its config or data
leaves no workdir behind.

gs:// workdirs: no lock is taken (GCS has no atomic create through the file
API jaxalign uses); a warning says so. In a multi-process job only process 0
locks the directory.
"""

from __future__ import annotations

import errno
import fcntl
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
_ATTEMPTS = 10   # looks again when the file was replaced between its open and its flock
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


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
  """Holds WORKDIR/run.lock from `acquire` to `release` (idempotent)."""

  def __init__(self):
    self.path: str | None = None
    self._fd: int | None = None
    self._made: list[str] = []   # directories `acquire` created, deepest first
    self._keep = False

  def acquire(self, workdir: str) -> None:
    """Takes the lock, creating `workdir` if needed.

    Raises:
      LockedError: another live run holds it (one line naming the holder).
    """
    if paths.is_remote(workdir):
      log.warning("%s is a bucket URL: the workdir is not locked, so make sure no other "
                  "run uses it at the same time", workdir)
      return
    path = os.path.join(workdir, LOCK_FILE)
    self._made = _missing_dirs(workdir)
    try:
      for _ in range(_ATTEMPTS):
        os.makedirs(workdir, exist_ok=True)   # again: a refused run may have removed it
        opened = _open(path)
        if opened is None:   # removed between the two opens: look again
          continue
        fd, created = opened
        try:
          if self._take(fd, created, workdir, path):
            self._fd, self.path = fd, path
            break
        except BaseException:
          os.close(fd)
          raise
        os.close(fd)
      else:
        raise LockedError(f"workdir {workdir}: could not take the lock {path}")
    except BaseException:
      self._remove_made()
      raise
    try:
      _write(self._fd, {"owner": _owner(), "host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError:   # e.g. the disk is full: leave no lock file behind
      self.release()
      raise

  def _take(self, fd: int, created: bool, workdir: str, path: str) -> bool:
    """Whether `fd` (open on `path`) is now ours; False: the path's file changed.

    Raises:
      LockedError: a live run holds it.
    """
    held = not _flock(fd, path)
    if not _is_file_of(fd, path):   # its holder released (unlinked) it meanwhile
      return False
    holder, raw = _read(fd)
    me_host, me_pid = socket.gethostname(), os.getpid()
    same_host = holder is not None and holder.get("host") == me_host
    pid = holder.get("pid") if holder is not None else None
    if held:
      if same_host and pid == me_pid:
        raise LockedError(f"workdir {workdir} is already locked by this process")
      if holder is None:   # its holder has not written it yet
        raise LockedError(f"workdir {workdir} is in use by another run; wait for it to "
                          f"finish or use another --workdir (lock file {path})")
      raise _in_use(workdir, path, holder)
    if holder is None:
      if not created:
        log.warning("taking over the lock %s, which is %s and held by no running process",
                    path, "torn" if raw.strip() else "empty")
      return True
    if not same_host or (isinstance(pid, int) and pid != me_pid and _pid_alive(pid)):
      raise _in_use(workdir, path, holder)
    log.warning("taking over the lock %s of %s, which is no longer running", path,
                _describe(holder))
    return True

  def keep_workdir(self) -> None:
    """The run uses the workdir: `release` leaves the directories `acquire` created."""
    self._keep = True

  def release(self) -> None:
    if self._fd is not None:
      try:   # unlinked while still held: a run waiting on this file then looks again
        if _is_file_of(self._fd, self.path):
          os.unlink(self.path)
      except OSError as e:
        log.warning("could not remove the lock %s: %s", self.path, e)
      finally:
        os.close(self._fd)
        self._fd = None
    self._remove_made()
    self.path = None

  def _remove_made(self) -> None:
    """Removes the (empty) directories `acquire` created, unless the run kept them."""
    if not self._keep:
      for d in self._made:
        try:
          os.rmdir(d)
        except OSError:   # not empty (another run's lock, files of this run): keep it
          break
    self._made = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _in_use(workdir: str, path: str, holder: dict) -> LockedError:
  return LockedError(f"workdir {workdir} is in use by {_describe(holder)}; wait for it "
                     f"to finish or use another --workdir (lock file {path})")


def _missing_dirs(path: str) -> list[str]:
  """`path` and its ancestors that do not exist yet, deepest first."""
  missing = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    missing.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def _open(path: str) -> tuple[int, bool] | None:
  """(fd, created) for `path`, created if missing; None if it vanished in between."""
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
  except FileExistsError:
    pass
  except FileNotFoundError:   # a refused run removed the directory it had made
    return None
  try:
    return os.open(path, os.O_RDWR), False
  except FileNotFoundError:
    return None


def _flock(fd: int, path: str) -> bool:
  """Takes the flock without waiting: False when another open file holds it."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return False
    if e.errno not in _NO_FLOCK:
      raise
    # Some FUSE mounts (a bucket mounted as a directory) have no flock.
    log.warning("%s: the filesystem cannot lock files (%s); the run lock relies on the "
                "file's content alone, so make sure no other run uses this workdir", path,
                os.strerror(e.errno))
  return True


def _is_file_of(fd: int, path: str) -> bool:
  """Whether `path` still names the file open as `fd` (not unlinked, not replaced)."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(fd)
  return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read(fd: int) -> tuple[dict | None, bytes]:
  """(the holder's record or None when empty or torn, the raw bytes)."""
  raw = os.pread(fd, 1 << 16, 0)
  try:
    data = json.loads(raw)
  except ValueError:
    return None, raw
  return (data if isinstance(data, dict) else None), raw


def _write(fd: int, record: dict) -> None:
  data = json.dumps(record).encode()
  os.ftruncate(fd, 0)
  if os.pwrite(fd, data, 0) != len(data):
    raise OSError(errno.ENOSPC, "short write of the run lock")
