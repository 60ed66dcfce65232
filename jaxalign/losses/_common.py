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
