"""OFS-DPO in the trainer: two LoRA modules on one frozen base, their own learning
rates, the role-swap state checkpointed with the run (docs/losses.md, `ofs_dpo`)."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from jaxalign import config as config_lib
from tests.train.helpers import read_metrics, tiny_config, train_loop

LOG2 = float(np.float32(np.log(2.0)))


def _ofs_config(**over):
  c = tiny_config(**{"lora.rank": 4, "lora.alpha": 8.0, "reference.mode": "frozen",
                     "mesh.shape": (1, 1, 1),
                     "total_steps": 6, "checkpoint.every": 3, "optim.warmup_steps": 0,
                     "optim.lr": 1e-3, "optim.schedule": "constant",
                     # One batch of 8 pairs seen every step, and the slow module at
                     # twice the fast LR: it lowers its DPO loss faster, a role swap.
                     "data.train_path": "toy:pairwise?n=8&seed=0",
                     "optim.slow_lr_ratio": 2.0, **over})
  c.loss.name = "ofs_dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, alpha=0.5, swap_interval=2))
  return c


def test_ofs_dpo_swaps_roles_and_resumes_bit_for_bit(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  one = jax.devices()[:1]   # the mesh (1, 1, 1): faster on fake CPU devices
  train_loop(_ofs_config(), straight, progress=False, devices=one)
  # Stopped at step 3, mid role-check interval: the accumulators must survive.
  train_loop(_ofs_config(), resumed, progress=False, stop_after=3, devices=one)
  train_loop(_ofs_config(), resumed, progress=False, devices=one)
  a, b = read_metrics(straight), read_metrics(resumed)
  assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
  # Resume from step 3 (both modules, both optimizers, the OFS state) == straight run.
  for x, y in zip(a, b):
    for key in ("loss", "loss/dpo_fast", "loss/dpo_slow", "role/fast_is_leader",
                "fast/grad_norm", "slow/grad_norm"):
      assert x[key] == y[key], (key, x, y)

  # Step 1: both B = 0, so each module equals the reference and the other module:
  # every DPO term and the regulariser are log 2 (docs/losses.md, `ofs_dpo` invariants 1 and 4).
  first = a[0]
  assert first["loss/dpo_fast"] == first["loss/dpo_slow"] == LOG2
  assert first["loss/fs"] == first["loss/fs_leader"] == first["loss/fs_chaser"] == LOG2
  assert first["role/fast_is_leader"] == 1.0          # the fast module starts as leader
  # Both modules learn, each at its own rate; the regulariser moves off log 2.
  for m in a:
    assert m["fast/grad_norm"] > 0 and m["slow/grad_norm"] > 0
    assert m["lr/slow"] == pytest.approx(2.0 * m["lr/fast"])
  assert a[-1]["loss/fs"] != LOG2
  assert a[-1]["loss/dpo_fast"] != a[-1]["loss/dpo_slow"]

  # The swap rule (interval 2): after steps 2k-1, 2k the module with the lower summed
  # DPO loss leads steps 2k+1, 2k+2; a tie (step 1 has LR 0, so steps 1-2 tie at
  # log 2) keeps the fast module leading.
  leads = [m["role/fast_is_leader"] for m in a]
  assert leads[:2] == [1.0, 1.0]
  for k in (0, 2):
    fast_sum = a[k]["loss/dpo_fast"] + a[k + 1]["loss/dpo_fast"]
    slow_sum = a[k]["loss/dpo_slow"] + a[k + 1]["loss/dpo_slow"]
    assert leads[k + 2] == leads[k + 3] == float(fast_sum <= slow_sum), (k, a)
  assert leads[4] == 0.0          # the slow module (2x LR) overtook: it did swap

  # The checkpoint holds both modules, their optimizers and the OFS state, not the base.
  import orbax.checkpoint as ocp
  saved = ocp.PyTreeCheckpointer().metadata(
      os.path.join(straight, "checkpoints", "6", "state")).item_metadata
  assert set(saved["params"]) == {"fast", "slow"} and saved["frozen"] is None
  assert len(jax.tree.leaves(saved["params"]["fast"])) == 2 * 4      # q, k, v, o: (A, B)
  assert len(jax.tree.leaves(saved["loss_state"])) == 4              # OfsState


def test_ofs_dpo_needs_lora_and_its_hyperparameters():
  c = _ofs_config(**{"lora.rank": 0})
  with pytest.raises(config_lib.ConfigError, match="config.lora.rank"):
    config_lib.validate(c, 1)
  c = _ofs_config()
  del c.loss.hparams["swap_interval"]
  with pytest.raises(config_lib.ConfigError, match="config.loss.hparams.swap_interval"):
    config_lib.validate(c, 1)
  c = _ofs_config(**{"optim.grad_accum_steps": 2, "data.batch_size": 16})
  with pytest.raises(config_lib.ConfigError, match="config.optim.grad_accum_steps"):
    config_lib.validate(c, 1)
