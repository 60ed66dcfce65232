"""DPO (Rafailov et al. 2023) as a pure function of per-sequence log-probs.

The math and its invariants are in shared/LOSSES.md, section 1. Only the
sigmoid form (with cDPO label smoothing) lives here for now; the other
variants plug into the same signature.
"""

import jax
import jax.numpy as jnp


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sigmoid DPO loss (Rafailov et al. 2023, Eq. 7); cDPO when label_smoothing > 0.

  Args:
    chosen_logps: [B] summed log pi_theta(y_w | x) over response tokens.
    rejected_logps: [B] same for the rejected response y_l.
    ref_chosen_logps: [B] summed log pi_ref(y_w | x); constant w.r.t. theta.
    ref_rejected_logps: [B] same for y_l.
    beta: inverse temperature on the log-ratio.
    chosen_lengths: [B] scored tokens of y_w; needed when rpo_alpha > 0.
    rejected_lengths: [B] scored tokens of y_l (unused by the sigmoid form).
    label_smoothing: probability eps that a pair's preference label is flipped.
    rpo_alpha: weight of the chosen responses' token-mean NLL added to the loss
      (TRL's `rpo_alpha`; the DPO+NLL objective of Pang et al. 2024, "Iterative
      Reasoning Preference Optimization"). 0 is plain DPO.
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar, (weighted) mean over the B pairs.
    metrics: scalars rewards/{chosen,rejected,margins,accuracies}, logps/*,
      and nll_loss when rpo_alpha > 0.
  """
  del rejected_lengths
  chosen_logps = chosen_logps.astype(jnp.float32)
  rejected_logps = rejected_logps.astype(jnp.float32)
  # The reference is a constant: never let a gradient reach it.
  ref_chosen_logps = jax.lax.stop_gradient(ref_chosen_logps.astype(jnp.float32))
  ref_rejected_logps = jax.lax.stop_gradient(ref_rejected_logps.astype(jnp.float32))

  chosen_rewards = beta * (chosen_logps - ref_chosen_logps)          # [B]
  rejected_rewards = beta * (rejected_logps - ref_rejected_logps)    # [B]
  margins = chosen_rewards - rejected_rewards                        # [B]
  # softplus(-z) == -log_sigmoid(z), finite for large |z|.
  per_pair = ((1.0 - label_smoothing) * jax.nn.softplus(-margins)
              + label_smoothing * jax.nn.softplus(margins))          # [B]

  w = jnp.ones_like(per_pair) if weights is None else weights.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)
  mean = lambda x: (w * x).sum() / denom  # noqa: E731
  metrics = {
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/margins": mean(margins),
      "rewards/accuracies": mean((margins > 0).astype(jnp.float32)),  # strict, as TRL
      "logps/chosen": mean(chosen_logps),
      "logps/rejected": mean(rejected_logps),
  }
  loss = mean(per_pair)
  if rpo_alpha:
    if chosen_lengths is None:
      raise ValueError("rpo_alpha > 0 needs chosen_lengths")
    num_tokens = jnp.maximum((w * chosen_lengths.astype(jnp.float32)).sum(), 1.0)
    nll = -(w * chosen_logps).sum() / num_tokens
    metrics["nll_loss"] = nll
    loss = loss + rpo_alpha * nll
  return loss, metrics
