"""CPO: Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417).

Reference-free: the DPO loss with the reference dropped (beta -> 0 limit of
the paper's bound) plus a behaviour-cloning NLL on the chosen responses,
L = mean_b l_pref(b) + cpo_alpha * NLL(y_w). The preference term follows TRL's
CPOTrainer (`trl.experimental.cpo`, TRL 1.16): `loss_type` "sigmoid" (the
paper's Eq. 3, with label smoothing), "hinge", "ipo" and "simpo" (SimPO's
length-normalised margin form, `simpo_gamma`); "ipo" and "simpo" see per-token
mean log-probs, the others sums. docs/losses.md has the math and provenance.
"""

import jax
import jax.numpy as jnp

from jaxalign.losses._common import as_f32, pair_metrics, weighted_mean
from jaxalign.losses.registry import one_of, register

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def preference_logits(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
                      average: bool):
  """(chosen, rejected) [B] log-probs: sums, or per-token means when `average`."""
  c, r = as_f32(chosen_logps), as_f32(rejected_logps)
  if average:
    c = c / jnp.maximum(as_f32(chosen_lengths), 1.0)
    r = r / jnp.maximum(as_f32(rejected_lengths), 1.0)
  return c, r


def chosen_nll(chosen_logps, chosen_lengths, weights=None) -> jax.Array:
  """Token-mean NLL of the chosen responses over the batch: sum(-S_w) / sum(|y_w|)."""
  c = as_f32(chosen_logps)
  w = jnp.ones_like(c) if weights is None else as_f32(weights)
  return -(w * c).sum() / jnp.maximum((w * as_f32(chosen_lengths)).sum(), 1.0)


@register(data="pairwise", needs_ref=False, name="cpo",
          ranges={"beta": "(0, inf)", "label_smoothing": "[0, 0.5)",
                  "simpo_gamma": "[0, inf)", "cpo_alpha": "[0, inf)"},
          check=one_of("loss_type", LOSS_TYPES, "sigmoid"))
def cpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CPO: a reference-free preference term plus cpo_alpha times the chosen NLL.

  With u = s_w - s_l (s = summed log-prob, or its per-token mean for "ipo" and
  "simpo") and l(z) = -log sigmoid(z), per pair:
    "sigmoid": (1-eps) l(beta u) + eps l(-beta u)          (paper Eq. 3 at eps = 0)
    "simpo":   the same with u - simpo_gamma / beta          (SimPO's margin)
    "hinge":   max(0, 1 - beta u)
    "ipo":     (u - 1 / (2 beta))^2

  Args:
    chosen_logps, rejected_logps: [B] summed policy log-probs of y_w, y_l.
    chosen_lengths, rejected_lengths: [B] scored-token counts (clamped to >= 1
      for the means; the NLL divides by the chosen tokens of the batch).
    beta: inverse temperature of the preference term.
    loss_type: one of LOSS_TYPES.
    label_smoothing: eps of the "sigmoid" / "simpo" forms, in [0, 0.5).
    simpo_gamma: SimPO's target reward margin gamma ("simpo" only).
    cpo_alpha: weight of the chosen NLL (TRL default 1.0; 0 = none).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar.
    metrics: rewards/* (beta * s, TRL's CPO rewards), logps/* (the s the
      preference term sees), nll_loss.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown CPO loss_type {loss_type!r}; known: {list(LOSS_TYPES)}")
  if isinstance(label_smoothing, (int, float)) and label_smoothing and loss_type in ("hinge",
                                                                                     "ipo"):
    raise ValueError(f"label_smoothing has no effect with CPO loss_type={loss_type!r}")
  c, r = preference_logits(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
                           average=loss_type in ("ipo", "simpo"))
  u = c - r                                                          # [B]
  eps = label_smoothing
  sp = jax.nn.softplus    # softplus(-z) == -log sigmoid(z)
  if loss_type == "simpo":
    u = u - simpo_gamma / beta
  if loss_type in ("sigmoid", "simpo"):
    per_pair = (1.0 - eps) * sp(-beta * u) + eps * sp(beta * u)
  elif loss_type == "hinge":
    per_pair = jax.nn.relu(1.0 - beta * u)
  else:
    per_pair = jnp.square(u - 1.0 / (2.0 * beta))
  mean = weighted_mean(weights, per_pair)
  nll = chosen_nll(chosen_logps, chosen_lengths, weights)
  metrics = pair_metrics(beta * c, beta * r, c, r, mean)
  if not (isinstance(cpo_alpha, (int, float)) and cpo_alpha == 0):
    metrics["nll_loss"] = nll   # TRL skips the NLL (and logs 0) when cpo_alpha == 0
  return mean(per_pair) + cpo_alpha * nll, metrics
