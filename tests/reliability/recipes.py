"""The tiny test recipe for CLI runs: `recipes.py` (DPO), `recipes.py:ln_dpo`, `recipes.py:grao`."""

import ml_collections

from tests.train.helpers import tiny_config


def get_config(arg: str = "dpo") -> ml_collections.ConfigDict:
  c = tiny_config()
  if arg == "grao":  # the groups format: completions with rewards, no reference model
    c.loss.name = "grao"
    c.loss.hparams = ml_collections.ConfigDict()
    c.data.train_path = "toy:groups?n=64&seed=0&g=2"
  elif arg == "ln_dpo":  # same data format and state as DPO, another objective
    c.loss.name = "ln_dpo"
    c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1))
  elif arg != "dpo":
    raise ValueError(f"unknown recipe {arg!r}")
  return c
