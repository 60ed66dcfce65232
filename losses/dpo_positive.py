"""DPO-Positive (DPOP; Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference
Optimisation with DPO-Positive", arXiv:2402.13228, eq. 3).

DPO can lower the likelihood of the preferred response as long as the rejected one
drops faster. DPOP adds a penalty inside the sigmoid whenever the policy's log-prob
of the chosen response falls below the reference's:

  z = beta * (rho_w - rho_l - lam * max(0, S_ref(y_w) - S(y_w))),   rho = S - S_ref
  loss = mean_b [(1 - eps) (-log sigmoid(z_b)) + eps (-log sigmoid(-z_b))]

with S the summed response log-probs (docs/losses.md notation) and eps the
conservative-DPO label smoothing (0 in the paper; kept so that any DPO recipe's
hyperparameters carry over). lam = 0 is DPO (cDPO with eps > 0).

  jaxalign train --config configs/dpo_toy.py --workdir runs/dpop \
      --config.loss.name=losses/dpo_positive.py:dpo_positive_loss \
      --config.loss.hparams.lam=5.0
"""

import jax
import jax.numpy as jnp

from jaxalign.losses import register


@register(data="pairwise", needs_ref=True,
          ranges={"beta": "(0, inf)", "lam": "[0, inf)", "label_smoothing": "[0, 0.5)"})
def dpo_positive_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      *, beta: float = 0.1, lam: float = 5.0, label_smoothing: float = 0.0):
  """DPO-Positive on [B] summed log-probs; returns (scalar loss, metrics)."""
  chosen = chosen_logps.astype(jnp.float32)
  rejected = rejected_logps.astype(jnp.float32)
  # The reference side is a constant (precomputed or a frozen model's forward).
  ref_chosen = jax.lax.stop_gradient(ref_chosen_logps).astype(jnp.float32)
  ref_rejected = jax.lax.stop_gradient(ref_rejected_logps).astype(jnp.float32)
  chosen_ratio = chosen - ref_chosen
  rejected_ratio = rejected - ref_rejected
  penalty = jnp.maximum(0.0, ref_chosen - chosen)
  logits = chosen_ratio - rejected_ratio - lam * penalty
  z = beta * logits
  eps = label_smoothing
  loss = (-(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)).mean()
  chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
  margins = chosen_rewards - rejected_rewards
  metrics = {
      "rewards/chosen": chosen_rewards.mean(),
      "rewards/rejected": rejected_rewards.mean(),
      "rewards/margins": margins.mean(),
      "rewards/accuracies": (margins > 0).astype(jnp.float32).mean(),
      "logps/chosen": chosen.mean(),
      "logps/rejected": rejected.mean(),
      "dpop/penalty": penalty.mean(),
  }
  return loss, metrics
