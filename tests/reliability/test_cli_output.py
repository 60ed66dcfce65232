"""What the command line prints: one line per error unless --verbose/JAXALIGN_DEBUG=1
asks for the traceback; no libtpu or transformers start-up noise; Ctrl-C in a run
is a clean stop with a checkpoint and status 130."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.reliability.helpers import (HANG_S, RECIPES, cli_command, cli_env, complete_steps,
                                       logged_rows, run_cli, wait_for)

NOISE = ("TPU_WORKER_HOSTNAMES", "INVALID_ARGUMENT", "PyTorch was not found")


def _bad_row_file(tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                  '{"prompt": "1+1=", "chosen": 2, "rejected": "3"}\n')
  return data


@pytest.mark.parametrize("switch", ["--verbose", "JAXALIGN_DEBUG=1"])
def test_verbose_and_debug_env_add_the_full_traceback(tmp_path, capsys, monkeypatch, switch):
  monkeypatch.setenv("JAXALIGN_DEBUG", "0")   # off; the original is restored after --verbose sets it
  args = [f"--config={RECIPES}", f"--workdir={tmp_path / 'run'}", "--noprogress",
          f"--config.data.train_path={_bad_row_file(tmp_path)}"]
  status, quiet = run_cli(capsys, *args)
  assert status == 1 and len(quiet) == 1, quiet
  if switch == "--verbose":
    args.append("--verbose")
  else:
    monkeypatch.setenv("JAXALIGN_DEBUG", "1")
  status, loud = run_cli(capsys, *args)
  assert status == 1
  assert loud[0] == "Traceback (most recent call last):", loud
  assert any("jaxalign/train/loop.py" in line for line in loud), loud   # where it was raised
  assert loud[-1] == quiet[0]   # the same one line closes it


# transformers prints "PyTorch was not found" only where torch is absent: hide it.
_HIDE_TORCH = textwrap.dedent("""
    import importlib.util, sys
    _find = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a, **k: None if name == "torch" else _find(name, *a, **k)
    """)


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
  env = {k: v for k, v in cli_env().items() if k != "JAX_PLATFORMS"}   # as a user's shell
  return subprocess.run([sys.executable, "-c", _HIDE_TORCH + code], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)


def test_commands_print_no_libtpu_or_transformers_startup_noise(tmp_path):
  control = _python("import transformers, jax; jax.devices()", tmp_path)
  seen = [n for n in NOISE if n in control.stderr]
  if not seen:
    pytest.skip("neither libtpu's nor transformers' start-up message shows in this environment")
  # A cheap command that starts JAX and loads transformers (the toy tokenizer), then
  # stops at the data path, before compiling anything.
  run = _python(textwrap.dedent(f"""
      from jaxalign import cli
      sys.exit(cli.main(["train", "--config={RECIPES}", "--workdir={tmp_path / 'run'}",
                         "--config.data.train_path={tmp_path / 'missing.jsonl'}"]))
      """), tmp_path)
  assert run.returncode == 2, run.stderr
  lines = [line for line in run.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(
      "jaxalign train: error: config.data.train_path: "), (seen, run.stderr)


def test_ctrl_c_during_a_run_saves_a_checkpoint_and_exits_130(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      cli_command(f"--config={RECIPES}", f"--workdir={workdir}", "--noprogress",
                  "--config.total_steps=100000", "--config.checkpoint.every=100000"),
      env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: logged_rows(workdir) >= 2, proc, "2 logged steps")
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=HANG_S)
  assert proc.returncode == 130, err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
  steps = complete_steps(workdir)
  assert len(steps) == 1 and 2 <= steps[0] < 100000, (steps, err)
  assert f"stopped by SIGINT at step {steps[0]}; checkpoint saved in {workdir}" in err, err


def _interrupts(monkeypatch, wait=None, in_save=False):
  """A Preemption in this (main) thread whose os._exit raises SystemExit instead."""
  from jaxalign.train import signals

  def fake_exit(code):
    raise SystemExit(code)

  monkeypatch.setattr(signals.os, "_exit", fake_exit)
  preempt = signals.Preemption()
  preempt.wait_for_writes = wait
  preempt.in_save = in_save
  return preempt


def test_second_ctrl_c_waits_for_the_write_in_flight_then_exits_130(monkeypatch, capsys):
  waited = []
  with _interrupts(monkeypatch, wait=lambda: waited.append(True)) as preempt:
    signal.raise_signal(signal.SIGINT)
    assert preempt.requested and preempt.signal_name == "SIGINT" and not waited
    with pytest.raises(SystemExit) as exit_info:
      signal.raise_signal(signal.SIGINT)
  assert exit_info.value.code == 130 and waited == [True]
  err = capsys.readouterr().err
  assert "waiting for the checkpoint write in flight" in err
  assert "discarded" not in err and "rerun to resume" in err


def test_third_ctrl_c_during_the_wait_leaves_without_it(monkeypatch, capsys):
  def wait():   # a third Ctrl-C arrives while the write is still in flight
    signal.raise_signal(signal.SIGINT)
    raise AssertionError("the third interrupt should have exited")

  with _interrupts(monkeypatch, wait=wait):
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
      signal.raise_signal(signal.SIGINT)
  assert exit_info.value.code == 130
  err = capsys.readouterr().err
  assert "an unfinished checkpoint write is discarded" in err


def test_second_ctrl_c_inside_a_save_call_does_not_wait(monkeypatch, capsys):
  waited = []
  with _interrupts(monkeypatch, wait=lambda: waited.append(True), in_save=True):
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
      signal.raise_signal(signal.SIGINT)
  assert exit_info.value.code == 130 and not waited
  assert "discarded" in capsys.readouterr().err


def test_two_quick_ctrl_c_during_checkpoint_writes_leave_no_torn_step(tmp_path):
  """A checkpoint every step, two SIGINTs back to back: exit 130 without a traceback,
  and every step Orbax lists restores (an interrupted write is never listed)."""
  import jax
  import ml_collections
  import numpy as np
  from jaxalign import checkpoint as ckpt
  from jaxalign.train import build as build_lib, rundir

  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      cli_command(f"--config={RECIPES}", f"--workdir={workdir}", "--noprogress",
                  "--config.total_steps=100000", "--config.checkpoint.every=1",
                  "--config.checkpoint.keep=100000"),
      env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: logged_rows(workdir) >= 3, proc, "3 logged steps")
  # Ctrl-C, then again every 10 ms until the process is gone: two signals that land while
  # the main thread is inside one C call reach Python's handler once, so a single
  # second Ctrl-C may count as the first.
  proc.send_signal(signal.SIGINT)
  while proc.poll() is None:
    time.sleep(0.01)
    try:
      proc.send_signal(signal.SIGINT)
    except ProcessLookupError:
      break
  _, err = proc.communicate(timeout=HANG_S)
  assert proc.returncode == 130, err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
  assert "interrupted: exiting now" in err, err
  steps = complete_steps(workdir)
  assert steps, err
  config = ml_collections.ConfigDict(rundir.resolved_config(str(workdir)))
  built = build_lib.build_config(config)
  abstract_state = built.abstract_state
  with jax.set_mesh(built.mesh):
    for step in steps:   # every listed step is whole: its parameters read back
      params = ckpt.restore_params(str(workdir / "checkpoints"), abstract_state.params, step=step)
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step
