"""The tiny reward-model recipe (tests/train/helpers.py's model and toy pairs), for CLI tests."""

import ml_collections

from tests.train.helpers import tiny_config


def get_config():
  c = tiny_config(**{"data.eval_path": "toy:pairwise?n=16&seed=1"})
  c.loss.name, c.loss.hparams = "reward_model", ml_collections.ConfigDict()
  return c
