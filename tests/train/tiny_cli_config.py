"""The tiny test config as a recipe file, for CLI tests."""

from tests.train.helpers import tiny_config


def get_config():
  return tiny_config()
