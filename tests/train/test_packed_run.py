"""data.packing end to end: a packed run's losses and metrics equal the padded run's,
its precomputed reference equals the padded one, and it resumes mid-run."""

import numpy as np
import pytest

from jaxalign import config as config_lib
from tests.train.helpers import read_metrics, tiny_config, train_loop

# Wall-clock figures differ between any two runs; the layout's fill between layouts.
TIMING = ("tokens_per_sec", "perf/model_tflops_per_sec_per_device", "perf/mfu",
          "time/first_step_seconds", "tokens/fill", "tokens/padding_share")


def _assert_metrics_equal(padded, packed):
  assert [m["step"] for m in packed] == [m["step"] for m in padded]
  for a, b in zip(padded, packed):
    # (A resumed invocation's first step, its compile, makes no rate: timing keys differ.)
    assert set(a) - set(TIMING) == set(b) - set(TIMING)
    for k in a:
      # Accuracy is a sign test: while the policy still equals the reference (the
      # learning rate is 0 at step 0, so at steps 1 and 2) its margins are float
      # noise (|margin| ~1e-8), and so is its value.
      noise = k == "rewards/accuracies" and abs(a["rewards/margins"]) < 1e-6
      if k not in TIMING and not noise:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6,
                                   err_msg=f"step {a['step']} {k}")


def _config(**overrides):
  return tiny_config(**{"data.batch_size": 16, "total_steps": 4, "checkpoint.every": 2,
                        **overrides})


def test_packed_run_equals_padded_run_and_resumes(tmp_path):
  train_loop(_config(), str(tmp_path / "padded"), progress=False)
  packed_cfg = _config(**{"data.packing": True, "data.pack_length": 16})
  first = train_loop(packed_cfg, str(tmp_path / "packed"), progress=False, stop_after=2)
  assert first.final_step == 2
  train_loop(packed_cfg, str(tmp_path / "packed"), progress=False)   # resumes at step 2
  padded, packed = read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "packed")
  assert [m["step"] for m in padded] == [1, 2, 3, 4]
  _assert_metrics_equal(padded, packed)
  np.testing.assert_allclose(np.load(tmp_path / "packed" / "ref_logps.npy"),
                             np.load(tmp_path / "padded" / "ref_logps.npy"),
                             rtol=1e-5, atol=1e-5)


def test_packing_keys_are_validated():
  with pytest.raises(config_lib.ConfigError, match="config.data.pack_length"):
    config_lib.validate(_config(**{"data.packing": True, "data.pack_length": 5}), 8)
  config_lib.validate(_config(**{"data.packing": True, "data.share_prompt": True}), 8)
  with pytest.raises(config_lib.ConfigError, match="config.data.pack_buckets"):
    config_lib.validate(_config(**{"data.packing": True, "data.pack_buckets": 0}), 8)
  reward = _config(**{"data.packing": True})
  reward.loss.name, reward.loss.hparams = "reward_model", {}
  with pytest.raises(config_lib.ConfigError, match="config.data.packing"):
    config_lib.validate(reward, 8)


def test_shared_prompt_run_equals_padded_run(tmp_path):
  cfg = lambda **o: _config(**{"total_steps": 2, **o})
  train_loop(cfg(), str(tmp_path / "padded"), progress=False)
  train_loop(cfg(**{"data.share_prompt": True}), str(tmp_path / "shared"), progress=False)
  padded, shared = read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "shared")
  assert len(padded) == len(shared) == 2
  for a, b in zip(padded, shared):
    for k in a:
      if k not in TIMING:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(np.load(tmp_path / "shared" / "ref_logps.npy"),
                             np.load(tmp_path / "padded" / "ref_logps.npy"),
                             rtol=1e-5, atol=1e-5)


def test_packed_shared_lora_run_equals_padded_run(tmp_path):
  """data.packing + data.share_prompt with LoRA adapters: 3 steps and the precomputed
  reference table, in rows of units of one prompt and its responses, equal the
  padded run's. The learning rate is 0 at step 0, so the adapters move from step 3."""
  cfg = lambda **o: _config(**{"total_steps": 3, "lora.rank": 4, "optim.lr": 1e-2,
                               **o})
  train_loop(cfg(), str(tmp_path / "padded"), progress=False)
  train_loop(cfg(**{"data.packing": True, "data.pack_length": 16, "data.share_prompt": True}),
             str(tmp_path / "packed"), progress=False)
  padded, packed = read_metrics(tmp_path / "padded"), read_metrics(tmp_path / "packed")
  assert len(padded) == 3
  _assert_metrics_equal(padded, packed)
  assert abs(padded[2]["rewards/margins"]) > 1e-4   # the adapters moved
  np.testing.assert_allclose(np.load(tmp_path / "packed" / "ref_logps.npy"),
                             np.load(tmp_path / "padded" / "ref_logps.npy"),
                             rtol=1e-5, atol=1e-5)


def test_ld_dpo_and_wpo_runs_equal_padded_run(tmp_path):
  """LD-DPO and WPO together (the step's tail_logps and wpo_logps columns, policy and
  frozen reference): 3 steps packed with shared prompts, the layout that moves every
  column furthest, equal the padded run's. (Packed alone and shared alone: the step
  equalities of tests/data/test_packing.py::test_column_losses_train_step_equals_padded_step.)"""
  cfg = lambda **o: _config(**{"total_steps": 3, "reference.mode": "frozen",
                               "loss.hparams.ld_alpha": 0.5,
                               "loss.hparams.use_weighting": True, **o})
  train_loop(cfg(), str(tmp_path / "padded"), progress=False)
  padded = read_metrics(tmp_path / "padded")
  assert len(padded) == 3 and "wpo/weight_mean" in padded[0]
  packed = {"data.packing": True, "data.pack_length": 16}
  for name, overrides in (("packed_shared", {**packed, "data.share_prompt": True}),):
    train_loop(cfg(**overrides), str(tmp_path / name), progress=False)
    _assert_metrics_equal(padded, read_metrics(tmp_path / name))
