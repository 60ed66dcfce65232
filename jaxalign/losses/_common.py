"""Reductions and metric sets shared by the pairwise losses."""

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
