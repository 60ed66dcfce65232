"""Supervised fine-tuning: negative log-likelihood of the response tokens."""

import jax
import jax.numpy as jnp

from jaxalign.losses.registry import register


@register(data="sft", needs_ref=False, name="sft")
def sft_loss(
    logps: jax.Array,
    lengths: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-mean response NLL, -sum_b S(y_b|x_b) / sum_b |y_b|.

  Args:
    logps: [B] summed log pi_theta(y | x) over the scored response tokens.
    lengths: [B] number of scored response tokens per example.
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar mean negative log-likelihood per response token.
    metrics: `nll` (same as the loss), `logps/mean` (per-sequence mean) and
      `tokens/scored` (scored tokens in the batch; `num_tokens` is the run's
      cumulative real-token count, as TRL's).
  """
  logps = logps.astype(jnp.float32)
  w = jnp.ones_like(logps) if weights is None else weights.astype(jnp.float32)
  num_tokens = (w * lengths.astype(jnp.float32)).sum()
  nll = -(w * logps).sum() / jnp.maximum(num_tokens, 1.0)
  metrics = {
      "nll": nll,
      "logps/mean": (w * logps).sum() / jnp.maximum(w.sum(), 1.0),
      "tokens/scored": num_tokens,
  }
  return nll, metrics
