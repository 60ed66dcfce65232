"""ORPO: Monolithic Preference Optimization without Reference Model (Hong, Lee,
Thorne 2024, arXiv 2403.07691).

Reference-free: the chosen NLL plus an odds-ratio term on per-token mean
log-probs p = exp(S/|y|),
  log odds(y) = log p - log(1 - p),
  L = NLL(y_w) - beta * mean log sigmoid(log odds(y_w) - log odds(y_l))  (Eq. 6-7),
beta being the paper's lambda. As TRL's ORPOTrainer (`trl.experimental.orpo`,
TRL 1.16) including its stable log(1 - exp(x)); docs/losses.md has the rest.
"""

import jax
import jax.numpy as jnp

from jaxalign.losses import cpo
from jaxalign.losses._common import pair_metrics, weighted_mean
from jaxalign.losses.registry import register


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, branching at -log 2 so neither side cancels."""
  x = jnp.minimum(x, -1e-30)   # S/|y| <= 0; keep log(-expm1) finite at 0
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


@register(data="pairwise", needs_ref=False, name="orpo", ranges={"beta": "[0, inf)"})
def orpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float = 0.1,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ORPO: NLL(y_w) - beta * mean_b log sigmoid(log odds ratio_b).

  Args:
    chosen_logps, rejected_logps: [B] summed policy log-probs.
    chosen_lengths, rejected_lengths: [B] scored-token counts (clamped to >= 1).
    beta: the paper's lambda, weight of the odds-ratio term (paper and TRL: 0.1).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar.
    metrics: rewards/* (beta * per-token mean log-prob, as TRL), logps/* (per-token
      means), nll_loss, log_odds_ratio (mean log sigmoid of the log odds ratio),
      log_odds_chosen (mean log odds ratio), as TRL names them.
  """
  c, r = cpo.preference_logits(chosen_logps, rejected_logps, chosen_lengths,
                               rejected_lengths, average=True)
  log_odds = (c - r) - (log1mexp(c) - log1mexp(r))                   # [B]
  ratio = -jax.nn.softplus(-log_odds)                                 # log sigmoid, [B]
  mean = weighted_mean(weights, ratio)
  nll = cpo.chosen_nll(chosen_logps, chosen_lengths, weights)
  metrics = pair_metrics(beta * c, beta * r, c, r, mean)
  metrics["nll_loss"] = nll
  metrics["log_odds_ratio"] = mean(ratio)
  metrics["log_odds_chosen"] = mean(log_odds)
  return nll - beta * mean(ratio), metrics
