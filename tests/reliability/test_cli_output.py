"""What the command line prints: one line per error unless --verbose/JAXALIGN_DEBUG=1
asks for the traceback; no libtpu or transformers start-up noise; Ctrl-C in a run
is a clean stop with a checkpoint and status 130."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.reliability.helpers import RECIPES, cli_command, cli_env, complete_steps, run_cli

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
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 130, err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
  steps = complete_steps(workdir)
  assert len(steps) == 1 and 2 <= steps[0] < 100000, (steps, err)
  assert f"stopped by SIGINT at step {steps[0]}; checkpoint saved in {workdir}" in err, err
