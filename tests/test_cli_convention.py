"""One command-line convention, through the installed `jaxalign` entry point: --help on
every command, underscores with dashes accepted, one progress switch, --print_config,
and `plan --devices cpu:N` as the README writes it."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from jaxalign import cli_support

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
CONFIG = str(pathlib.Path(__file__).resolve().parent / "train" / "tiny_cli_config.py")
ENTRY = shutil.which("jaxalign", path=os.path.dirname(sys.executable))
COMMANDS = ("train", "prepare", "plan", "export", "generate", "generate-candidates", "demo")


def _jaxalign(*args, env=None, cwd=None, timeout=300):
  assert ENTRY, "the jaxalign entry point is not installed next to this python"
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, **(env or {})}
  return subprocess.run([ENTRY, *args], env=env, cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command):
  proc = _jaxalign(command, "--help")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"usage: jaxalign {command}"), proc.stdout[:200]
  assert "underscores" in proc.stdout   # the flag convention is stated
  assert proc.stderr == ""


def test_short_help_and_help_command():
  short, word = _jaxalign("train", "-h"), _jaxalign("help", "train")
  assert short.returncode == word.returncode == 0
  assert short.stdout == word.stdout and "--stop_after_steps" in short.stdout
  assert "--config.KEY=VALUE" in short.stdout   # where the config keys are


def test_one_spelling_for_every_flag():
  assert cli_support.normalize_flags(
      ["--max-new-tokens=3", "--top-k", "5", "--config.data.train_path=a-b.jsonl",
       "--config=configs/x-y.py", "--stop-after-steps=2"]) == [
      "--max_new_tokens=3", "--top_k", "5", "--config.data.train_path=a-b.jsonl",
      "--config=configs/x-y.py", "--stop_after_steps=2"]
  for off in ("--no-progress", "--no_progress", "--noprogress", "--progress=false"):
    assert cli_support.normalize_flags([off]) == ["--progress=false"]


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path):
  proc = _jaxalign("train", f"--config={CONFIG}", "--print-config", "--config.optim.lr=0.25",
                   "--no-progress", env={"JAX_PLATFORMS": "cpu"}, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert "config.optim.lr = 0.25" in lines
  assert any(line.startswith("config.model.") for line in lines)
  assert any(line.startswith("config.loss.name = ") for line in lines)
  assert not any(tmp_path.iterdir())   # no workdir, nothing written


def test_plan_devices_cpu_n_without_xla_flags():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  proc = subprocess.run([ENTRY, "plan", f"--config={CONFIG}", "--devices=cpu:2",
                         "--config.mesh.shape=(1,-1,1)", "--config.data.batch_size=2"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "cpu:2" in proc.stdout and "fits" in proc.stdout
