"""Run modes are declared by the recipe and dispatched in one place (workflows/run.py)."""

import pytest

from jaxalign import config as config_lib
from jaxalign.train import loop
from tests.train.helpers import tiny_config


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
    loop.train(_recipes()[mode], str(tmp_path), progress=False)
  assert not any(tmp_path.iterdir())   # nothing written
