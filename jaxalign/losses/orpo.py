"""ORPO: Monolithic Preference Optimization without Reference Model (Hong, Lee,
Thorne 2024, arXiv 2403.07691).

Reference-free: the chosen NLL plus an odds-ratio term on per-token mean
log-probs p = exp(S/|y|),
  log odds(y) = log p - log(1 - p),
  L = NLL(y_w) - beta * mean log sigmoid(log odds(y_w) - log odds(y_l))  (Eq. 6-7),
beta being the paper's lambda. As TRL's ORPOTrainer (`trl.experimental.orpo`,
TRL 1.16) including its stable log(1 - exp(x)) and, by default, its NLL over the
chosen sequence's prompt and response tokens; docs/losses.md has the rest.
"""

import jax
import jax.numpy as jnp

from jaxalign.losses import cpo
from jaxalign.losses._common import as_f32, pair_metrics, weighted_mean
from jaxalign.losses.registry import one_of, register

# Which tokens of the chosen sequence the NLL averages over.
NLL_TOKENS = ("sequence", "response")


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, branching at -log 2 so neither side cancels."""
  x = jnp.minimum(x, -1e-30)   # S/|y| <= 0; keep log(-expm1) finite at 0
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_columns(hparams: dict) -> tuple[str, ...]:
  """The prompt tokens' log-probs and counts, for the NLL over the whole sequence."""
  if hparams.get("nll_tokens", "sequence") == "sequence":
    return ("unscored_logps", "unscored_lengths")
  return ()


def sequence_nll(chosen_logps, chosen_lengths, chosen_unscored_logps, chosen_unscored_lengths,
                 weights=None) -> jax.Array:
  """TRL's ORPO NLL: the token-mean cross-entropy over every chosen sequence's tokens
  after its first, prompt and response: -sum(S_w + P_w) / sum(|y_w| + |p_w|).

  chosen_logps, chosen_lengths: [B] the response's summed log-probs and tokens;
  chosen_unscored_logps, chosen_unscored_lengths: [B] the same of its other real
  tokens (the prompt less its first token); weights: [B] (0 on padding rows).
  Each sum of log-probs is taken in its inputs' precision before the float32 cast.
  Returns [].
  """
  total = as_f32(chosen_logps + chosen_unscored_logps)
  count = as_f32(chosen_lengths + chosen_unscored_lengths)
  w = jnp.ones_like(total) if weights is None else as_f32(weights)
  return -(w * total).sum() / jnp.maximum((w * count).sum(), 1.0)


@register(data="pairwise", needs_ref=False, name="orpo", ranges={"beta": "[0, inf)"},
          columns=orpo_columns, check=one_of("nll_tokens", NLL_TOKENS, "sequence"))
def orpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    chosen_unscored_logps: jax.Array | None = None,
    chosen_unscored_lengths: jax.Array | None = None,
    *,
    beta: float = 0.1,
    nll_tokens: str = "sequence",
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ORPO: NLL(y_w) - beta * mean_b log sigmoid(log odds ratio_b).

  Args:
    chosen_logps, rejected_logps: [B] summed policy log-probs of the responses.
    chosen_lengths, rejected_lengths: [B] scored-token counts (clamped to >= 1).
    chosen_unscored_logps, chosen_unscored_lengths: [B] summed log-probs and count
      of the chosen sequence's other real tokens after its first (the prompt; the
      step's unscored_* columns); read with nll_tokens="sequence".
    beta: the paper's lambda, weight of the odds-ratio term (paper and TRL: 0.1).
    nll_tokens: "sequence" (default, TRL's ORPOTrainer and the authors' code): the
      NLL averages over the chosen sequence's prompt and response tokens;
      "response": over its response tokens only (the SFT convention, as CPO).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar.
    metrics: rewards/* (beta * per-token mean log-prob, as TRL), logps/* (per-token
      means), nll_loss, log_odds_ratio (mean log sigmoid of the log odds ratio),
      log_odds_chosen (mean log odds ratio), as TRL names them.

  Raises:
    ValueError: an unknown nll_tokens, or "sequence" without the unscored columns.
  """
  if nll_tokens not in NLL_TOKENS:
    raise ValueError(f"nll_tokens must be one of {list(NLL_TOKENS)}, got {nll_tokens!r}")
  c, r = cpo.preference_logits(chosen_logps, rejected_logps, chosen_lengths,
                               rejected_lengths, average=True)
  log_odds = (c - r) - (log1mexp(c) - log1mexp(r))                   # [B]
  ratio = -jax.nn.softplus(-log_odds)                                 # log sigmoid, [B]
  mean = weighted_mean(weights, ratio)
  if nll_tokens == "sequence":
    if chosen_unscored_logps is None or chosen_unscored_lengths is None:
      raise ValueError('orpo nll_tokens="sequence" (TRL\'s NLL over prompt + response) needs '
                       "chosen_unscored_logps and chosen_unscored_lengths (the train step "
                       'computes them); pass them or set nll_tokens="response"')
    nll = sequence_nll(chosen_logps, chosen_lengths, chosen_unscored_logps,
                       chosen_unscored_lengths, weights)
  else:
    nll = cpo.chosen_nll(chosen_logps, chosen_lengths, weights)
  metrics = pair_metrics(beta * c, beta * r, c, r, mean)
  metrics["nll_loss"] = nll
  metrics["log_odds_ratio"] = mean(ratio)
  metrics["log_odds_chosen"] = mean(log_odds)
  return nll - beta * mean(ratio), metrics
