"""kill -9 at random points, including in the middle of an async checkpoint write:
restarting until done gives parameters bit-identical to an uninterrupted run, and
a torn checkpoint (an Orbax *.orbax-checkpoint-tmp directory) is never loaded.

SIGTERM and a clean stop/resume in a new process are covered by
tests/test_cli.py::test_sigterm_saves_at_the_next_step_and_exits_0 and
tests/train/test_loop.py::test_resume_in_a_new_process_is_bit_identical.
"""

import os
import random
import signal
import subprocess
import time

import pytest

from tests.reliability.helpers import (TINY_CLI_CONFIG, assert_bit_identical, cli_command,
                                       cli_env, complete_steps, params)
from tests.train.helpers import read_metrics, tiny_config, train_loop

TOTAL_STEPS = 12
# Checkpoint every step, so an async write is in flight most of the time.
OVERRIDES = {"total_steps": TOTAL_STEPS, "checkpoint.every": 1, "log_every": 1}
TMP_MARK = ".orbax-checkpoint-tmp"
START_TIMEOUT_S = 300


def _num_logged(workdir) -> int:
  path = workdir / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


def _torn(workdir) -> list[str]:
  directory = workdir / "checkpoints"
  return sorted(n for n in os.listdir(directory) if TMP_MARK in n) if directory.exists() else []


def _start(workdir, env, log):
  args = [f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}", "--noprogress"]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return subprocess.Popen(cli_command(*args), env=env, stdout=log, stderr=log)


def _wait_for(condition, proc, poll_s: float, timeout_s: float) -> bool:
  """Polls until `condition()` (True) or the process ends (False)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll_s)
  raise AssertionError(f"timed out after {timeout_s}s")


def _kill_9(proc) -> None:
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL


# One kill per process: "startup" after a seeded random delay from launch (reading
# data, precomputing the reference, compiling); the others after a seeded random
# number (1-3) of newly logged steps, then after a further random delay (within
# a step, a log or a save) or as soon as the next async checkpoint write is in flight.
KILLS = [("startup", 0), ("random", 1), ("during_write", 2), ("random", 3),
         ("during_write", 4)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight") / "run"
  train_loop(tiny_config(**OVERRIDES), str(workdir), progress=False)
  return workdir


def test_kill_9_at_random_points_then_restart_is_bit_identical(tmp_path, straight_run):
  workdir = tmp_path / "run"
  # A persistent compilation cache keeps the restarts quick; the executables are
  # the ones a fresh compile makes.
  env = {**cli_env(), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  done_kills, torn_seen, resumable = [], [], []
  with open(tmp_path / "log.txt", "wb") as log:
    for kind, seed in KILLS:
      rng = random.Random(seed)
      target = _num_logged(workdir) + rng.randint(1, 3)
      torn_before = set(_torn(workdir))  # left by an earlier kill
      proc = _start(workdir, env, log)
      if kind == "startup":
        time.sleep(rng.uniform(0.5, 2.5))
      elif not _wait_for(lambda: _num_logged(workdir) >= target, proc, 0.005,
                         START_TIMEOUT_S):
        break  # finished before we could kill it
      if kind == "random":
        time.sleep(rng.uniform(0.0, 0.25))
      if kind == "during_write" and not _wait_for(
          lambda: set(_torn(workdir)) - torn_before, proc, 0.001, START_TIMEOUT_S):
        break
      if proc.poll() is not None:
        break
      _kill_9(proc)
      done_kills.append(kind)
      new_torn = sorted(set(_torn(workdir)) - torn_before)
      complete = complete_steps(workdir)
      # A restart loads only renamed, complete steps; the torn write is newer than
      # all of them, so it is never what a restart would load.
      for step in complete:
        assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists(), step
      for name in new_torn:
        assert not complete or int(name.split(".")[0]) > complete[-1], (name, complete)
      torn_seen += new_torn
      resumable.append(complete[-1] if complete else None)

    # The last restart runs to the end.
    final = subprocess.run(cli_command(
        f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}", "--noprogress",
        *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]), env=env, stdout=log, stderr=log)
  log_text = (tmp_path / "log.txt").read_text(errors="replace")
  assert final.returncode == 0, log_text[-3000:]
  # The kills happened, at least one of them mid-write, leaving a torn checkpoint.
  assert done_kills[:4] == [k for k, _ in KILLS[:4]], (done_kills, log_text[-3000:])
  assert torn_seen, "no kill landed during a checkpoint write"
  assert any(resumable), "no restart resumed from a checkpoint"

  assert complete_steps(workdir)[-1] == TOTAL_STEPS
  cfg = tiny_config(**OVERRIDES)
  assert_bit_identical(params(workdir, cfg), params(straight_run, cfg))
  # Every step's loss matches too (steps re-run after a kill log twice).
  straight = {m["step"]: m["loss"] for m in read_metrics(straight_run)}
  for m in read_metrics(workdir):
    assert m["loss"] == straight[m["step"]], m["step"]
