"""KTO (Ethayarajh et al., arXiv 2402.01306) and APO-zero on unpaired data.

Both read the unpaired format: one completion per example with a binary label
(True = desirable). The numbers follow TRL's `KTOTrainer.kto_loss` and
`get_batch_loss_metrics` (the version is in docs/losses.md):

  r(x, y)  = S_theta(y | x) - S_ref(y | x)          (summed log-ratio)
  z_ref    = max(0, mean_b [S_theta(y'_b | x_b) - S_ref(y'_b | x_b)])   (detached)
  KTO        desirable:   lambda_D * (1 - sigmoid(beta * (r - z_ref)))
             undesirable: lambda_U * (1 - sigmoid(beta * (z_ref - r)))
  APO-zero   desirable:   lambda_D * (1 - sigmoid(beta * r))
  (unpaired) undesirable: lambda_U * sigmoid(beta * r)

and the loss is the mean over all examples of the batch (TRL's `nanmean` of
the weighted desirable and undesirable losses together). y'_b is a mismatched
completion: example b's prompt with the completion of another example of the
same batch chunk (`jaxalign.data.conventions.add_kl_completions`, as TRL's
`_get_kl_dataset`); its log-probs arrive as the example's second sequence.

Data parallelism: z_ref is a mean over the *global* batch. TRL averages each
device's mean and then clamps (`gather_for_metrics(kl).mean().clamp(min=0)`),
which equals the global mean for equal per-device batches; under `jax.jit`
with a sharded batch, `.sum()` over the example axis is already the global sum,
so nothing more is needed here. Gradient accumulation estimates z_ref per
micro-batch, as TRL does per forward.
"""

import jax
import jax.numpy as jnp

from jaxalign.losses._common import unpaired_metrics
from jaxalign.losses.registry import register

LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _unpaired_loss(logps, ref_logps, labels, kl_logps, ref_kl_logps, *, loss_type: str,
                   beta: float, desirable_weight: float, undesirable_weight: float,
                   weights):
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  logps = logps.astype(jnp.float32)
  ref_logps = jax.lax.stop_gradient(ref_logps.astype(jnp.float32))
  is_desirable = labels.astype(bool)                                   # [B]
  w = jnp.ones_like(logps) if weights is None else weights.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)

  if loss_type == "kto":
    kl_ratio = (kl_logps.astype(jnp.float32)
                - ref_kl_logps.astype(jnp.float32))                    # [B]
    # Detached batch mean over every example (both labels), clamped at 0.
    kl = jax.lax.stop_gradient(jnp.maximum((w * kl_ratio).sum() / n, 0.0))
  else:
    kl = jnp.zeros((), jnp.float32)

  logratios = logps - ref_logps                                        # [B]
  # 1 - sigmoid(z) written as sigmoid(-z): equal, and exact in float32 where
  # sigmoid(z) rounds to 1 (TRL computes 1 - sigmoid in float32/64 as written).
  if loss_type == "kto":
    desirable = jax.nn.sigmoid(-beta * (logratios - kl))
    undesirable = jax.nn.sigmoid(-beta * (kl - logratios))
  else:
    desirable = jax.nn.sigmoid(-beta * logratios)
    undesirable = jax.nn.sigmoid(beta * logratios)
  per_example = jnp.where(is_desirable, desirable_weight * desirable,
                          undesirable_weight * undesirable)            # [B]
  loss = (w * per_example).sum() / n

  rewards = jax.lax.stop_gradient(beta * logratios)
  metrics = unpaired_metrics(rewards, logps, is_desirable, w)
  metrics["kl"] = kl
  return loss, metrics


@register(data="unpaired_kl", needs_ref=True, name="kto",
          ranges={"beta": "(0, inf)", "desirable_weight": "(0, inf)",
                  "undesirable_weight": "(0, inf)"})
def kto_loss(
    logps: jax.Array,
    ref_logps: jax.Array,
    labels: jax.Array,
    kl_logps: jax.Array,
    ref_kl_logps: jax.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """KTO with the batch KL reference point (TRL `loss_type="kto"`).

  Args:
    logps: [B] summed log pi_theta(y | x) over each completion's tokens.
    ref_logps: [B] the same under the reference (no gradient).
    labels: [B] bool or int, True/1 = desirable.
    kl_logps: [B] summed log pi_theta(y' | x) of the mismatched KL sequence
      (x's prompt, another example's completion y').
    ref_kl_logps: [B] the same under the reference.
    beta: inverse temperature on the log-ratio.
    desirable_weight: lambda_D, multiplies every desirable example's loss.
    undesirable_weight: lambda_U, multiplies every undesirable example's loss.
    weights: optional [B] row weights (0 for padding rows); padding rows enter
      neither the loss nor z_ref nor the metrics.

  Returns:
    loss: scalar, the (row-weighted) mean of the per-example losses.
    metrics: `kl` (z_ref after the clamp), `rewards/{chosen,rejected,margins}`,
      `logps/{chosen,rejected}` (this batch's per-class means, 0 for an empty
      class), and the sums and counts TRL logs (`rewards/chosen_sum`,
      `logps/chosen_sum`, `count/chosen`, same for rejected) for exact
      window means.
  """
  return _unpaired_loss(logps, ref_logps, labels, kl_logps, ref_kl_logps, loss_type="kto",
                        beta=beta, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight, weights=weights)


@register(data="unpaired", needs_ref=True, name="apo_zero_unpaired",
          ranges={"beta": "(0, inf)", "desirable_weight": "(0, inf)",
                  "undesirable_weight": "(0, inf)"})
def apo_zero_unpaired_loss(
    logps: jax.Array,
    ref_logps: jax.Array,
    labels: jax.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """APO-zero on unpaired data (D'Oosterlinck et al., arXiv 2408.06266; TRL KTO
  `loss_type="apo_zero_unpaired"`): pushes desirable log-ratios up and
  undesirable ones down, each against 0, with no KL reference point (TRL then
  skips the KL forward; `kl` is logged as 0).

  Arguments and returns as `kto_loss`, without the KL sequences.
  """
  return _unpaired_loss(logps, ref_logps, labels, None, None, loss_type="apo_zero_unpaired",
                        beta=beta, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight, weights=weights)
