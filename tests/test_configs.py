"""Every shipped recipe loads through the CLI's config machinery and validates."""

import math
import pathlib

import jax
import pytest
from ml_collections import config_flags  # the CLI's loader
from absl import flags

from jaxalign import config as config_lib
from tests.reliability.helpers import recipe_arg

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path, tmp_path):
  fv = flags.FlagValues()
  argv = ["prog", f"--config={path}{recipe_arg(path, tmp_path)}"]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  # A mesh whose fixed sizes need more devices than the test has (the 128k recipe's
  # context 16) is validated for the fewest devices that hold it.
  fixed = math.prod(s for s in fv.config.mesh.shape if s != -1)
  config_lib.validate(fv.config, max(jax.device_count(), fixed))
