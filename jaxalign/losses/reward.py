"""Bradley-Terry reward-model loss (TRL `RewardTrainer.compute_loss`).

For a pair with scalar scores r_c (chosen) and r_r (rejected):

  loss = mean_b [ -log sigmoid(r_c - r_r - m_b) ]
         + center_rewards_coefficient * mean_b [ (r_c + r_r)^2 ]

m_b is the pair's optional margin (a `margin` column; 0 without one), the
second term pulls the scores toward mean zero (Eisenstein et al. 2023, TRL's
`center_rewards_coefficient`; 0 = off, TRL's None). The scores come from
`jaxalign.rewards.model.RewardModel`, trained by `jaxalign.train.reward`.
"""

import jax
import jax.numpy as jnp

from jaxalign.losses.registry import register


# Bradley-Terry reward-model training: a scalar-head model with its own trainer
# (jaxalign/train/reward.py), not the LM log-probs of the train step.
@register(data="pairwise", needs_ref=False, name="reward_model", head="scalar",
          ranges={"center_rewards_coefficient": "[0, inf)"})
def bradley_terry_loss(
    chosen_scores: jax.Array,
    rejected_scores: jax.Array,
    margin: jax.Array | None = None,
    *,
    center_rewards_coefficient: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pairwise Bradley-Terry loss on reward-model scores.

  Args:
    chosen_scores: [B] scores of the chosen responses.
    rejected_scores: [B] scores of the rejected responses.
    margin: optional [B] required score gap per pair (TRL's `margin` column).
    center_rewards_coefficient: weight of mean((r_c + r_r)^2); 0 = off.
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar.
    metrics: TRL's `accuracy` (fraction of pairs with r_c > r_r, ties count as
      wrong), `margin` (mean r_c - r_r), `min_reward`, `mean_reward`,
      `max_reward` (over both responses of every pair).
  """
  rc = chosen_scores.astype(jnp.float32)
  rr = rejected_scores.astype(jnp.float32)
  w = jnp.ones_like(rc) if weights is None else weights.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  mean = lambda x: (w * x).sum() / n
  diff = rc - rr
  target = diff if margin is None else diff - margin.astype(jnp.float32)
  loss = mean(jax.nn.softplus(-target))       # -log sigmoid(z) == softplus(-z)
  if center_rewards_coefficient:
    loss = loss + center_rewards_coefficient * mean((rc + rr) ** 2)
  both = jnp.concatenate([rc, rr])
  real = jnp.concatenate([w, w]) > 0
  metrics = {
      "accuracy": mean((rc > rr).astype(jnp.float32)),
      "margin": mean(diff),
      "min_reward": jnp.min(jnp.where(real, both, jnp.inf)),
      "mean_reward": (jnp.concatenate([w, w]) * both).sum() / (2 * n),
      "max_reward": jnp.max(jnp.where(real, both, -jnp.inf)),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
