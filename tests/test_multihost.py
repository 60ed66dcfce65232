"""Two real processes joined over loopback run `jaxalign train` like one process.

launch/local_multiprocess.sh starts 2 processes of `python -m jaxalign.cli train`,
4 fake CPU devices each, joined by `jax.distributed.initialize` (gloo
collectives). Each reads its own share of every global batch through Grain,
the reference log-probs are precomputed across both, metrics are written by
process 0 only, and Orbax saves and restores from both. The reference is this
process's single-process run on 8 devices with the same config and global batch.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxalign import distributed
from tests.train.helpers import compile_flags, tiny_config, train_loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
RECIPE = ROOT / "tests" / "train" / "tiny_cli_config.py"


def _launch(workdir, log_dir, *extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT), LOG_DIR=str(log_dir),
             DEVICES_PER_PROCESS="4", XLA_FLAGS=compile_flags())
  proc = subprocess.run(
      ["bash", str(LAUNCH), "2", "--config", str(RECIPE), "--workdir", str(workdir),
       "--noprogress", "--distributed_timeout", "120", *extra],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc.stdout


def _rows(workdir):
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  # Wall-clock figures; and the window's fill, which (as its rates) a resumed invocation's
  # first step, mostly compilation, does not log.
  timed = lambda k: k in ("tokens_per_sec", "eval/seconds") or k.startswith(
      ("perf/", "time/", "tokens/"))
  return {r["step"]: {k: v for k, v in r.items() if not timed(k)} for r in rows}


def test_two_processes_equal_one_and_resume_from_their_checkpoint(tmp_path):
  single = tmp_path / "single"
  train_loop(tiny_config(), str(single), progress=False)   # 8 devices, mesh (1, 8, 1)

  multi = tmp_path / "multi"
  out = _launch(multi, tmp_path / "logs", "--stop_after_steps", "3")
  # An early stop says so on each process (not the "done:" of a finished run).
  assert all(f"[{p}] stopped after --stop_after_steps=3 at step 3 of 5" in out for p in (0, 1))
  assert "done:" not in out
  assert sorted(os.listdir(multi / "checkpoints")) == ["3"]
  # Process 0 alone writes metrics; both logged their share of the 8 devices.
  assert sorted(_rows(multi)) == [1, 2, 3]
  logs = sorted(os.listdir(tmp_path / "logs"))
  assert len(logs) == 2
  assert "process 1/2: 4 local of 8 cpu devices" in (tmp_path / "logs" / logs[1]).read_text()

  out = _launch(multi, tmp_path / "logs")                  # resumes at step 3 on both
  assert "[0] done: step 5" in out and "[1] done: step 5" in out
  want, got = _rows(single), _rows(multi)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
  for step in want:
    for key, value in want[step].items():
      np.testing.assert_allclose(got[step][key], value, rtol=1e-5, atol=1e-7,
                                 err_msg=f"step {step} {key}")
  np.testing.assert_allclose(np.load(multi / "ref_logps.npy"), np.load(single / "ref_logps.npy"),
                             rtol=1e-6)


def test_incomplete_or_bad_cluster_flags_fail_before_anything_starts(monkeypatch):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.resolve().is_multiprocess
  assert distributed.resolve(auto=True).is_multiprocess
  with pytest.raises(distributed.DistributedError, match="--num_processes, --process_id"):
    distributed.resolve(coordinator="127.0.0.1:1234")
  with pytest.raises(distributed.DistributedError, match="HOST:PORT"):
    distributed.resolve(coordinator="localhost", num_processes=2, process_id=0)
  with pytest.raises(distributed.DistributedError, match=r"--process_id 2: must be in \[0, 2\)"):
    distributed.resolve(coordinator="127.0.0.1:1234", num_processes=2, process_id=2)
  monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:999")
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "1")
  assert distributed.resolve() == distributed.Cluster("127.0.0.1:999", 2, 1)
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "one")
  with pytest.raises(distributed.DistributedError, match="JAXALIGN_PROCESS_ID"):
    distributed.resolve()


def test_cli_rejects_partial_cluster_flags_with_status_2(capsys):
  from jaxalign import cli
  status = cli.main(["train", "--config", str(RECIPE), "--workdir", "/nonexistent/x",
                     "--coordinator", "127.0.0.1:1", "--num_processes", "2"])
  assert status == 2
  assert "--process_id missing" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(c) for c in f.read().split()]


def test_a_killed_process_is_named_by_the_survivor_in_one_line(tmp_path):
  """Process 1's training process is killed with -9 once process 0 has logged steps
  and a checkpoint is complete (one is saved every step, so a save is in flight): process 0 exits 3 with one line naming process 1,
  within the heartbeat timeout (10 s here) and a margin; the checkpoints a resume
  would list are complete ones, a save in flight is left as Orbax's temporary dir."""
  import signal
  import socket
  import time
  workdir = tmp_path / "run"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAXALIGN_SUPERVISED")}
  env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=compile_flags() + " --xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jaxalign.cli", "train", "--config", str(RECIPE), "--workdir",
       str(workdir), "--noprogress", "--config.total_steps=10000", "--config.checkpoint.every=1",
       "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
       "--distributed_timeout", "120", "--heartbeat_timeout", "10"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 400
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2
               and any(n.isdigit() for n in os.listdir(workdir / "checkpoints"))):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          [p.communicate()[1][-3000:] for p in procs if p.poll() is not None]
      time.sleep(0.2)
    victim = _children(procs[1].pid)   # the training process under its supervisor
    assert len(victim) == 1
    os.kill(victim[0], signal.SIGKILL)
    _, err = procs[0].communicate(timeout=600)   # catches a hang only
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  assert procs[1].wait() == 128 + signal.SIGKILL
  assert procs[0].returncode == 3, err[-3000:]
  lines = err.splitlines()
  assert "Check failure stack trace" not in err and "Traceback" not in err
  complete = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert lines[-1] == (
      "jaxalign train: error: lost process 1 of 2 (it stopped sending heartbeats to the "
      f"coordination service); process 0 stopped; the last complete checkpoint is step "
      f"{complete[-1]} in {workdir / 'checkpoints'}; rerun the job on every process to resume")
  assert sum(line.startswith("jaxalign train: error:") for line in lines) == 1
  # (How soon: --heartbeat_timeout bounds it; the test does not time it, a loaded
  # machine may take longer, and the communicate() timeout only catches a hang.)
  # What a resume would list: Orbax's own steps, each with every process's part.
  import orbax.checkpoint as ocp
  listed = ocp.CheckpointManager(str(workdir / "checkpoints")).all_steps()
  assert sorted(listed) == complete
  for step in complete:
    d = workdir / "checkpoints" / str(step)
    for part in ("commit_success.txt", "_CHECKPOINT_METADATA", "data/process_0-of-2.json",
                 "data/process_1-of-2.json", "state/ocdbt.process_0", "state/ocdbt.process_1",
                 "state/_METADATA"):
      assert (d / part).exists(), (step, part)
