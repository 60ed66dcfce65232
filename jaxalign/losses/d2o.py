"""D^2O: Distributional Dispreference Optimization (Duan et al., arXiv 2403.03419).

The math and its invariants are in docs/losses.md, `d2o`. Not in TRL: the
loss is tested against its invariants. Data per prompt: one human-annotated
negative y_l and K responses y_1..y_K sampled from the reference (SFT) policy;
no human positives.
"""

import jax
import jax.numpy as jnp

from jaxalign.losses.registry import register


@register(data="negatives", needs_ref=True, name="d2o", online="d2o",
          ranges={"beta": "(0, inf)", "alpha": "[0, inf)"})
def d2o_loss(
    group_logps: jax.Array,
    ref_group_logps: jax.Array,
    group_mask: jax.Array | None,
    rejected_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    group_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    *,
    beta: float = 0.1,
    alpha: float = 0.1,
    length_norm: bool = False,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """D^2O loss (paper section 3.2, Eq. 3).

    z = (beta / K) * sum_i rho^-(y_i) - alpha * rho^+(y_l),   loss = mean_b -log sigmoid(z)

  with rho^-(y) = S_theta(y) - S_{r-}(y) for the self-samples and
  rho^+(y_l) = S_theta(y_l) - S_{r+}(y_l) for the human negative. The K samples
  are averaged *inside* the sigmoid (one weight sigma(-z) per prompt); with
  `group_mask`, K is the number of valid samples of that prompt. Both reference
  slots are usually the same SFT model; pass different arrays for the two-model
  option (pi_r^- for the samples, pi_r^+ for the negative).

  Args:
    group_logps: [B, K] summed log pi_theta(y_i | x) of the K self-samples.
    ref_group_logps: [B, K] summed log pi_r^-(y_i | x); constant w.r.t. theta.
    group_mask: [B, K] True where a slot holds a real sample (None = all real).
      Masked slots have no effect, whatever values they hold (NaN included).
    rejected_logps: [B] summed log pi_theta(y_l | x) of the human negative.
    ref_rejected_logps: [B] summed log pi_r^+(y_l | x); constant w.r.t. theta.
    group_lengths: [B, K] scored tokens of each sample; needed when length_norm.
    rejected_lengths: [B] scored tokens of y_l; needed when length_norm.
    beta: temperature on the mean self-sample log-ratio.
    alpha: temperature on the negative's log-ratio.
    length_norm: use per-token log-ratios rho / |y| instead of sums (an option,
      docs/losses.md: no source states length normalisation; default sums, as DPO).
    weights: optional [B] row weights (0 for padding rows). A prompt with no
      valid sample has no anchor and is left out (weight 0) as well.

  Returns:
    loss: scalar, (weighted) mean over the prompts.
    metrics: scalars `rewards/self` (mean beta * mean_i rho^-), `rewards/negative`
      (mean alpha * rho^+), `rewards/margins` (mean z), `rewards/accuracies`
      (z > 0), `logps/self_mean` (mean_i S_theta(y_i)), `logps/negative`,
      `kl/self` (mean_i rho^-(y_i), i.e. minus the KL(pi_r || pi_theta) estimate
      when the samples come from pi_r).
  """
  group_logps = group_logps.astype(jnp.float32)
  rejected_logps = rejected_logps.astype(jnp.float32)
  # The references are constants: never let a gradient reach them.
  ref_group_logps = jax.lax.stop_gradient(ref_group_logps.astype(jnp.float32))
  ref_rejected_logps = jax.lax.stop_gradient(ref_rejected_logps.astype(jnp.float32))
  mask = (jnp.ones(group_logps.shape, bool) if group_mask is None
          else group_mask.astype(bool))                               # [B, K]
  # Zero the padded slots before any arithmetic, so NaN or inf there cannot
  # leak into the value or (through 0 * nan) into the gradient.
  group_logps = jnp.where(mask, group_logps, 0.0)
  ref_group_logps = jnp.where(mask, ref_group_logps, 0.0)

  self_ratios = group_logps - ref_group_logps                         # [B, K]
  negative_ratio = rejected_logps - ref_rejected_logps                # [B]
  if length_norm:
    if group_lengths is None or rejected_lengths is None:
      raise ValueError("length_norm=True needs group_lengths and rejected_lengths")
    lengths = jnp.where(mask, group_lengths.astype(jnp.float32), 1.0)
    self_ratios = self_ratios / jnp.maximum(lengths, 1.0)
    negative_ratio = negative_ratio / jnp.maximum(rejected_lengths.astype(jnp.float32), 1.0)

  num_samples = mask.sum(axis=1).astype(jnp.float32)                  # [B]
  has_samples = num_samples > 0
  safe_k = jnp.maximum(num_samples, 1.0)
  mean_self_ratio = jnp.where(mask, self_ratios, 0.0).sum(axis=1) / safe_k   # [B]
  self_rewards = beta * mean_self_ratio                               # [B]
  negative_rewards = alpha * negative_ratio                           # [B]
  z = self_rewards - negative_rewards                                 # [B]
  # softplus(-z) == -log_sigmoid(z), finite for large |z|.
  per_prompt = jax.nn.softplus(-z)                                    # [B]

  w = jnp.ones_like(z) if weights is None else weights.astype(jnp.float32)
  w = jnp.where(has_samples, w, 0.0)
  denom = jnp.maximum(w.sum(), 1.0)
  mean = lambda x: (w * x).sum() / denom
  metrics = {
      "rewards/self": mean(self_rewards),
      "rewards/negative": mean(negative_rewards),
      "rewards/margins": mean(z),
      "rewards/accuracies": mean((z > 0).astype(jnp.float32)),  # strict, as DPO
      "logps/self_mean": mean(group_logps.sum(axis=1) / safe_k),
      "logps/negative": mean(rejected_logps),
      "kl/self": mean(mean_self_ratio),
  }
  return mean(per_prompt), metrics
