"""The supervisor of a multi-process job's process (jaxalign/peers.py), with stand-in
children: the coordination service's native abort becomes one line naming the lost
process, everything else passes through, signals reach the child, and the child
does not outlive a killed supervisor. The real thing, two processes and a kill -9:
tests/test_multihost.py::test_a_killed_process_is_named_by_the_survivor_in_one_line.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jaxalign import peers

# What a survivor's JAX (0.10.2) prints when it aborts, as recorded: process 1 died
# (the service on process 0 missed its heartbeats) ...
LOST_1 = """\
E1207 13:07:26.244824   31374 coordination_service.cc:1549] [1390] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
E1207 13:07:26.244969   31385 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1207 13:07:26.245823   31385 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: INTERNAL: Shutdown barrier has failed.
Barrier result: 'INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat timeout. This indicates that the remote task has failed, got preempted, or crashed unexpectedly.
*** Check failure stack trace: ***
    @     0x7f782ce40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
    @     0x7f7828f040ee  xla::CoordinationServiceAgent::SetError()
"""
# ... and process 0 died (it hosts the service; process 1's error poll lost its socket).
LOST_0 = """\
W1207 13:11:41.955381    5651 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Socket closed
E1207 13:11:41.955577    5651 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1207 13:11:41.955583    5651 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
*** Check failure stack trace: ***
    @     0x7fdad3e40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
"""


def test_the_lost_process_is_read_from_the_services_messages():
  assert peers.lost_processes(LOST_1, me=0) == [1]
  assert peers.lost_processes(LOST_0, me=1) == [0]
  assert peers.lost_processes(LOST_1 + LOST_0, me=1) == []   # only itself named: no verdict
  assert peers.lost_processes("F1207 client.h:80] Shutdown barrier timed out", me=0) == []


def _child(script: str) -> list[str]:
  return [sys.executable, "-c", textwrap.dedent(script)]


def _abort_after(stderr_text: str, pre: str = "") -> list[str]:
  """A stand-in child: prints `pre` and `stderr_text` to stderr, then aborts."""
  return _child(f"""
      import os, sys
      sys.stderr.write({pre!r}); sys.stderr.flush()
      sys.stderr.write({stderr_text!r}); sys.stderr.flush()
      os.abort()
      """)


@pytest.mark.parametrize("text,me,lost", [(LOST_1, 0, 1), (LOST_0, 1, 0)])
def test_the_native_abort_becomes_one_line_naming_the_lost_process(tmp_path, capfd, text, me,
                                                                    lost):
  for name in ("4", "6", "8.orbax-checkpoint-tmp"):   # 8 was being written
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  pre = ("WARNING jaxalign: process 0/2: 4 local of 8 cpu devices\n"
         + ("jaxalign train: error: saving checkpoint step 8 failed: JaxRuntimeError: Gloo "
            "AllGather failed: Connection reset by peer\n" if lost else
            "Exception in thread Thread-7:\nTraceback (most recent call last):\n"
            "  File \"multihost.py\", line 309, in _fn\njax.errors.JaxRuntimeError: "
            "INTERNAL: Barrier failed\n"))
  status = peers.supervise(_abort_after(text, pre), workdir=str(tmp_path), process_id=me,
                           num_processes=2)
  assert status == peers.PEER_LOST_STATUS == 3
  err = capfd.readouterr().err.splitlines()
  assert err == ["WARNING jaxalign: process 0/2: 4 local of 8 cpu devices",
                 f"jaxalign train: error: lost process {lost} of 2 ("
                 + ("it stopped sending heartbeats to the coordination service" if lost
                    else "process 0 hosts the coordination service, which is gone")
                 + f"); process {me} stopped; the last complete checkpoint is step 6 in "
                 f"{tmp_path / 'checkpoints'}; rerun the job on every process to resume"]


def test_other_endings_pass_through_unchanged(tmp_path, capfd):
  err_line = "jaxalign train: error: data.jsonl:3: prompt: missing\n"
  status = peers.supervise(_child(f"""
      import sys
      print("done", flush=True)
      sys.stderr.write({err_line!r}); sys.exit(1)
      """), workdir=str(tmp_path), process_id=0, num_processes=2)
  out = capfd.readouterr()
  assert status == 1 and out.err == err_line and out.out == "done\n"
  # The service's log from a child that goes on (held a while, then shown) ...
  log_line = LOST_1.splitlines()[3] + "\n"
  status = peers.supervise(_child(f"""
      import sys, time
      sys.stderr.write({log_line!r}); sys.stderr.flush()
      time.sleep(2.5)
      sys.stderr.write("later\\n")
      """), workdir=str(tmp_path), process_id=0, num_processes=2, hold_s=1.0)
  assert status == 0 and capfd.readouterr().err == log_line + "later\n"
  # ... an abort that names no lost process, and a child killed by a signal.
  status = peers.supervise(_abort_after("F1207 1 client.h:80] " + peers._FATAL + " (timeout)\n"),
                           workdir=str(tmp_path), process_id=0, num_processes=2)
  assert status == 128 + signal.SIGABRT and peers._FATAL in capfd.readouterr().err


_SUPERVISED = """
import sys
from jaxalign import peers
sys.exit(peers.supervise(sys.argv[1:], workdir=".", process_id=0, num_processes=2))
"""

_WAITS_FOR_SIGNALS = """
import os, signal, sys, time
def on(signum, frame):
  print("got", signal.Signals(signum).name, flush=True)
  if signum == signal.SIGTERM:
    sys.exit(0)
signal.signal(signal.SIGINT, on)
signal.signal(signal.SIGTERM, on)
print(os.getpid(), flush=True)
while True:
  time.sleep(0.05)
"""


def _start_supervised(tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  env.pop(peers.ENV_SUPERVISED, None)
  proc = subprocess.Popen([sys.executable, "-c", _SUPERVISED, sys.executable, "-c",
                           _WAITS_FOR_SIGNALS], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, text=True)
  return proc, int(proc.stdout.readline())


def test_signals_reach_the_child_once_and_it_dies_with_the_supervisor(tmp_path):
  proc, child = _start_supervised(tmp_path)
  proc.send_signal(signal.SIGINT)
  assert proc.stdout.readline() == "got SIGINT\n"
  proc.send_signal(signal.SIGTERM)
  assert proc.stdout.readline() == "got SIGTERM\n"
  assert proc.wait(timeout=30) == 0

  proc, child = _start_supervised(tmp_path)
  proc.kill()
  proc.wait(timeout=30)
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    try:
      os.kill(child, 0)
    except ProcessLookupError:
      break
    time.sleep(0.05)
  else:
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its killed supervisor")


def test_the_line_names_the_last_complete_checkpoint_or_none(tmp_path):
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir(parents=True)
  line = peers.lost_line(LOST_1, me=0, num_processes=None, workdir=str(tmp_path))
  assert "lost process 1 (" in line and "no checkpoint was complete yet" in line
  line = peers.lost_line(LOST_0, me=None, num_processes=4, workdir="gs://b/run")
  assert "lost process 0 of 4" in line and "this process stopped" in line
  assert "a resume loads the last complete checkpoint in gs://b/run/checkpoints" in line
