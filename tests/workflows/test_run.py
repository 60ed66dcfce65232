"""Run modes are declared by the recipe and dispatched in one place (workflows/run.py)."""

import dataclasses
import pathlib

import jax
import ml_collections
import pytest

from jaxalign import cli
from jaxalign import config as config_lib
from jaxalign.train import loop
from jaxalign.workflows import run
from tests.train.helpers import tiny_config

CLI_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "train" / "tiny_cli_config.py")


def _recipes():
  iterative = tiny_config()
  iterative.iterative.rounds = 2
  continual = tiny_config()
  continual.data.domains = ("toy:pairwise?n=16&seed=0", "toy:pairwise?n=16&seed=1")
  reward = tiny_config()
  reward.loss.name = "reward_model"
  return {"run": tiny_config(), "iterative": iterative, "continual": continual,
          "reward_model": reward}


@pytest.mark.parametrize("mode", ["run", "iterative", "continual", "reward_model"])
def test_the_recipe_declares_its_mode(mode):
  assert config_lib.run_mode(_recipes()[mode]) == mode


@pytest.mark.parametrize("mode", ["iterative", "continual", "reward_model"])
def test_the_single_run_loop_refuses_another_mode_rather_than_running_one_plain_run(
    mode, tmp_path):
  with pytest.raises(ValueError, match=f"a {mode} recipe trains through "
                                       r"jaxalign\.workflows\.run\.train"):
    # A spec of that mode (the recipes above are not all runnable: only their mode matters).
    spec = dataclasses.replace(config_lib.resolve(tiny_config(), jax.device_count()), mode=mode)
    loop.train(spec, str(tmp_path), progress=False)
  assert not any(tmp_path.iterdir())   # nothing written


def _count_resolution(monkeypatch) -> dict:
  """Counts config_lib.validate calls and ModelConfigs computed from a plain config
  (model_config of a RunSpec returns the resolved one and is not counted)."""
  counts = {"validate": 0, "model_config": 0}
  real_validate, real_model_config = config_lib.validate, config_lib.model_config

  def validate(*args, **kwargs):
    counts["validate"] += 1
    return real_validate(*args, **kwargs)

  def model_config(c, **kwargs):
    if not isinstance(c, config_lib.RunSpec):
      counts["model_config"] += 1
    return real_model_config(c, **kwargs)

  monkeypatch.setattr(config_lib, "validate", validate)
  monkeypatch.setattr(config_lib, "model_config", model_config)
  return counts


def test_the_cli_validates_once_and_computes_the_model_config_once(tmp_path, capsys,
                                                                  monkeypatch):
  # LoRA on: the base (rundir.lora_base) and the build both read the resolved spec.
  counts = _count_resolution(monkeypatch)
  status = cli.main(["train", f"--config={CLI_CONFIG}", f"--workdir={tmp_path / 'run'}",
                     "--noprogress", "--config.total_steps=2", "--config.lora.rank=2",
                     "--config.checkpoint.every=2"])
  assert status == 0, capsys.readouterr().err
  assert counts == {"validate": 1, "model_config": 1}


def test_a_resolved_spec_is_not_validated_again_along_the_run(tmp_path, monkeypatch):
  spec = config_lib.resolve(tiny_config(**{"total_steps": 2, "checkpoint.every": 2}),
                            jax.device_count())
  counts = _count_resolution(monkeypatch)
  result = run.train(spec, str(tmp_path / "run"), progress=False)
  assert result.final_step == 2
  assert counts == {"validate": 0, "model_config": 0}


def test_continual_stages_are_each_resolved_once(tmp_path, monkeypatch):
  c = tiny_config(**{"lora.rank": 2, "total_steps": 1, "checkpoint.every": 1,
                     "mesh.shape": (1, 1, 1)})
  c.data.domains = ("toy:pairwise?n=16&seed=0&ops=+", "toy:pairwise?n=16&seed=1&ops=-")
  counts = _count_resolution(monkeypatch)
  result = run.train(c, str(tmp_path / "continual"), progress=False,
                     devices=jax.devices()[:1])
  assert result.final_step == 1
  # The continual config once, then each stage's own config once.
  assert counts == {"validate": 3, "model_config": 3}


def test_the_spec_is_frozen_and_holds_what_was_resolved():
  c = tiny_config(**{"lora.rank": 2, "reference.mode": "frozen", "mesh.shape": (1, -1, 1)})
  spec = config_lib.resolve(c, 8)
  with pytest.raises(AttributeError, match="immutable"):
    spec.config.optim.lr = 1.0
  with pytest.raises(AttributeError, match="immutable"):
    spec.config.data.batch_size = 16
  # The record is the config with model.scan_layers="auto" resolved (unrolled: 1 layer, CPU).
  assert c.model.scan_layers == "auto" and spec.config.model.scan_layers is False
  recorded = ml_collections.FrozenConfigDict(c).to_dict()
  recorded["model"]["scan_layers"] = False
  assert spec.config.to_dict() == recorded
  assert spec.model_cfg == config_lib.model_config(c)
  assert spec.mesh_shape == (1, 8, 1, 1) and spec.hf_dir == ""   # (data, fsdp, context, tensor)
  assert spec.mode == "run" and not spec.online and not spec.cofs
  assert spec.frozen_ref and not spec.precompute_ref
  assert spec.lora_cfg.rank == 2 and spec.loss.name == "dpo"
  assert config_lib.resolve(spec, 8) is spec        # a spec passes through unchanged
  with pytest.raises(ValueError, match="resolved for 8 devices, not 4"):
    config_lib.resolve(spec, 4)


def test_every_mode_is_declared_in_the_one_table():
  assert set(config_lib.RUN_MODES) == set(_recipes())
