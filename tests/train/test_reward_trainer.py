"""A reward-model loss trains in the one loop: kill -9 and resume is bit-identical, SIGTERM
saves a checkpoint and exits 0, held-out eval runs during training, and the finished run
writes WORKDIR/reward_model and rm_eval.json (train/reward.py).

The subprocess runs are driven by the run's own progress (checkpoints committed,
metrics rows logged), never by a wall-clock deadline; the timeouts only bound a hung run.
"""

import json
import os
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import config as config_lib
from jaxalign.rewards import model as reward_model
from jaxalign.train import reward
from jaxalign.workflows import run
from tests.reliability.helpers import (assert_bit_identical, cli_command, cli_env,
                                       compile_events, complete_steps, params, run_cli)
from tests.train import tiny_reward_config
from tests.train.helpers import read_metrics

CONFIG = str(pathlib.Path(__file__).resolve().parent / "tiny_reward_config.py")
TOTAL_STEPS = 8
# A checkpoint every step, so a kill always has one to resume from; eval every 4 steps.
OVERRIDES = {"total_steps": TOTAL_STEPS, "checkpoint.every": 1, "log_every": 1,
             "eval_every": 4}
HANG_S = 300   # only bounds a hung subprocess


def _config(**overrides):
  return config_lib.apply_overrides(tiny_reward_config.get_config(), overrides)


def _logged(workdir) -> int:
  path = workdir / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


def _start(workdir, log, overrides):
  args = [f"--config={CONFIG}", f"--workdir={workdir}", "--noprogress"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  return subprocess.Popen(cli_command(*args), env=cli_env(), stdout=log, stderr=log)


def _saved_steps(workdir) -> list[int]:
  """Complete checkpoint steps (an in-flight write has a temporary name until committed)."""
  directory = workdir / "checkpoints"
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if directory.exists() else []


def _wait_until(condition, proc, what: str) -> None:
  """Polls the run's progress until `condition()`; fails if the run ends first."""
  deadline = time.monotonic() + HANG_S
  while not condition():
    assert proc.poll() is None, f"the run ended before {what}"
    assert time.monotonic() < deadline, f"hung before {what}"
    time.sleep(0.01)


def _head(workdir) -> dict:
  model = reward_model.load_reward_model(str(workdir / reward.OUTPUT_DIR))
  return {"head": np.asarray(model.head[...]), "bias": np.asarray(model.bias[...])}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight") / "run"
  result = run.train(_config(**OVERRIDES), str(workdir), progress=False)
  return workdir, result


def test_an_uninterrupted_run_evaluates_and_exports(straight_run):
  workdir, result = straight_run
  assert result.final_step == TOTAL_STEPS
  rows = read_metrics(workdir)
  # Held-out eval during training (eval_every) and at the end, as for every loss.
  assert [r["step"] for r in rows if "eval/loss" in r] == [4, 8]
  assert all(np.isfinite(r["loss"]) and "grad_norm" in r for r in rows if "loss" in r)
  assert complete_steps(workdir)[-1] == TOTAL_STEPS
  saved = json.loads((workdir / reward.EVAL_FILE).read_text())
  assert saved["pairs"] == 16 and 0.0 <= saved["accuracy"] <= 1.0
  assert result.last_metrics["eval/accuracy"] == saved["accuracy"]
  # The exported model is the last checkpoint's.
  model = reward_model.load_reward_model(str(workdir / reward.OUTPUT_DIR))
  assert_bit_identical([np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))],
                       params(workdir, _config(**OVERRIDES)))


def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path, straight_run):
  straight, _ = straight_run
  workdir = tmp_path / "run"
  resumed_from = []
  with open(tmp_path / "log.txt", "wb") as log:
    for step in (2, 5):   # kill once this step's checkpoint is committed, mid-run
      proc = _start(workdir, log, OVERRIDES)
      _wait_until(lambda: step in _saved_steps(workdir), proc, f"checkpoint {step}")
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
      assert proc.returncode == -signal.SIGKILL
      resumed_from.append(_saved_steps(workdir)[-1])
    final = subprocess.run(
        cli_command(f"--config={CONFIG}", f"--workdir={workdir}", "--noprogress",
                    *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]),
        env=cli_env(), stdout=log, stderr=log, timeout=HANG_S)
  text = (tmp_path / "log.txt").read_text(errors="replace")
  assert final.returncode == 0, text[-3000:]
  # Each kill left a committed checkpoint mid-run for the restart to resume from.
  assert 2 <= resumed_from[0] < TOTAL_STEPS and 5 <= resumed_from[1] < TOTAL_STEPS, resumed_from

  cfg = _config(**OVERRIDES)
  assert complete_steps(workdir)[-1] == TOTAL_STEPS
  assert_bit_identical(params(workdir, cfg), params(straight, cfg))
  want, got = _head(straight), _head(workdir)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  # Every step's loss matches too (steps re-run after a kill log twice).
  losses = {m["step"]: m["loss"] for m in read_metrics(straight) if "loss" in m}
  for m in read_metrics(workdir):
    if "loss" in m:
      assert m["loss"] == losses[m["step"]], m["step"]
  assert (json.loads((workdir / reward.EVAL_FILE).read_text())
          == json.loads((straight / reward.EVAL_FILE).read_text()))


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
  workdir = tmp_path / "run"
  overrides = {"total_steps": 100000, "checkpoint.every": 100000, "log_every": 1}
  cmd = cli_command(f"--config={CONFIG}", f"--workdir={workdir}", "--noprogress",
                    *[f"--config.{k}={v}" for k, v in overrides.items()])
  proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  _wait_until(lambda: _logged(workdir) >= 3, proc, "3 metrics rows")
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=HANG_S)
  assert proc.returncode == 0, err   # docs/reliability.md: SIGTERM exits 0
  assert "stopped by SIGTERM" in err
  steps = [int(s) for s in os.listdir(workdir / "checkpoints")]
  assert len(steps) == 1 and 3 <= steps[0] < 100000, (steps, err)
  # Stopped short of total_steps: nothing exported yet (the resumed run exports).
  assert not (workdir / reward.OUTPUT_DIR).exists()


def test_lora_is_refused_in_validation_naming_the_key(tmp_path, capsys):
  # Adapters would leave the scalar head frozen: exit 2, one line, nothing compiled.
  with compile_events() as events:
    status, err = run_cli(capsys, f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}",
                          "--config.lora.rank=2")
  assert status == 2 and len(err) == 1 and "config.lora.rank" in err[0], err
  assert not events and not (tmp_path / "run").exists()


def test_gradient_accumulation_trains_and_exports(tmp_path):
  config = _config(**{"total_steps": 1, "optim.grad_accum_steps": 2, "data.batch_size": 16,
                      "data.eval_path": ""})
  result = run.train(config, str(tmp_path / "run"), progress=False)
  assert result.final_step == 1 and np.isfinite(result.last_metrics["loss"])
  assert (tmp_path / "run" / reward.OUTPUT_DIR / reward_model.CONFIG_FILE).exists()
  assert not (tmp_path / "run" / reward.EVAL_FILE).exists()
