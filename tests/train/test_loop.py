"""The sharded train loop end to end: mesh invariance, accumulation, references, resume."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxalign import checkpoint as ckpt
from jaxalign import errors
from jaxalign.train import rundir
from tests.train.helpers import read_metrics, tiny_config, train_loop

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[2])

MESHES = [(8, 1, 1), (1, 4, 2), (2, 2, 2)]


def _losses(workdir):
  return np.array([m["loss"] for m in read_metrics(workdir)])


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  train_loop(tiny_config(), str(tmp_path / "full"), progress=False)
  train_loop(tiny_config(**{"optim.grad_accum_steps": 2, "mesh.shape": (1, 4, 2)}),
             str(tmp_path / "accum"), progress=False)
  np.testing.assert_allclose(_losses(tmp_path / "accum"), _losses(tmp_path / "full"),
                             rtol=1e-5, atol=1e-6)
  full, accum = read_metrics(tmp_path / "full")[-1], read_metrics(tmp_path / "accum")[-1]
  for key in ("rewards/accuracies", "rewards/margins", "grad_norm", "tokens/real"):
    np.testing.assert_allclose(accum[key], full[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_precomputed_and_frozen_references_agree(tmp_path):
  train_loop(tiny_config(**{"reference.mode": "precompute"}), str(tmp_path / "pre"),
             progress=False)
  train_loop(tiny_config(**{"reference.mode": "frozen"}), str(tmp_path / "frozen"),
             progress=False)
  assert (tmp_path / "pre" / "ref_logps.npy").exists()
  assert not (tmp_path / "frozen" / "ref_logps.npy").exists()
  first = read_metrics(tmp_path / "pre")[0]
  # Step 1 starts at policy == reference: DPO is exactly log 2 there.
  np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(_losses(tmp_path / "frozen"), _losses(tmp_path / "pre"),
                             rtol=1e-5, atol=1e-6)


def test_sft_loss_goes_down_and_checkpoints_exist(tmp_path):
  cfg = tiny_config("sft", total_steps=30, log_every=5, **{"optim.lr": 3e-3,
                                                           "checkpoint.every": 10})
  result = train_loop(cfg, str(tmp_path), progress=False)
  losses = _losses(tmp_path)
  assert result.final_step == 30
  assert losses[-1] < 0.8 * losses[0]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "30"]  # keep=2
  assert (tmp_path / "tensorboard").is_dir()
  assert all("step" in m for m in read_metrics(tmp_path))


def _params(workdir, cfg):
  _, params, _ = rundir.load_run_params(str(workdir), cfg)
  return jax.tree.leaves(jax.device_get(params))


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
  cfg = tiny_config(total_steps=10, **{"checkpoint.every": 5})
  train_loop(cfg, str(tmp_path / "straight"), progress=False)

  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(
      "from tests.train.helpers import tiny_config\n"
      "def get_config():\n"
      "  return tiny_config(total_steps=10, **{'checkpoint.every': 5})\n")
  cmd = [sys.executable, "-m", "jaxalign.cli", "train", f"--config={cfg_file}",
         f"--workdir={tmp_path / 'resumed'}", "--no-progress"]   # dashes are accepted
  env = {**os.environ, "PYTHONPATH": REPO_ROOT}
  first = subprocess.run(cmd + ["--stop-after-steps=5"], env=env, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["5"]
  # An early stop says so, and how to go on; the resolved config is readable in the workdir.
  assert "stopped after --stop_after_steps=5 at step 5 of 10" in first.stderr, first.stderr
  assert "run the same command again to continue" in first.stderr
  assert "done:" not in first.stdout
  # No bar: one plain line per logged step (TRL prints a dict per logging step).
  assert "step 5/10 | loss " in first.stdout, first.stdout
  # The start summary, the compile lines and the end summary (also as a JSON file).
  for line in ("jaxalign: model: preset tiny", "jaxalign: mesh: ", "jaxalign: data: ",
               "jaxalign: objective: loss dpo, reference precompute; steps 0 -> 5 of 10",
               "jaxalign: compiling the train step", "jaxalign: first step compiled",
               "jaxalign: ran steps 0-5 in "):
    assert line in first.stderr, (line, first.stderr)
  # TRL's epoch and cumulative num_tokens, carried over the resume below.
  rows = read_metrics(tmp_path / "resumed")
  assert [r["epoch"] for r in rows] == pytest.approx([s * 8 / 64 for s in range(1, 6)])
  assert all(a["num_tokens"] < b["num_tokens"] for a, b in zip(rows, rows[1:]))
  summary = json.loads((tmp_path / "resumed" / "run_summary.json").read_text())
  assert summary["steps"] == 5 and summary["stopped_by"] == "stop_after_steps"
  assert summary["samples_per_sec"] > 0 and summary["real_tokens"] > 0
  assert summary["train_loss_mean"] == pytest.approx(
      np.mean([r["loss"] for r in read_metrics(tmp_path / "resumed")]), rel=1e-6)
  resolved = json.loads((tmp_path / "resumed" / "resolved_config.json").read_text())
  assert resolved["total_steps"] == 10 and resolved["checkpoint"]["every"] == 5
  second = subprocess.run(cmd, env=env, capture_output=True, text=True)
  assert second.returncode == 0, second.stderr
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["10", "5"]
  assert "resumed from step 5" in second.stderr   # shown by default
  assert "done: step 10" in second.stdout
  rows = read_metrics(tmp_path / "resumed")
  assert [r["step"] for r in rows] == list(range(1, 11))
  assert all(a["num_tokens"] < b["num_tokens"] for a, b in zip(rows, rows[1:]))
  straight_rows = read_metrics(tmp_path / "straight")
  assert rows[-1]["num_tokens"] == straight_rows[-1]["num_tokens"]   # same data, same count

  straight, resumed = _params(tmp_path / "straight", cfg), _params(tmp_path / "resumed", cfg)
  assert len(straight) == len(resumed) > 0
  for a, b in zip(straight, resumed):
    np.testing.assert_array_equal(a, b)
  # The data order continued too: same per-step losses after the restart.
  np.testing.assert_array_equal(_losses(tmp_path / "resumed")[5:], _losses(tmp_path / "straight")[5:])


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # lr=1e30 overflows the parameters within a few steps.
  cfg = tiny_config(total_steps=6, **{"optim.lr": 1e30, "optim.clip_norm": 0.0,
                                      "optim.warmup_steps": 1, "checkpoint.every": 1})
  with pytest.raises(errors.NonFiniteError, match=r"last good checkpoint: step (\d+)") as info:
    train_loop(cfg, str(tmp_path), progress=False)
  checkpointer = ckpt.Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=2)
  latest = checkpointer.latest_step()
  checkpointer.close()
  assert latest is not None and latest < 6
  assert f"last good checkpoint: step {latest} " in str(info.value)
  assert all(np.isfinite(x).all() for x in _params(tmp_path, cfg))


def test_skip_nonfinite_counts_and_does_not_update(tmp_path):
  cfg = tiny_config(total_steps=4, skip_nonfinite=True,
                    **{"optim.lr": 1e30, "optim.clip_norm": 0.0, "optim.warmup_steps": 1})
  result = train_loop(cfg, str(tmp_path), progress=False)
  assert result.final_step == 4
  assert result.last_metrics["nonfinite_steps"] >= 1


def test_bf16_compute_keeps_float32_master_weights(tmp_path):
  cfg = tiny_config(**{"model.overrides.dtype": "bfloat16"})
  result = train_loop(cfg, str(tmp_path), progress=False)
  assert np.isfinite(result.last_metrics["loss"])
  leaves = _params(tmp_path, cfg)
  assert leaves and all(x.dtype == np.float32 for x in leaves)
