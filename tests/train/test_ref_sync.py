"""TR-DPO reference sync: the rule inside the real step, resume, config errors."""

import pathlib

import jax
import numpy as np
import pytest

from jaxalign import cli, sharding
from jaxalign.train import rundir
from tests.train.helpers import built_state, random_batch, read_metrics, tiny_config, train_loop

CONFIG = str(pathlib.Path(__file__).resolve().parent / "tiny_cli_config.py")


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_step_mixes_the_reference_every_sync_steps(alpha):
  built, state = built_state(tiny_config(**{
      "mesh.shape": (1, 4, 2), "reference.mode": "frozen", "reference.sync_steps": 2,
      "reference.sync_alpha": alpha, "optim.lr": 1e-2, "optim.warmup_steps": 1,
      "total_steps": 10, "logprob_chunk_size": 16}))
  rng = np.random.default_rng(0)
  with jax.set_mesh(built.mesh):
    ref = _leaves(state.ref_params)
    for k in range(1, 5):
      state, _ = built.step_fn(state, sharding.host_to_global(random_batch(rng),
                                                              built.batch_sharding))
      policy, new_ref = _leaves(state.params), _leaves(state.ref_params)
      if k % 2:   # updates 1 and 3: the reference stays
        expected = ref
      else:       # updates 2 and 4: TRL's ref.mul_(1 - alpha).add_(policy, alpha=alpha)
        expected = [(1 - alpha) * r + alpha * p for r, p in zip(ref, policy)]
      for e, n in zip(expected, new_ref):
        np.testing.assert_allclose(n, e, rtol=1e-6, atol=1e-7)
      if k > 1:   # (update 1 runs at warm-up lr 0) the policy moved off the old reference
        assert any(not np.allclose(p, r) for p, r in zip(policy, ref))
      ref = new_ref
    # Still sharded like the policy.
    assert (state.ref_params["embed"]["embedding"][...].sharding.spec
            == state.params["embed"]["embedding"][...].sharding.spec)


SYNC = {"reference.mode": "frozen", "reference.sync_steps": 2, "reference.sync_alpha": 1.0,
        "optim.lr": 3e-3}


@pytest.mark.parametrize("lora", [False, True])
def test_hard_sync_makes_the_next_loss_log2(tmp_path, lora):
  # After a hard sync at update 3 the reference equals the policy that scores
  # step 4's batch: DPO is exactly log 2 there (and at steps 1 and 2: update 1
  # runs at warm-up learning rate 0), not at steps 3 and 5.
  over = {**SYNC, "total_steps": 5, "reference.sync_steps": 3}
  if lora:
    over.update({"lora.rank": 4, "lora.alpha": 8.0})
  train_loop(tiny_config(**over), str(tmp_path), progress=False)
  losses_ = np.array([m["loss"] for m in read_metrics(tmp_path)])
  np.testing.assert_allclose(losses_[[0, 1, 3]], np.log(2.0), rtol=1e-6)
  assert abs(losses_[2] - np.log(2.0)) > 1e-4 and abs(losses_[4] - np.log(2.0)) > 1e-4


def test_resume_between_syncs_equals_the_uninterrupted_run(tmp_path):
  over = {**SYNC, "reference.sync_alpha": 0.5, "total_steps": 6, "checkpoint.every": 3}
  cfg = tiny_config(**over)
  train_loop(cfg, str(tmp_path / "straight"), progress=False)
  train_loop(cfg, str(tmp_path / "resumed"), progress=False, stop_after=3)   # after sync 1
  train_loop(cfg, str(tmp_path / "resumed"), progress=False)
  train_loop(tiny_config(**{**over, "reference.sync_steps": 0}), str(tmp_path / "nosync"),
             progress=False)
  straight, resumed, nosync = (np.array([m["loss"] for m in read_metrics(tmp_path / d)])
                               for d in ("straight", "resumed", "nosync"))
  np.testing.assert_array_equal(resumed[3:], straight[3:])
  assert not np.allclose(nosync[2:], straight[2:])   # the sync changed the objective
  for name in ("straight", "resumed"):
    assert sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir())[-1] == "6"
  a = rundir.load_run_params(str(tmp_path / "straight"), cfg)[1]
  b = rundir.load_run_params(str(tmp_path / "resumed"), cfg)[1]
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("override, key", [
    (["--config.reference.sync_steps=4"], "config.reference.sync_steps"),   # precompute
    (["--config.reference.sync_steps=4", "--config.reference.mode=frozen",
      "--config.reference.sync_alpha=1.5"], "config.reference.sync_alpha"),
    (["--config.reference.sync_steps=-1"], "config.reference.sync_steps"),
])
def test_bad_sync_config_exits_2_naming_the_key(tmp_path, capsys, override, key):
  status = cli.main(["train", f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}", *override])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and key in err[0], err
  assert not (tmp_path / "run").exists()
  if "mode=frozen" not in " ".join(override) and "=-1" not in override[0]:
    assert "precompute" in err[0]
