"""model.scan_layers="auto": scanned where compile time matters (TPU, GPU, deep models),
unrolled on CPU below transformer.SCAN_MIN_LAYERS_CPU; resolved once into a bool that
the run records, and a checkpoint keeps the layout it was saved in."""

import logging

import jax
import pytest

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign.models import transformer
from jaxalign.train import resume, rundir
from tests.train.helpers import tiny_config, train_loop

DEEP = transformer.SCAN_MIN_LAYERS_CPU


@pytest.mark.parametrize("platform, n_layers, scan", [
    ("cpu", 2, False), ("cpu", DEEP - 1, False), ("cpu", DEEP, True), ("cpu", 2 * DEEP, True),
    ("tpu", 1, True), ("tpu", 2, True), ("gpu", 2, True), ("cuda", 2, True),
])
def test_auto_scans_on_accelerators_and_deep_models_and_unrolls_shallow_cpu_ones(
    platform, n_layers, scan):
  assert transformer.auto_scan_layers(platform, n_layers)[0] is scan
  c = tiny_config(**{"model.overrides.n_layers": n_layers})
  spec = config_lib.resolve(c, 1, platform=platform)
  # One bool everywhere downstream: the ModelConfig and the record saved with checkpoints.
  assert spec.model_cfg.scan_layers is scan
  assert spec.config.model.scan_layers is scan
  assert spec.platform == platform
  layout = "scanned" if scan else "unrolled"
  assert spec.layers_line == (f"model: scan_layers=auto -> {layout} "
                              f"({transformer.auto_scan_layers(platform, n_layers)[1]})")
  assert f"{platform}, {n_layers} layers" in spec.layers_line
  assert c.model.scan_layers == "auto"   # the caller's config is left as it was


@pytest.mark.parametrize("value, scan", [(True, True), (False, False), ("True", True),
                                         ("False", False), ("false", False)])
def test_an_explicit_layout_is_kept_on_any_platform(value, scan):
  # "True"/"False": what --config.model.scan_layers=... gives over the "auto" default.
  c = tiny_config(**{"model.scan_layers": value, "model.overrides.n_layers": 2})
  for platform in ("cpu", "tpu"):
    spec = config_lib.resolve(c, 1, platform=platform)
    assert spec.model_cfg.scan_layers is scan and spec.config.model.scan_layers is scan
    assert spec.layers_auto == ""
    assert spec.layers_line.startswith(f"model: scan_layers={scan} ")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_scan_layers_value_names_the_key(value):
  c = tiny_config(**{"model.scan_layers": value})
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.scan_layers: must be "
                     r"True, False or 'auto'"):
    config_lib.resolve(c, 1)


def test_the_default_is_auto():
  assert config_lib.defaults().model.scan_layers == "auto"
  # The 1-layer tiny preset on this CPU host: unrolled.
  spec = config_lib.resolve(config_lib.defaults(), 1, platform="cpu")
  assert spec.model_cfg.scan_layers is False


def test_a_checkpoint_saved_scanned_keeps_its_layout_under_auto(tmp_path, caplog):
  """A run saved scanned (as on a TPU) resumes with model.scan_layers="auto" on this
  CPU host, where auto alone would unroll: the checkpoint's layout is kept, recorded
  again, read back by load_run_params, and taken by a run that starts from it."""
  first = tiny_config(**{"model.scan_layers": True, "model.overrides.n_layers": 2,
                         "total_steps": 2, "checkpoint.every": 2})
  run = str(tmp_path / "run")
  train_loop(first, run, progress=False)
  auto = tiny_config(**{"model.overrides.n_layers": 2, "total_steps": 3,
                        "checkpoint.every": 3})
  assert config_lib.resolve(auto, jax.device_count()).model_cfg.scan_layers is False
  with caplog.at_level(logging.INFO, logger="jaxalign"):
    result = train_loop(auto, run, progress=False)
  assert result.final_step == 3
  assert ("model: scan_layers=auto -> scanned (the checkpoint's layout, step 2; "
          "cpu, 2 layers < 16 would unroll)") in caplog.messages
  assert rundir.resolved_config(run)["model"]["scan_layers"] is True
  # Read back through a config that says "auto" (as generate/export callers pass it).
  _, params, _ = rundir.load_run_params(run, auto)
  assert {a.shape[0] for a in jax.tree.leaves(params["layers"])} == {2}   # stacked [G=2, ...]
  # A fresh run with init_from = that run keeps its layout too (its own workdir is empty).
  start = tiny_config(**{"model.overrides.n_layers": 2, "init_from": run})
  spec = config_lib.resolve(start, jax.device_count())
  empty = ckpt.Checkpointer(str(tmp_path / "fresh" / "checkpoints"), every=1, keep=1)
  try:
    kept = resume.keep_saved_layout(spec, empty)
  finally:
    empty.close()
  assert kept.model_cfg.scan_layers is True and kept.config.model.scan_layers is True
  assert "config.init_from's layout, step 3" in kept.layers_line
  # An explicit layout is never switched: the resume is refused, naming the key.
  explicit = tiny_config(**{"model.scan_layers": False, "model.overrides.n_layers": 2,
                            "total_steps": 4})
  with pytest.raises(config_lib.ConfigError, match=r"model\.scan_layers True -> False"):
    train_loop(explicit, run, progress=False)
