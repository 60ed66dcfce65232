"""The workdir lock, third round (issue 30): a take-over is atomic, the lock comes before
the data pass, and an empty or torn lock of a process that is gone is taken over."""

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from jaxalign import runlock
from jaxalign.data import examples as examples_lib, reading
from tests.reliability.helpers import REPO_ROOT, TINY_CLI_CONFIG, cli_env, run_cli

RACERS = 32
ROUNDS = 2
TIMEOUT_S = 120

# One racer: ready, then at "go" tries the lock once and answers; a winner keeps it
# until stdin closes, so a later racer cannot take it over legitimately. Its check of
# the holder's pid is slowed, as on a loaded machine: a take-over that reads the
# holder, then acts on what it read, lets several racers through that window.
_RACER = """
import os, sys, time
from jaxalign import runlock
_kill = os.kill
def slow_kill(pid, sig):
  time.sleep(0.05)
  return _kill(pid, sig)
os.kill = slow_kill
lock = runlock.RunLock()
print("ready", flush=True)
sys.stdin.readline()
try:
  lock.acquire(sys.argv[1])
  print("won", flush=True)
except runlock.LockedError as e:
  print("lost", e, flush=True)
sys.stdin.read()
lock.release()
"""

# A live holder through the real lock: answers "held" once it holds it, keeps it until
# stdin closes.
_HOLDER = """
import os, sys
from jaxalign import runlock
os.makedirs(sys.argv[1], exist_ok=True)
lock = runlock.RunLock()
lock.acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def _spawn(script: str, *args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO_ROOT)


def _dead_pid() -> int:
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  return dead.pid


def _stale_lock(workdir, pid):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / runlock.LOCK_FILE).write_text(json.dumps(
      {"owner": "someone", "host": socket.gethostname(), "pid": pid,
       "started": "2026-01-01T00:00:00"}))


def _race(workdir) -> list[str]:
  """RACERS processes released together on `workdir`: each one's answer line."""
  racers = [_spawn(_RACER, str(workdir)) for _ in range(RACERS)]
  # Bounded: a hung racer is killed, its empty answer fails the test.
  watchdog = threading.Timer(TIMEOUT_S, lambda: [p.kill() for p in racers])
  watchdog.start()
  try:
    for p in racers:
      assert p.stdout.readline().strip() == "ready"
    for p in racers:   # the go, to all at once
      p.stdin.write("go\n")
      p.stdin.flush()
    return [p.stdout.readline().strip() for p in racers]
  finally:
    for p in racers:
      p.stdin.close()
    for p in racers:
      p.wait(timeout=TIMEOUT_S)
    watchdog.cancel()


def test_racing_runs_on_a_stale_lock_exactly_one_takes_it_over(tmp_path):
  for round_ in range(ROUNDS):
    workdir = tmp_path / f"run{round_}"
    _stale_lock(workdir, _dead_pid())
    answers = _race(workdir)
    winners = [a for a in answers if a == "won"]
    assert len(winners) == 1, answers
    assert all(a == "won" or (a.startswith("lost ") and "is in use by" in a) for a in answers)
    assert not (workdir / runlock.LOCK_FILE).exists()   # the winner released it


@pytest.mark.parametrize("content", ["", '{"owner": "someone", "host": "', "\0\0\0\0"],
                         ids=["empty", "torn", "zeros"])
def test_empty_or_torn_lock_of_a_gone_process_is_taken_over(tmp_path, caplog, content):
  (tmp_path / runlock.LOCK_FILE).write_text(content)
  lock = runlock.RunLock()
  lock.acquire(str(tmp_path))
  assert "taking over the lock" in caplog.text
  holder = json.loads((tmp_path / runlock.LOCK_FILE).read_text())
  assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  lock.release()
  assert not (tmp_path / runlock.LOCK_FILE).exists()


@contextlib.contextmanager
def _held(workdir):
  """A live process holding `workdir`'s lock while the block runs; it exits 0 after."""
  holder = _spawn(_HOLDER, str(workdir))
  try:
    assert holder.stdout.readline().strip() == "held"
    yield holder
  finally:
    holder.stdin.close()
    holder.wait(timeout=TIMEOUT_S)
  assert holder.returncode == 0


def test_live_holder_is_refused_with_one_line_naming_it(tmp_path, capsys):
  workdir = tmp_path / "run"
  with _held(workdir) as holder:
    status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                          "--noprogress")
    assert status == 1, err
    assert len(err) == 1 and f"is in use by pid {holder.pid} on {socket.gethostname()}" in err[0]
    with pytest.raises(runlock.LockedError, match="is in use by pid"):
      runlock.RunLock().acquire(str(workdir))
    assert sorted(p.name for p in workdir.iterdir()) == [runlock.LOCK_FILE]
  assert not workdir.exists() or not (workdir / runlock.LOCK_FILE).exists()


def test_busy_workdir_is_refused_before_any_data_is_read(tmp_path, capsys, monkeypatch):
  read = []

  def spy(module, name):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
      read.append(name)
      return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)

  spy(reading, "load_tokenizer")       # the tokenizer, then the examples (train/loop.py)
  spy(examples_lib, "open_examples")
  workdir = tmp_path / "run"
  with _held(workdir):
    status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                          "--noprogress")
  assert status == 1 and "is in use by pid" in err[0], err
  assert read == [], f"read data before the lock refused the run: {read}"


def test_refused_data_leaves_no_workdir_though_the_lock_came_first(tmp_path, capsys):
  workdir = tmp_path / "a" / "run"
  status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                        "--noprogress", "--config.data.train_path=/nonexistent/data.jsonl")
  assert status != 0, err
  assert not (tmp_path / "a").exists()


def test_lock_that_cannot_be_written_is_removed_not_left_empty(tmp_path, monkeypatch):
  def disk_full(*_):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(runlock.os, "pwrite", disk_full)
  workdir = tmp_path / "run"
  with pytest.raises(OSError, match="No space left"):
    runlock.RunLock().acquire(str(workdir))
  assert not workdir.exists()   # neither the lock file nor the directory made for it
