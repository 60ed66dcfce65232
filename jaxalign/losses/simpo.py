"""SimPO: Simple Preference Optimization (Meng, Xia, Chen 2024, arXiv 2405.14734).

Reference-free and length-normalised: the implicit reward is the policy's
per-token mean log-prob times beta, and the Bradley-Terry margin must exceed a
target gamma,
  L = -log sigmoid(beta * (S_w/|y_w| - S_l/|y_l|) - gamma)   (paper Eq. 6).
TRL runs it as CPOTrainer(loss_type="simpo", cpo_alpha=0); `simpo_loss` equals
that (tests/losses/test_trl_conformance.py). docs/losses.md has the provenance.
"""

import jax

from jaxalign.losses import cpo
from jaxalign.losses.registry import register


@register(data="pairwise", needs_ref=False, name="simpo",
          ranges={"beta": "(0, inf)", "gamma": "[0, inf)", "label_smoothing": "[0, 0.5)",
                  "sft_weight": "[0, inf)"})
def simpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SimPO per pair: (1-eps) l(beta du - gamma) + eps l(-(beta du - gamma)).

  du = S_w/|y_w| - S_l/|y_l| (per-token mean policy log-probs, lengths clamped
  to >= 1), l(z) = -log sigmoid(z).

  Args:
    chosen_logps, rejected_logps: [B] summed policy log-probs.
    chosen_lengths, rejected_lengths: [B] scored-token counts.
    beta: reward scale (paper: 2.0 to 2.5; default 2.0 as the paper's code).
    gamma: target reward margin (paper: 0.5 to 1.6 by setup; TRL's
      simpo_gamma default 0.5). Note gamma is in reward units, gamma/beta in
      log-prob units (the paper's gamma/beta ratio).
    label_smoothing: eps, in [0, 0.5) (the authors' code has it; 0 = paper).
    sft_weight: weight of an added chosen-token NLL (the authors' code's
      `sft_weight`, TRL's cpo_alpha; 0 = paper).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar; metrics: rewards/* (beta * per-token mean log-prob, the
    SimPO reward), logps/* (per-token means), nll_loss when sft_weight != 0.
  """
  return cpo.cpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
                      beta=beta, loss_type="simpo", label_smoothing=label_smoothing,
                      simpo_gamma=gamma, cpo_alpha=sft_weight, weights=weights)
