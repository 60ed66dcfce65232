"""`probe.check`: a loss traced on an abstract batch of its format (jax.eval_shape),
what config validation refuses before anything is built (issue 30 item 7)."""

import jax.numpy as jnp
import pytest

from jaxalign import losses
from jaxalign.losses import probe

# The hyperparameters a built-in needs a value for (no default).
_REQUIRED = {"ln_dpo": {"beta": 0.1}, "ofs_dpo": {"alpha": 0.5, "swap_interval": 4}}


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_every_builtin_traces_on_its_format(name):
  spec = losses.get(name)
  hparams = _REQUIRED.get(name, {})
  assert probe.check(spec, hparams, batch_size=4, group_size=3) is None
  if spec.needs_ref:   # a frozen reference: the step columns come for it too
    assert probe.check(spec, hparams, batch_size=4, group_size=3, ref_columns=True) is None


def test_step_columns_state_and_optional_columns_are_traced_as_the_step_passes_them():
  # LD-DPO's tail column [B, S], policy and frozen reference: traced, accepted.
  dpo = losses.get("dpo")
  assert probe.check(dpo, {"ld_alpha": 0.5}, batch_size=4, ref_columns=True) is None

  # A running state must come back with the initial one's structure and dtypes.
  @losses.register(data="sft", needs_ref=False, name="test_probe_state",
                   init_state=lambda: {"n": jnp.zeros((), jnp.int32)})
  def counted(logps, *, state):
    return -logps.mean(), {}, {"n": state["n"] + 1.5}
  problem = probe.check(counted.loss_spec, {}, batch_size=4)
  assert problem == ("loss 'test_probe_state' returns a new state leaf float32[] where the "
                     "initial state has int32[]; the state must keep its shapes and dtypes "
                     "(traced on an abstract sft batch (B=4))"), problem

  # An optional column (pairwise "margin") is given to a loss that cannot run without
  # it; one that takes it with a default is traced on the path without it.
  @losses.register(data="pairwise", needs_ref=False, name="test_probe_margin")
  def needs_margin(chosen_logps, rejected_logps, margin):
    return jnp.mean(chosen_logps - rejected_logps - margin), {}
  assert probe.check(needs_margin.loss_spec, {}, batch_size=4) is None

  @losses.register(data="pairwise", needs_ref=False, name="test_probe_default_margin")
  def maybe_margin(chosen_logps, rejected_logps, margin=None):
    if margin is not None:
      return chosen_logps, {}       # wrong, and never reached without a margin column
    return jnp.mean(chosen_logps - rejected_logps), {}
  assert probe.check(maybe_margin.loss_spec, {}, batch_size=4) is None

  @losses.register(data="sft", needs_ref=False, name="test_probe_int_loss")
  def counts(lengths):
    return lengths.sum(), {}
  assert "returns a loss of dtype int32; it must be a float" in probe.check(
      counts.loss_spec, {}, batch_size=4)


def test_columns_online_sampling_adds_are_given_to_an_online_loss_only():
  # GRAO judging its reference answer reads answer_rewards, which no record gives:
  # the online sampler scores it. Offline the loss would raise mid-run.
  grao = losses.get("grao")
  judge = {"reference_reward": "judge"}
  assert probe.check(grao, judge, batch_size=4, group_size=3, online=True) is None
  problem = probe.check(grao, judge, batch_size=4, group_size=3)
  assert problem.startswith("loss 'grao' fails when traced on an abstract groups batch "
                            "(B=4, G=3): ValueError: reference_reward=\"judge\" needs "
                            "answer_rewards (at "), problem
