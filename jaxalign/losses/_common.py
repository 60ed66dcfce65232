"""Reductions and metric sets shared by the pairwise and unpaired losses."""

from typing import Callable

import jax
import jax.numpy as jnp


def weighted_mean(weights: jax.Array | None, like: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """x [B] -> sum(w * x) / max(sum(w), 1); w = 1 when `weights` is None (padding rows: 0)."""
  w = jnp.ones_like(like, jnp.float32) if weights is None else weights.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  return lambda x: (w * x).sum() / denom


def pair_metrics(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                 chosen_logps: jax.Array, rejected_logps: jax.Array,
                 mean: Callable[[jax.Array], jax.Array]) -> dict[str, jax.Array]:
  """TRL's pairwise metrics: rewards/{chosen,rejected,margins,accuracies}, logps/*."""
  margins = chosen_rewards - rejected_rewards
  return {
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/margins": mean(margins),
      "rewards/accuracies": mean((margins > 0).astype(jnp.float32)),  # strict, as TRL
      "logps/chosen": mean(chosen_logps),
      "logps/rejected": mean(rejected_logps),
  }


def logratio(logps, ref_logps) -> jax.Array:
  """logps - ref_logps [B] as float32, the difference taken in the inputs' precision.

  Sequence log-probs are large (-250) and their difference small: a float64
  (NumPy, or JAX with x64) pair is subtracted before the float32 cast, so the
  log-ratio keeps its digits; float32 inputs are unchanged. The reference side
  carries no gradient.
  """
  if isinstance(ref_logps, jax.Array):
    ref_logps = jax.lax.stop_gradient(ref_logps)
  return jnp.asarray(logps - ref_logps).astype(jnp.float32)


def as_f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def unpaired_metrics(rewards: jax.Array, logps: jax.Array, is_desirable: jax.Array,
                     weights: jax.Array) -> dict[str, jax.Array]:
  """TRL's metrics of an unpaired batch (BCO, KTO): per-class sums, counts and means.

  rewards, logps, weights [B] float32 (weights 0 on padding rows); is_desirable [B]
  bool. `rewards/*` and `logps/*` are count-weighted means over each class (0 for
  an empty class; `count/*` tell), next to the `_sum`s and counts they come from
  (TRL logs those too). `rewards/margins` is a difference of the class means, as
  TRL's log() computes it: there are no pairs to take it over.
  """
  w_chosen = jnp.where(is_desirable, weights, 0.0)
  w_rejected = jnp.where(is_desirable, 0.0, weights)
  count_chosen = jnp.maximum(w_chosen.sum(), 1.0)
  count_rejected = jnp.maximum(w_rejected.sum(), 1.0)
  metrics = {
      "rewards/chosen_sum": (w_chosen * rewards).sum(),
      "rewards/rejected_sum": (w_rejected * rewards).sum(),
      "logps/chosen_sum": (w_chosen * logps).sum(),
      "logps/rejected_sum": (w_rejected * logps).sum(),
      "count/chosen": w_chosen.sum(),
      "count/rejected": w_rejected.sum(),
  }
  metrics["rewards/chosen"] = metrics["rewards/chosen_sum"] / count_chosen
  metrics["rewards/rejected"] = metrics["rewards/rejected_sum"] / count_rejected
  metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
  metrics["logps/chosen"] = metrics["logps/chosen_sum"] / count_chosen
  metrics["logps/rejected"] = metrics["logps/rejected_sum"] / count_rejected
  return metrics
