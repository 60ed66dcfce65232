"""train/build.py: `jaxalign plan` lowers the very program `jaxalign train` runs.

The train side is the real host loop: `loop.train` runs up to its first step
(data loaded, reference log-probs precomputed, state initialised), and that
call is lowered with the state and batch the loop passes. The plan side is
`plan.lower_step`, from abstract shapes only. The lowered StableHLO texts must
be identical, for a LoRA recipe and for the OFS-DPO recipe.
"""

import dataclasses
import importlib.util
import pathlib

import jax
import ml_collections
import pytest

from jaxalign import config as config_lib
from jaxalign import plan as plan_lib
from jaxalign.train import build as build_lib
from tests.train.helpers import tiny_config, train_loop

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
TINY_MODEL = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_seq_len=16)


class _FirstStep(Exception):
  pass


def _lowered_by_train(config, workdir, monkeypatch) -> str:
  """The text of the train step as the host loop calls it the first time."""
  seen = {}
  real_build = build_lib.build

  def spy(config, mesh, **kwargs):
    built = real_build(config, mesh, **kwargs)

    def first_step(state, batch):
      seen["text"] = built.step_fn.lower(state, batch).as_text()
      raise _FirstStep

    return dataclasses.replace(built, step_fn=first_step)

  monkeypatch.setattr(build_lib, "build", spy)
  with pytest.raises(_FirstStep):
    train_loop(config, str(workdir), progress=False)
  monkeypatch.setattr(build_lib, "build", real_build)
  return seen["text"]


def _ofs_dpo_recipe():
  spec = importlib.util.spec_from_file_location("ofs_dpo_demo", CONFIG_DIR / "ofs_dpo_demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("unused")
  c.init_from = ""                   # the seed init stands for the demo's SFT model
  c.data.train_path = "toy:pairwise?n=16&seed=0"
  c.model.overrides = ml_collections.ConfigDict(TINY_MODEL)
  c.data.max_length, c.data.max_prompt_length, c.data.batch_size = 12, 8, 8
  return c


def _lora_recipe():
  # Frozen reference: the LoRA step computes it as the base with adapters off.
  return tiny_config(**{"lora.rank": 4, "lora.targets": ("q", "v", "up"),
                        "reference.mode": "frozen", "total_steps": 2})


# Both layouts: model.scan_layers="auto" (the default) unrolls these 1-layer models on
# CPU; True scans them (the layout "auto" gives a TPU/GPU run).
@pytest.mark.parametrize("recipe, scan_layers", [
    (_lora_recipe, "auto"), (_lora_recipe, True), (_ofs_dpo_recipe, "auto"),
], ids=["lora", "lora-scanned", "ofs_dpo"])
def test_plan_lowers_the_step_that_train_runs(recipe, scan_layers, tmp_path, monkeypatch):
  config = recipe()
  config.model.scan_layers = scan_layers
  by_train = _lowered_by_train(config, tmp_path / "run", monkeypatch)
  by_plan = plan_lib.lower_step(config, devices="cpu:8").as_text()
  assert by_plan == by_train
  # The plan is the adapters' step, not a full fine-tune's.
  full = ml_collections.ConfigDict(config.to_dict())
  full.lora.rank = 0
  if config_lib.losses.get(config.loss.name).modules:
    full.loss.name = "dpo"
    full.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1))
  assert plan_lib.lower_step(full, devices="cpu:8").as_text() != by_plan


def test_build_config_builds_the_step_that_plan_lowers():
  """build_config (how tests and benches build a recipe) is the one builder on all
  devices: its step lowers to plan's text; a RunSpec for another device count is refused."""
  config = _lora_recipe()
  built = build_lib.build_config(config)
  assert built.run_spec.num_devices == jax.device_count()
  assert tuple(built.mesh.devices.shape) == built.run_spec.mesh_shape
  batch = plan_lib.abstract_batch(built.run_spec.config, built.batch_sharding)
  with jax.set_mesh(built.mesh):
    text = built.step_fn.lower(built.abstract_state, batch).as_text()
  assert text == plan_lib.lower_step(config, devices="cpu:8").as_text()
  with pytest.raises(ValueError, match="resolved for 8 devices"):
    build_lib.build_config(built.run_spec, jax.devices()[:1])


def test_plan_reports_the_lora_trainable_parameters():
  config = _lora_recipe()
  built = build_lib.build_config(config)
  p = plan_lib.plan(config, devices="cpu:8")
  adapters = sum(a.size for a in jax.tree.leaves(built.abstract_state.params))
  assert p["trainable_params"] == adapters < p["num_params"] / 10
  assert p["lora"] == "rank 4 on q,v,up"
  assert "LoRA rank 4" in plan_lib.format_plan(p)
