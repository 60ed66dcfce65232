"""The workdir lock (a live holder refuses a second run; a dead one's lock is taken over)
and the divergence guard (a finite blow-up stops the run like a non-finite one)."""

import json
import socket
import subprocess
import sys

from jaxalign import guards, runlock
from tests.reliability.helpers import TINY_CLI_CONFIG, complete_steps, run_cli


def _lock(workdir, pid, host=None):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / runlock.LOCK_FILE).write_text(json.dumps(
      {"owner": "someone", "host": host or socket.gethostname(), "pid": pid,
       "started": "2026-01-01T00:00:00"}))


def test_second_run_on_a_locked_workdir_exits_1_naming_the_holder(tmp_path, capsys):
  # Alive until the test ends (it reads stdin until killed), however long the run takes.
  holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
  try:
    workdir = tmp_path / "run"
    _lock(workdir, holder.pid)
    status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                          "--noprogress")
    assert status == 1, err
    assert len(err) == 1 and f"is in use by pid {holder.pid} on {socket.gethostname()}" in err[0]
    assert not (workdir / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, capsys, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  workdir = tmp_path / "run"
  _lock(workdir, dead.pid)
  status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                        "--noprogress", "--config.total_steps=1")
  assert status == 0, err
  assert "taking over the lock" in caplog.text
  assert not (workdir / runlock.LOCK_FILE).exists()   # released at the end of the run


def test_lock_from_another_host_is_never_taken_over(tmp_path):
  _lock(tmp_path, 1, host="elsewhere.example")
  try:
    runlock.RunLock().acquire(str(tmp_path))
  except runlock.LockedError as e:
    assert "pid 1 on elsewhere.example" in str(e)
  else:
    raise AssertionError("took another host's lock")


def test_guard_trips_on_a_spike_and_a_blow_up_never_on_noise():
  calm = [{"loss": 0.69 - 0.01 * i, "grad_norm": 1.0 + 0.1 * (i % 3), "param_norm": 10.0}
          for i in range(30)]
  g = guards.DivergenceGuard()
  assert all(g.problem(m) is None for m in calm)
  g = guards.DivergenceGuard()
  for m in calm[:10]:
    g.problem(m)
  assert g.problem({"loss": 100.0, "grad_norm": 1.0, "param_norm": 10.0}).startswith("loss 100")
  assert g.problem({"loss": 0.6, "grad_norm": 5e3, "param_norm": 10.0}).startswith("grad_norm")
  assert g.problem({"loss": 0.6, "grad_norm": 1.0, "param_norm": 101.0}).startswith("param_norm")
  assert guards.DivergenceGuard(enabled=False).problem({"loss": 1e9, "grad_norm": 1e9,
                                                        "param_norm": 1e9}) is None


def test_diverging_sft_run_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                                 capsys):
  # lr=1e3 (the case): finite, but the parameter norm explodes.
  workdir = tmp_path / "run"
  recipe = tmp_path / "sft.py"
  recipe.write_text("from tests.train.helpers import tiny_config\n\n\n"
                    "def get_config():\n  return tiny_config('sft')\n")
  status, err = run_cli(capsys, f"--config={recipe}", f"--workdir={workdir}",
                        "--noprogress", "--config.optim.lr=1000.0",
                        "--config.optim.warmup_steps=0", "--config.total_steps=20",
                        "--config.checkpoint.every=1", "--config.checkpoint.async_save=False")
  assert status == 1, err
  assert len(err) == 1 and "divergence at step" in err[0], err
  assert "last good checkpoint: step" in err[0] or "no checkpoint" in err[0]
  step = int(err[0].split("divergence at step ")[1].split(":")[0])
  assert all(s < step for s in complete_steps(workdir))
