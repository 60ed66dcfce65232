"""Reward-model training (the one loop, exported by train/reward.py): its backbone starts
from `init_from`."""

import jax
import numpy as np
from flax import nnx

from jaxalign.rewards import model as reward_model
from jaxalign.train import reward, rundir
from jaxalign.workflows import run
from tests.train.helpers import tiny_config, train_loop


def _leaves(state) -> dict:
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(state)}


def test_the_backbone_is_the_init_from_runs_model(tmp_path):
  sft = tiny_config("sft", total_steps=3, **{"checkpoint.every": 3})
  train_loop(sft, str(tmp_path / "sft"), progress=False)
  _, sft_params, _ = rundir.load_run_params(str(tmp_path / "sft"), sft)

  rm = tiny_config(total_steps=1, init_from=str(tmp_path / "sft"), **{"optim.lr": 1e-12})
  rm.loss.name, rm.loss.hparams = "reward_model", {}
  result = run.train(rm, str(tmp_path / "rm"), progress=False)
  assert result.final_step == 1 and np.isfinite(result.last_metrics["loss"])
  model = reward_model.load_reward_model(str(tmp_path / "rm" / reward.OUTPUT_DIR))
  got, want = _leaves(nnx.state(model.backbone, nnx.Param)), _leaves(sft_params)
  assert got.keys() == want.keys()
  for k in want:   # one step at lr 1e-12 moves nothing measurable
    np.testing.assert_allclose(got[k], want[k], atol=1e-8, err_msg=k)
  # ...and it is not the seed's own init: the restore did something.
  fresh = _leaves(nnx.state(reward_model.RewardModel(model.config, rngs=nnx.Rngs(rm.seed)).backbone,
                            nnx.Param))
  assert any(not np.allclose(fresh[k], want[k]) for k in want)
