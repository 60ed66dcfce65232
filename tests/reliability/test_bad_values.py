"""Values that fail before compiling: exit 2, one stderr line naming the key, no workdir.

NaN/inf anywhere, each loss's declared hyperparameter ranges, optimizer ranges,
divergence thresholds, recipe files that do not parse or raise, unknown model fields.
"""

import pathlib

import pytest

from jaxalign import guards, losses
from tests.reliability.helpers import (REPO_ROOT, TINY_CLI_CONFIG, compile_events, recipe_arg,
                                      run_cli)

RECIPE_DIR = pathlib.Path(REPO_ROOT) / "configs"


@pytest.mark.parametrize("override, expected", [
    # NaN and infinities, in any float
    ("--config.optim.lr=nan", "config.optim.lr: must be a finite number, got nan"),
    ("--config.optim.lr=inf", "config.optim.lr: must be a finite number, got inf"),
    ("--config.loss.hparams.beta=-inf", "config.loss.hparams.beta: must be a finite number"),
    ("--config.optim.eps=nan", "config.optim.eps: must be a finite number"),
    # the loss's declared ranges
    ("--config.loss.hparams.beta=0.0", "config.loss.hparams.beta: must be in (0, inf) for 'dpo'"),
    ("--config.loss.hparams.beta=-0.1", "config.loss.hparams.beta: must be in (0, inf)"),
    ("--config.loss.hparams.label_smoothing=0.5",
     "config.loss.hparams.label_smoothing: must be in [0, 0.5) for 'dpo', got 0.5"),
    ("--config.loss.hparams.label_smoothing=-0.1", "config.loss.hparams.label_smoothing"),
    # optimizer ranges
    ("--config.optim.b1=1.0", "config.optim.b1: must be in [0, 1)"),
    ("--config.optim.b2=-0.5", "config.optim.b2: must be in [0, 1)"),
    ("--config.optim.weight_decay=-0.01", "config.optim.weight_decay: must be in [0, inf)"),
    ("--config.optim.warmup_steps=-1", "config.optim.warmup_steps: must be an int >= 0"),
    ("--config.optim.clip_norm=-1.0", "config.optim.clip_norm: must be in [0, inf) "
     "(global-norm clipping threshold; 0 turns clipping off)"),
    ("--config.optim.eps=0.0", "config.optim.eps: must be in (0, inf)"),
    ("--config.optim.min_lr_ratio=1.5", "config.optim.min_lr_ratio"),
    # divergence thresholds
    ("--config.divergence.loss_spike=0.0", "config.divergence.loss_spike: must be > 0"),
    ("--config.divergence.grad_norm_spike=1.0", "config.divergence.grad_norm_spike: must be > 1"),
    ("--config.divergence.min_history=50", "config.divergence.min_history: must be <="),
    ("--config.divergence.window=0", "config.divergence.window: must be an int >= 1"),
    # a model field no ModelConfig has, given the documented override form
    ("--config.model.overrides.dtpye=bfloat16",
     "--config.model.overrides.dtpye: unknown config key 'dtpye'; Did you mean \"dtype\""),
    ("--config.model.overrides.n_layers=two", "--config.model.overrides.n_layers: cannot parse"),
    ("--config.model.overrides.dtype=float8", "config.model.overrides.dtype: unsupported dtype"),
])
def test_bad_value_exits_2_with_one_line_compiles_and_writes_nothing(tmp_path, capsys,
                                                                     override, expected):
  workdir = tmp_path / "run"
  with compile_events() as events:
    status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                          "--noprogress", override)
  assert status == 2, err
  assert len(err) == 1 and err[0].startswith("jaxalign train: error: "), err
  assert expected in err[0], err[0]
  assert not events, f"compiled before failing: {events}"
  assert not workdir.exists()


@pytest.mark.parametrize("overrides, expected", [
    # the new losses' declared ranges
    (["--config.loss.name=simpo", "--config.loss.hparams.beta=0.0"],
     "config.loss.hparams.beta: must be in (0, inf) for 'simpo'"),
    (["--config.loss.name=cpo", "--config.loss.hparams.label_smoothing=0.5"],
     "config.loss.hparams.label_smoothing: must be in [0, 0.5) for 'cpo'"),
])
def test_new_pairwise_loss_settings_exit_2_before_compiling(tmp_path, capsys, overrides,
                                                            expected):
  workdir = tmp_path / "run"
  with compile_events() as events:
    status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                          "--noprogress", *overrides)
  assert status == 2, err
  assert len(err) == 1 and expected in err[0], err
  assert not events, f"compiled before failing: {events}"
  assert not workdir.exists()


@pytest.mark.parametrize("loss, hparams, expected", [
    ("dpo", dict(variant="exo_pair"),
     "config.loss.hparams.label_smoothing: variant 'exo_pair' needs label_smoothing > 0"),
    ("dpo", dict(variant="sppo"), "config.loss.hparams.variant: unknown DPO variant 'sppo'"),
    ("dpo", dict(variant="hinge", label_smoothing=0.1),
     "config.loss.hparams.label_smoothing: label_smoothing=0.1 has no effect"),
    ("dpo", dict(variant="aot", use_weighting=True),
     "config.loss.hparams.use_weighting: use_weighting (WPO) does not apply to 'aot'"),
    ("dpo", dict(discopop_tau=0.0), "config.loss.hparams.discopop_tau: must be in (0, inf)"),
    ("bco_pair", dict(beta=-1.0), "config.loss.hparams.beta: must be in (0, inf) for 'bco_pair'"),
    ("orpo", dict(beta=-0.1), "config.loss.hparams.beta: must be in [0, inf) for 'orpo'"),
    ("orpo", dict(nll_tokens="prompt"), "config.loss.hparams.nll_tokens: must be one of "
     "['sequence', 'response']"),
    ("simpo", dict(gamma=-1.0), "config.loss.hparams.gamma: must be in [0, inf) for 'simpo'"),
    ("cpo", dict(cpo_alpha=-1.0), "config.loss.hparams.cpo_alpha: must be in [0, inf)"),
    ("cpo", dict(loss_type="sppo"), "config.loss.hparams.loss_type: must be one of"),
    ("bco_pair", dict(shift_count="pairs"), "config.loss.hparams.shift_count: must be one of "
     "['rewards', 'batch']"),
])
def test_new_pairwise_loss_hparams_fail_at_validation(loss, hparams, expected):
  import ml_collections
  from jaxalign import config as config_lib
  from tests.train.helpers import tiny_config
  cfg = tiny_config()
  cfg.loss.name = loss
  cfg.loss.hparams = ml_collections.ConfigDict(hparams)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg, 8)
  assert expected in str(e.value), str(e.value)


def test_ld_alpha_out_of_range_and_with_a_precomputed_reference_fail_at_validation():
  import ml_collections
  from jaxalign import config as config_lib
  from tests.train.helpers import tiny_config
  cfg = tiny_config()
  cfg.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, ld_alpha=1.5))
  with pytest.raises(config_lib.ConfigError, match=r"loss.hparams.ld_alpha: must be in \[0, 1\]"):
    config_lib.validate(cfg, 8)
  cfg.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, ld_alpha=0.5))
  with pytest.raises(config_lib.ConfigError, match="config.reference.mode: .*ld_alpha"):
    config_lib.validate(cfg, 8)
  cfg.reference.mode = "frozen"
  config_lib.validate(cfg, 8)
  cfg.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, variant=["sigmoid", "sft"],
                                                    loss_weights=[1.0]))
  with pytest.raises(config_lib.ConfigError, match="loss.hparams.loss_weights: .*one weight"):
    config_lib.validate(cfg, 8)


@pytest.mark.parametrize("source, expected", [
    ("def get_config(:\n  pass\n", ":1: SyntaxError: "),
    ("import ml_collections\n\n\ndef get_config():\n  raise ValueError('no such recipe')\n",
     ":5: ValueError: no such recipe"),
    ("def get_config():\n  x = {}\n  return x['model']\n", ":3: KeyError: 'model'"),
    ("import not_a_module_anywhere\n", ":1: ModuleNotFoundError: "),
    ("def get_config():\n  return 1 / 0\n", ":2: ZeroDivisionError: division by zero"),
])
def test_recipe_that_does_not_parse_or_raises_names_file_and_line(tmp_path, capsys, source,
                                                                  expected):
  recipe = tmp_path / "recipe.py"
  recipe.write_text(source)
  status, err = run_cli(capsys, f"--config={recipe}", f"--workdir={tmp_path / 'run'}",
                        "--noprogress")
  assert status == 2, err
  assert len(err) == 1, err
  assert err[0].startswith(f"jaxalign train: error: {recipe}{expected}"), err[0]
  assert not (tmp_path / "run").exists()


def test_every_builtin_loss_declares_ranges_and_they_name_real_hyperparameters():
  for name, spec in losses.LOSSES.items():
    if not spec.hparam_names():
      continue
    assert spec.hparam_bounds, f"{name} declares no hyperparameter ranges"
    for key, interval in spec.hparam_bounds.items():
      assert key in spec.hparam_names(), (name, key)
      guards.parse_interval(interval)


def test_a_user_loss_states_its_own_ranges():
  import dataclasses
  spec = dataclasses.replace(losses.get("sft"), hparam_bounds={"temperature": "(0, 2]"})
  guards.check_loss_hparams("mine", spec, {"temperature": 2.0})
  with pytest.raises(ValueError, match=r"config.loss.hparams.temperature: must be in \(0, 2\]"):
    guards.check_loss_hparams("mine", spec, {"temperature": 2.5})


def _recipes():
  names = []
  for path in sorted(RECIPE_DIR.glob("*.py")):
    if "_toy" in path.stem or "_demo" in path.stem:
      names.append(path.name)
  return names


@pytest.mark.parametrize("recipe", _recipes())
def test_readme_bf16_flag_is_accepted_by_every_toy_and_demo_recipe(recipe, tmp_path, capsys,
                                                                   monkeypatch):
  # Through the CLI's own parsing; the run is stopped right after validation, so it
  # compiles nothing. The flag must reach the model config as bfloat16.
  from jaxalign import config as config_lib
  from jaxalign.workflows import run
  seen = {}

  def stop_after_validation(config, workdir, **kwargs):
    seen["dtype"] = config.model_cfg.dtype   # the CLI passes the resolved RunSpec
    raise config_lib.ConfigError("stopped by the test after validation")

  monkeypatch.setattr(run, "train", stop_after_validation)
  status, err = run_cli(capsys, f"--config={RECIPE_DIR / recipe}{recipe_arg(RECIPE_DIR / recipe, tmp_path)}",
                        f"--workdir={tmp_path / 'run'}", "--noprogress",
                        "--config.model.overrides.dtype=bfloat16")
  assert err == ["jaxalign train: error: stopped by the test after validation"], err
  assert status == 2 and seen["dtype"] == "bfloat16"
