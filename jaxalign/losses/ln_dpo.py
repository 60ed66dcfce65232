"""LN-DPO: length-normalised DPO (Ahrabian et al., arXiv 2407.15229).

The math and its invariants are in docs/losses.md, `ln_dpo`. Each side's
log-ratio is divided by its own response length before the DPO sigmoid; this
is TRL's `loss_type="sigmoid_norm"` (>= v1.4.0).
"""

import jax
import jax.numpy as jnp

from jaxalign.losses._common import logratio, pair_metrics, weighted_mean
from jaxalign.losses.registry import register


@register(data="pairwise", needs_ref=True, name="ln_dpo", ranges={"beta": "(0, inf)"})
def ln_dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LN-DPO loss l(beta * [rho(y_w)/|y_w| - rho(y_l)/|y_l|]), l(z) = -log sigmoid(z).

  `beta` has no default on purpose: with equal lengths L, LN-DPO at beta equals
  DPO at beta/L, so DPO's 0.1 is far too small here (comparable values are of
  order 1-10 for 100-300-token responses); every config must choose it.

  Args:
    chosen_logps: [B] summed log pi_theta(y_w | x) over response tokens.
    rejected_logps: [B] same for the rejected response y_l.
    ref_chosen_logps: [B] summed log pi_ref(y_w | x); constant w.r.t. theta.
    ref_rejected_logps: [B] same for y_l.
    chosen_lengths: [B] scored response tokens of y_w; clamped to >= 1 (TRL).
    rejected_lengths: [B] scored response tokens of y_l; clamped to >= 1.
    beta: inverse temperature on the per-token log-ratio.
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar, (weighted) mean over the B pairs.
    metrics: rewards/{chosen,rejected,margins,accuracies} and logps/* in DPO's
      summed form (beta * rho; TRL-compatible), plus
      rewards_per_token/{chosen,rejected,margins} (beta * rho / |y|, what the
      loss sees) and length/{chosen,rejected} (mean scored tokens, unclamped).
  """
  # Log-ratios in the inputs' precision, then float32; no gradient reaches the reference.
  chosen_logratios = logratio(chosen_logps, ref_chosen_logps)               # [B]
  rejected_logratios = logratio(rejected_logps, ref_rejected_logps)         # [B]
  chosen_logps = jnp.asarray(chosen_logps).astype(jnp.float32)
  rejected_logps = jnp.asarray(rejected_logps).astype(jnp.float32)
  chosen_len = jnp.maximum(chosen_lengths.astype(jnp.float32), 1.0)        # [B]
  rejected_len = jnp.maximum(rejected_lengths.astype(jnp.float32), 1.0)    # [B]

  chosen_rewards = beta * chosen_logratios                                  # [B]
  rejected_rewards = beta * rejected_logratios                              # [B]
  chosen_rewards_per_token = chosen_rewards / chosen_len                    # [B]
  rejected_rewards_per_token = rejected_rewards / rejected_len              # [B]
  margins_per_token = chosen_rewards_per_token - rejected_rewards_per_token  # [B]
  # softplus(-z) == -log_sigmoid(z), finite for large |z|.
  per_pair = jax.nn.softplus(-margins_per_token)                            # [B]

  mean = weighted_mean(weights, per_pair)
  metrics = {
      **pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, mean),
      "rewards_per_token/chosen": mean(chosen_rewards_per_token),
      "rewards_per_token/rejected": mean(rejected_rewards_per_token),
      "rewards_per_token/margins": mean(margins_per_token),
      "length/chosen": mean(chosen_lengths.astype(jnp.float32)),
      "length/rejected": mean(rejected_lengths.astype(jnp.float32)),
  }
  return mean(per_pair), metrics
