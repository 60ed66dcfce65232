"""SIGTERM and Ctrl-C during the reference log-probs pass (issue 30 item 6): the pass
stops at the next batch boundary, keeps its complete batches in ref_logps.partial.npz,
says so in one line and exits 0 (SIGTERM) or 130 (SIGINT); the rerun continues from
the kept batches to the table an uninterrupted run makes.

The signal lands at a known batch, by the run's progress: the pass's batches come
through a wrapper of `pipeline.ordered_batches` that, on fetching batch AT, marks a
file and waits until the run's own signal handler has seen the signal.
"""

import logging
import signal
import subprocess
import sys

import numpy as np

from jaxalign import runlock
from jaxalign.data import pipeline
from jaxalign.train import signals
from tests.reliability.helpers import (HANG_S, TINY_CLI_CONFIG, cli_env, complete_steps,
                                       run_cli, wait_for)

AT = 2   # the signal lands while batch AT runs: AT + 1 of the 8 batches (64 / 8) are done
ARGS = (f"--config={TINY_CLI_CONFIG}", "--noprogress", "--config.total_steps=1")

# `jaxalign train` whose reference pass, on fetching batch AT, writes the file argv[1]
# and waits for the signal (sent by the test) to reach the run's Preemption handler.
_CHILD = f"""
import sys, time
from jaxalign import cli
from jaxalign.data import pipeline
from jaxalign.train import signals
handlers = []
enter = signals.Preemption.__enter__
def recording_enter(self):
  handlers.append(self)
  return enter(self)
signals.Preemption.__enter__ = recording_enter
ordered = pipeline.ordered_batches
def paused(*a, **k):
  for i, batch in enumerate(ordered(*a, **k)):
    if i == {AT}:
      open(sys.argv[1], "w").close()
      while not handlers[-1].requested:
        time.sleep(0.001)
    yield batch
pipeline.ordered_batches = paused
sys.exit(cli.main(sys.argv[2:]))
"""


def _stop_line(signal_name: str, workdir) -> str:
  return (f"stopped by {signal_name} during the reference log-probs pass, before training: "
          f"{AT + 1} of 8 batches done, kept in {workdir}/ref_logps.partial.npz; rerun the "
          f"same command to continue from batch {AT + 2}")


def _assert_stopped_in_the_pass(workdir):
  assert (workdir / "ref_logps.partial.npz").exists()
  assert not (workdir / "ref_logps.npy").exists()     # no table that looks complete
  assert not complete_steps(workdir)                  # no step ran, none was saved
  assert not (workdir / runlock.LOCK_FILE).exists()   # the lock is released


def test_sigterm_during_the_reference_pass_keeps_its_batches_and_exits_0(tmp_path, capsys,
                                                                        caplog):
  workdir, mark = tmp_path / "run", tmp_path / "at_batch"
  proc = subprocess.Popen(
      [sys.executable, "-c", _CHILD, str(mark), "train", *ARGS, f"--workdir={workdir}"],
      env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(mark.exists, proc, f"batch {AT} of the reference pass")
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=HANG_S)
  assert proc.returncode == 0, err
  # Beside the run's progress lines (`jaxalign: ...`), the stop is one line.
  lines = [line for line in err.splitlines() if line.strip()
           and not line.startswith(("jaxalign: ", "INFO:jaxalign:"))]
  assert lines == [_stop_line("SIGTERM", workdir)], err
  assert "reference log-probs: 8 batches of 8 examples" in err, err
  _assert_stopped_in_the_pass(workdir)
  with np.load(workdir / "ref_logps.partial.npz") as z:
    kept, filled = z["table"], z["filled"]
  assert filled.sum() == (AT + 1) * 8
  # The rerun of the same command (this process: the key the subprocess wrote must match)
  # continues after the kept batches (tests/train/test_passes.py: the table is then the
  # uninterrupted pass's, bit for bit).
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    status, err = run_cli(capsys, *ARGS, f"--workdir={workdir}")
  assert status == 0, err
  assert f"continuing after the {AT + 1} of 8 batches kept in" in caplog.text
  table = np.load(workdir / "ref_logps.npy")
  np.testing.assert_array_equal(table[filled], kept[filled])
  assert np.isfinite(table).all() and (table < 0).all()
  assert not (workdir / "ref_logps.partial.npz").exists()
  assert complete_steps(workdir) == [1]


def test_ctrl_c_during_the_reference_pass_keeps_its_batches_and_exits_130(
    tmp_path, capsys, monkeypatch):
  """A real SIGINT to this process, through the run's own handler (in this main thread)."""
  workdir = tmp_path / "run"
  ordered = pipeline.ordered_batches

  def ctrl_c_at_batch(*a, **k):
    for i, batch in enumerate(ordered(*a, **k)):
      if i == AT:
        signal.raise_signal(signal.SIGINT)
      yield batch

  monkeypatch.setattr(pipeline, "ordered_batches", ctrl_c_at_batch)
  status, err = run_cli(capsys, *ARGS, f"--workdir={workdir}")
  assert status == signals.INTERRUPTED_STATUS == 130, err
  assert err == [_stop_line("SIGINT", workdir)]
  _assert_stopped_in_the_pass(workdir)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored
