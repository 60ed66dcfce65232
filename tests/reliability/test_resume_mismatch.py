"""Resume is refused when the checkpoint's objective or model shape differs from the
config; `allow_config_change` lets the objective change, never the shapes."""

import logging
import shutil

import pytest

from jaxalign.train import rundir
from tests.reliability.helpers import RECIPES, complete_steps, run_cli
from tests.train.helpers import tiny_config, train_loop

TOTAL_STEPS = 4


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """A DPO run stopped with a checkpoint at step 2 of 4 (beta 0.1, d_model 32)."""
  workdir = tmp_path_factory.mktemp("resume") / "run"
  cfg = tiny_config(total_steps=TOTAL_STEPS, **{"checkpoint.every": 2})
  train_loop(cfg, str(workdir), progress=False, stop_after=2)
  assert complete_steps(workdir) == [2]
  return workdir


def _resume(capsys, workdir, *overrides, recipe="dpo"):
  return run_cli(capsys, f"--config={RECIPES}:{recipe}", f"--workdir={workdir}", "--noprogress",
                 f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint.every=2",
                 *overrides)


@pytest.mark.parametrize("recipe, overrides, named", [
    ("dpo", ["--config.loss.hparams.beta=0.5"], ["loss.hparams.beta 0.1 -> 0.5"]),
    ("dpo", ["--config.loss.hparams.beta=0.5", "--config.loss.hparams.label_smoothing=0.1"],
     ["loss.hparams.beta 0.1 -> 0.5", "loss.hparams.label_smoothing 0.0 -> 0.1"]),
    ("ln_dpo", [], ["loss.name 'dpo' -> 'ln_dpo'",
                    "loss.hparams.label_smoothing 0.0 -> '<absent>'"]),
])
def test_changed_objective_is_refused_naming_each_key(stopped_run, capsys, recipe, overrides,
                                                      named):
  status, err = _resume(capsys, stopped_run, *overrides, recipe=recipe)
  assert status == 2, err
  assert len(err) == 1 and err[0].startswith("jaxalign train: error: cannot resume from step 2")
  for text in named:
    assert text in err[0], err[0]
  assert "allow_config_change" in err[0]
  assert complete_steps(stopped_run) == [2]  # nothing restored, nothing saved


@pytest.mark.parametrize("recipe, overrides, named", [
    ("dpo", ["--config.model.overrides.d_model=64"], ["model.d_model 32 -> 64"]),
    ("dpo", ["--config.model.overrides.n_layers=2", "--config.model.overrides.d_ff=128"],
     ["model.n_layers 1 -> 2", "model.d_ff 64 -> 128"]),
    ("dpo", ["--config.reference.mode=frozen"], ["reference.mode 'precompute' -> 'frozen'"]),
    ("grao", [], ["data format 'pairwise' -> 'groups'", "loss.name 'dpo' -> 'grao'"]),
])
@pytest.mark.parametrize("allow", [False, True])
def test_changed_model_shape_or_data_format_is_refused_even_when_allowed(
    stopped_run, capsys, recipe, overrides, named, allow):
  flag = [f"--config.allow_config_change={allow}"]
  status, err = _resume(capsys, stopped_run, *overrides, *flag, recipe=recipe)
  if recipe == "grao" and not allow:
    # Other data too: the data-fingerprint refusal (exit 2 too) comes first, one line.
    assert status == 2 and len(err) == 1 and "the data differs" in err[0], err
    assert complete_steps(stopped_run) == [2]
    return
  assert status == 2, err
  assert len(err) == 1 and "cannot resume from step 2" in err[0], err
  assert "the model or data format differs" in err[0]
  for text in named:
    assert text in err[0], err[0]
  assert complete_steps(stopped_run) == [2]


def test_allow_config_change_resumes_with_the_new_objective(stopped_run, tmp_path, capsys,
                                                           caplog):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_run, workdir)
  with caplog.at_level(logging.WARNING):
    status, err = _resume(capsys, workdir, "--config.loss.hparams.beta=0.5",
                          "--config.allow_config_change=True")
  assert status == 0, err
  assert complete_steps(workdir) == [2, 4]
  assert any("changed objective: loss.hparams.beta 0.1 -> 0.5" in r.getMessage()
             for r in caplog.records)
  # The new checkpoint records the new objective.
  assert rundir.resolved_config(str(workdir))["loss"]["hparams"]["beta"] == 0.5



def test_a_changed_schedule_resumes_with_a_warning_naming_it(caplog):
  """total_steps (or the learning-rate settings) may change on resume: said, not refused."""
  from jaxalign.train import resume
  saved = tiny_config(total_steps=TOTAL_STEPS).to_dict()
  with caplog.at_level(logging.WARNING):
    resume.check_resume_config(saved, tiny_config(total_steps=TOTAL_STEPS), where="here")
  assert not caplog.records
  with caplog.at_level(logging.WARNING):
    resume.check_resume_config(saved, tiny_config(total_steps=40, **{"optim.lr": 0.5}),
                               where="here")
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 1 and "changed learning-rate schedule" in messages[0]
  assert "total_steps 4 -> 40" in messages[0] and "optim.lr" in messages[0]
