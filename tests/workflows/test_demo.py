"""The bundled demo end to end: DPO must beat SFT by >= 10 points (seed 0).

Runs `jaxalign demo` in a subprocess with one CPU device, as a user would:
under the suite's 8 fake devices the same tiny model runs several times slower.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxalign import cli
from jaxalign.workflows import demo


def _demo(workdir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "jaxalign.cli", "demo", f"--workdir={workdir}",
                         "--no-progress"], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.demo   # ~2.5 minutes: CI runs it after the README suite (pyproject addopts)
def test_demo_aligned_beats_sft_by_10_points(tmp_path, capsys):
  workdir = tmp_path / "demo"
  run = _demo(workdir)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "SFT (before)" in run.stdout and "DPO (after)" in run.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["method"] == "dpo"
  assert summary["devices"] == "1 x cpu"
  assert summary["aligned_accuracy"] >= summary["sft_accuracy"] + 0.10, summary
  # A second run into the same directory is refused instead of mixing runs (the CLI
  # in this process: the refusal comes before any model or device work).
  assert cli.main(["demo", f"--workdir={workdir}", "--no-progress"]) == 2
  assert "already holds a dpo demo run" in capsys.readouterr().err


def test_grao_rm_scores_with_the_reward_model_the_demo_trains(tmp_path):
  """The wiring of `--method grao_rm` (no training here): the GRAO stage's reward
  loads the directory the reward-model stage writes, and the reward model's pairs
  put the right answer against the SFT model's own wrong answers."""
  from jaxalign.train import reward as reward_train

  data_dir = str(tmp_path / "data")
  rm_cfg = demo.reward_model_config(data_dir, str(tmp_path / "sft"))
  grao_cfg = demo.aligned_config("grao_rm", str(tmp_path))
  assert rm_cfg.loss.name == "reward_model" and rm_cfg.init_from == str(tmp_path / "sft")
  assert grao_cfg.loss.name == "grao" and grao_cfg.online.enabled
  assert grao_cfg.reward.name == "reward_model"
  assert grao_cfg.reward.options.path == str(tmp_path / "reward_model" / reward_train.OUTPUT_DIR)

  problems = demo.TASK.problems(6, split="train", seed=3)
  wrong = {p.prompt: demo.TASK.wrong_answers(p, 1, np.random.default_rng(0))[0]
           for p in problems}
  def sample(prompts, temperature, seed):   # greedy: right; sampled: wrong
    return [next(p.answer for p in problems if p.prompt == q) if temperature == 0.0 else wrong[q]
            for q in prompts]
  pairs = demo.reward_model_records(problems, sample, seed=0)
  assert len(pairs) == 12
  for pair in pairs:
    assert demo.TASK.is_correct(pair["prompt"], pair["chosen"])
    assert not demo.TASK.is_correct(pair["prompt"], pair["rejected"])
  assert [p["rejected"] for p in pairs[6:]] == [wrong[p.prompt] for p in problems]
