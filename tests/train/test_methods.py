"""Every registered method trains on the bundled task: end to end (CASES, moving its
metric: one run per data format and per loss with its own state or modules), or, for
the other pairwise losses and DPO variants, one real jitted train step whose loss
equals the pure function on independently computed log-probs (STEP_CASES). A variant
whose step computes the right loss trains as DPO does (the same gradient and update
path, proven end to end by the "dpo" case), so its own 12-step run proves nothing more."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses, sharding
from tests.train.helpers import built_state, random_batch, read_metrics, tiny_config, train_loop

# method -> (loss, hparams, data source, options, metric that must rise[, config overrides])
CASES = {
    "dpo": ("dpo", dict(beta=0.1), "toy:pairwise?n=64", {}, "rewards/margins"),
    "bco": ("bco", dict(beta=0.1), "toy:unpaired?n=64", {}, "rewards/margins"),
    "bco_udm": ("bco", dict(beta=0.1), "toy:unpaired?n=64",
                dict(udm="model", prompt_sample_size=32), "rewards/margins"),
    "kto": ("kto", dict(beta=0.1), "toy:unpaired?n=64", {}, "rewards/margins"),
    "apo_zero_unpaired": ("apo_zero_unpaired", dict(beta=0.1), "toy:unpaired?n=64", {},
                          "rewards/margins"),
    "d2o": ("d2o", dict(beta=0.1, alpha=0.1), "toy:negatives?n=64&k=3", {}, "rewards/margins"),
    "grao": ("grao", dict(), "toy:groups?n=64&g=3", {}, "-loss"),
    "aft": ("aft", dict(), "toy:ranked?n=64&g=3", {}, "-loss"),
    "ofs_dpo": ("ofs_dpo", dict(beta=0.1, alpha=0.1, swap_interval=4), "toy:pairwise?n=64", {},
                "fast/rewards/margins", {"lora.rank": 4, "lora.alpha": 8.0,
                                         "reference.mode": "frozen"}),
}


# Step-level cases: method -> (loss, hparams). One jitted step each (cheap), checked
# against the pure loss on log-probs from a plain full-softmax forward.
STEP_CASES = {
    "simpo": ("simpo", dict(beta=2.0, gamma=0.5)),
    "cpo": ("cpo", dict(beta=0.1, cpo_alpha=1.0)),
    "orpo": ("orpo", dict(beta=0.1)),
    "bco_pair": ("bco_pair", dict(beta=0.1)),
    "ln_dpo": ("ln_dpo", dict(beta=0.1)),
    # ipo, hinge and robust (with label smoothing) are also in all_dpo_variants below.
    # Every stateless TRL loss type in one weighted multi-loss (one compile, not one per
    # type; each type alone is checked against TRL in tests/losses/test_trl_conformance.py;
    # AOT's batch sorting is pure math there too).
    "all_dpo_variants": ("dpo", dict(
        beta=0.1, label_smoothing=1e-3,
        variant=("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair",
                 "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sft"),
        loss_weights=(1.0, 0.5, 0.3, 0.01, 0.7, 1.0, 0.4, 0.2, 0.001, 1.0, 0.6, 0.8, 0.5))),
    # The per-token columns: LD-DPO tails (policy and reference) and WPO weights.
    "ld_wpo_ipo": ("dpo", dict(beta=0.1, variant="ipo", ld_alpha=0.5, use_weighting=True)),
}


def test_every_registered_loss_has_a_case():
  # reward_model trains a scalar-head model (tests/train/test_reward_trainer.py).
  covered = {c[0] for c in CASES.values()} | {c[0] for c in STEP_CASES.values()}
  assert covered >= set(losses.LOSSES) - {"sft", "reward_model"}


def _plain_token_logps(graphdef, params, frozen, batch):
  """Full-softmax per-token log-probs [B, S, T], log sum p^2 [B, S, T] and scored mask,
  written independently of logprobs.py (no chunking, no custom gradient)."""
  model = nnx.merge(graphdef, params, frozen)
  b, s, t = batch["tokens"].shape
  tokens = batch["tokens"].reshape(b * s, t)
  hidden = model(tokens, batch["attention_mask"].reshape(b * s, t))
  logits = jnp.dot(hidden.astype(jnp.float32), model.head_weight().astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)[:, :-1]            # [N, T-1, V]
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logps = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  log_sum_sq = jax.scipy.special.logsumexp(2.0 * logp_all, axis=-1)
  mask = (batch["loss_mask"] * batch["attention_mask"]).reshape(b * s, t)[:, 1:].astype(bool)
  real = batch["attention_mask"].reshape(b * s, t).astype(bool)
  real = real[:, 1:] & real[:, :-1]          # a real token predicted by a real one
  shape = (b, s, t - 1)
  return (np.asarray(logps, np.float64).reshape(shape),
          np.asarray(log_sum_sq, np.float64).reshape(shape), np.asarray(mask).reshape(shape),
          np.asarray(real).reshape(shape))


def _independent_inputs(logps, log_sum_sq, mask, real):
  """Sums, lengths, LD-DPO tails, WPO means and the unscored (prompt) tokens' sums and
  counts per sequence, in NumPy."""
  sums = (logps * mask).sum(-1)
  lengths = mask.sum(-1)
  shared = lengths.min(axis=1)                                             # [B]
  pos = np.cumsum(mask, axis=-1)
  tail = ((logps * (mask & (pos > shared[:, None, None]))).sum(-1))
  wpo = ((logps - log_sum_sq) * mask).sum(-1) / np.maximum(lengths, 1)
  unscored = real & ~mask
  return sums, lengths, tail, wpo, (logps * unscored).sum(-1), unscored.sum(-1)


@pytest.mark.parametrize("method", sorted(STEP_CASES))
def test_step_loss_equals_the_pure_loss(method):
  loss_name, hparams = STEP_CASES[method]
  spec = losses.get(loss_name)
  # A frozen reference (in the state) for the losses that need one; none for the others.
  cfg = tiny_config(**{"mesh.shape": (1, 8, 1), "reference.mode": "frozen",
                       "optim.warmup_steps": 1, "total_steps": 10, "logprob_chunk_size": 16})
  cfg.loss.name = loss_name
  cfg.loss.hparams = ml_collections.ConfigDict(hparams)
  built, state = built_state(cfg)
  graphdef = built.graphdef
  batch = random_batch(np.random.default_rng(5))
  batch["loss_mask"][:3, 1, -5:-2] = 0     # unequal pair lengths: LD-DPO tails are non-empty
  with jax.set_mesh(built.mesh):
    if spec.needs_ref:   # a reference that differs from the policy: log-ratios are not 0
      state = state.replace(ref_params=jax.tree.map(lambda x: x * 0.8, state.ref_params))
    else:
      assert state.ref_params is None
    expected_inputs = [_independent_inputs(*_plain_token_logps(graphdef, p, state.frozen,
                                                               batch))
                       for p in ([state.params] + ([state.ref_params] if spec.needs_ref
                                                   else []))]
    _, metrics = built.step_fn(state, sharding.host_to_global(batch, built.batch_sharding))
  (sums, lengths, tail, wpo, unscored, unscored_n), *ref = expected_inputs
  f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))
  kw = dict(chosen_logps=f32(sums[:, 0]), rejected_logps=f32(sums[:, 1]),
            chosen_lengths=jnp.asarray(lengths[:, 0]), rejected_lengths=jnp.asarray(lengths[:, 1]))
  if ref:
    r_sums, _, r_tail, *_ = ref[0]
    kw.update(ref_chosen_logps=f32(r_sums[:, 0]), ref_rejected_logps=f32(r_sums[:, 1]))
  if hparams.get("ld_alpha") is not None:
    kw.update(chosen_tail_logps=f32(tail[:, 0]), rejected_tail_logps=f32(tail[:, 1]),
              ref_chosen_tail_logps=f32(r_tail[:, 0]), ref_rejected_tail_logps=f32(r_tail[:, 1]))
    assert np.any(tail != 0)
  if hparams.get("use_weighting"):
    kw.update(chosen_wpo_logps=f32(wpo[:, 0]), rejected_wpo_logps=f32(wpo[:, 1]))
  if "unscored_logps" in spec.column_names(hparams):   # ORPO's NLL over prompt + response
    kw.update(chosen_unscored_logps=f32(unscored[:, 0]),
              chosen_unscored_lengths=jnp.asarray(unscored_n[:, 0]))
    assert np.all(unscored_n[:, 0] > 0)
  if spec.init_state is not None:
    expected, _, _ = spec.fn(kw.pop("chosen_logps"), kw.pop("rejected_logps"),
                             kw.pop("ref_chosen_logps"), kw.pop("ref_rejected_logps"),
                             state=spec.init_state(), **hparams)
  else:
    expected, _ = spec.fn(**kw, **hparams)
  assert np.isfinite(float(metrics["loss"]))
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5, atol=1e-6)


def test_reference_free_loss_trains_without_a_reference(tmp_path):
  """simpo (needs_ref=False) with the default reference.mode='precompute': the run
  trains and no reference table is computed or written."""
  cfg = tiny_config(total_steps=1, **{"data.train_path": "toy:pairwise?n=16"})
  cfg.loss.name = "simpo"
  cfg.loss.hparams = ml_collections.ConfigDict(dict(beta=2.0, gamma=0.5))
  assert cfg.reference.mode == "precompute"
  train_loop(cfg, str(tmp_path), progress=False)
  assert np.isfinite(read_metrics(tmp_path)[0]["loss"])
  assert not os.path.exists(os.path.join(tmp_path, "ref_logps.npy"))


def test_pairwise_adapter_without_reference_is_a_clear_error():
  """A loss that needs reference arrays, fed without them (needs_ref=False), fails with
  one message naming the argument, not an index error on None."""
  spec = losses.get("dpo")
  x = losses.LossInputs(logps=jnp.zeros((2, 2)), ref_logps=None,
                        lengths=jnp.ones((2, 2), jnp.int32), batch={})
  with pytest.raises(ValueError, match="ref_chosen_logps.*needs_ref=False"):
    spec.call(spec.fn, x, None, beta=0.1)

  # Bound by name (the positional-order fallback for other names is gone).
  def my_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
              chosen_lengths, rejected_lengths, *, scale=1.0):
    c, r, rc, rr = chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    return scale * jnp.mean(c - r - rc + rr + 0 * chosen_lengths * rejected_lengths), {}

  with_ref = losses.LossInputs(logps=jnp.asarray([[1.0, 0.0]]), ref_logps=jnp.asarray([[0.5, 0.0]]),
                               lengths=jnp.ones((1, 2), jnp.int32), batch={})
  loss, _, _ = spec.call(my_loss, with_ref, None, scale=2.0)
  assert float(loss) == 1.0
  with pytest.raises(ValueError, match="needs_ref=False"):
    spec.call(my_loss, x, None)


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_trains_and_moves_its_metric(method, tmp_path):
  loss, hparams, source, options, metric, *over = CASES[method]
  cfg = tiny_config(total_steps=12, log_every=1, **{"optim.lr": 3e-3, "optim.warmup_steps": 1,
                                                     "data.train_path": source,
                                                     **(over[0] if over else {})})
  cfg.loss.name = loss
  cfg.loss.hparams = ml_collections.ConfigDict(hparams)
  cfg.loss.options = ml_collections.ConfigDict(options)
  train_loop(cfg, str(tmp_path), progress=False)
  rows = read_metrics(tmp_path)
  assert all(np.isfinite(r["loss"]) for r in rows)
  sign, key = (-1, metric[1:]) if metric.startswith("-") else (1, metric)
  values = sign * np.array([r[key] for r in rows])
  assert values[-3:].mean() > values[:3].mean(), (key, values)
