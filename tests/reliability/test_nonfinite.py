"""A NaN injected at a known step: the run stops naming the last good checkpoint,
which loads and equals a clean run's; with skip_nonfinite the step is skipped and
counted. (tests/train/test_loop.py covers the same with an overflowing lr=1e30.)

The NaN goes into the precomputed reference log-probs of the batch at exactly one
step, inside the jitted step, so it travels the real detection path: loss ->
gradients -> the step's finiteness flag -> the host check.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.train import step as step_lib
from tests.reliability.helpers import (TINY_CLI_CONFIG, assert_bit_identical, complete_steps,
                                       params, run_cli)
from tests.train.helpers import read_metrics, tiny_config, train_loop

TOTAL_STEPS = 6
NAN_STEP = 4  # the 4th update sees the NaN; steps 1..3 are clean


def _config(**overrides):
  return tiny_config(total_steps=TOTAL_STEPS, **{"checkpoint.every": 1, **overrides})


def _inject_nan(monkeypatch, at_update: int):
  """Makes update number `at_update` (1-based) see NaN reference log-probs."""
  original = step_lib.train_step

  def poisoned(state, batch, **kwargs):
    is_bad = state.step == at_update - 1                          # traced, [] bool
    batch = {**batch, "ref_logps": jnp.where(is_bad, jnp.nan, batch["ref_logps"])}
    return original(state, batch, **kwargs)

  # jit_train_step binds `train_step` when called, so the loop picks this up.
  monkeypatch.setattr(step_lib, "train_step", poisoned)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  """The same run without the NaN, stopped after step NAN_STEP - 1."""
  workdir = tmp_path_factory.mktemp("clean") / "run"
  train_loop(_config(), str(workdir), progress=False, stop_after=NAN_STEP - 1)
  return workdir


def test_injected_nan_stops_with_the_last_good_checkpoint_intact(tmp_path, capsys,
                                                                 monkeypatch, clean_run):
  _inject_nan(monkeypatch, NAN_STEP)
  workdir = tmp_path / "run"
  status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                        "--noprogress", f"--config.total_steps={TOTAL_STEPS}",
                        "--config.checkpoint.every=1", "--config.log_every=1")
  assert status == 1, err
  assert len(err) == 1, err
  assert err[0] == (f"jaxalign train: error: non-finite loss or gradient at or before step "
                    f"{NAN_STEP} (loss=nan); last good checkpoint: step {NAN_STEP - 1} in "
                    f"{workdir / 'checkpoints'}")
  assert complete_steps(workdir) == [NAN_STEP - 2, NAN_STEP - 1]  # keep=2, nothing after
  loaded = params(workdir, _config())
  assert all(np.isfinite(x).all() for x in loaded)
  assert_bit_identical(loaded, params(clean_run, _config()))


def test_skip_nonfinite_skips_exactly_the_bad_step_and_counts_it(tmp_path, monkeypatch,
                                                                 clean_run):
  _inject_nan(monkeypatch, NAN_STEP)
  cfg = _config(skip_nonfinite=True)
  result = train_loop(cfg, str(tmp_path), progress=False, stop_after=NAN_STEP)
  assert result.final_step == NAN_STEP
  counts = [m["nonfinite_steps"] for m in read_metrics(tmp_path)]
  assert counts == [0.0] * (NAN_STEP - 1) + [1.0]
  # The skipped update left the parameters as they were after the last good step.
  assert_bit_identical(params(tmp_path, cfg), params(clean_run, cfg))
