"""DPO (Rafailov et al. 2023) and its usual variants as pure functions.

The math and its invariants are in shared/LOSSES.md, section 1. One function
covers the pairwise family that differs only in the per-pair loss applied to
the margin h = rho(y_w) - rho(y_l) (rho = summed policy minus reference
log-prob): sigmoid DPO and cDPO, robust DPO, IPO and hinge, each optionally
reference-free.
"""

import numbers

import jax
import jax.numpy as jnp

from jaxalign.losses._common import pair_metrics, weighted_mean

VARIANTS = ("sigmoid", "robust", "ipo", "hinge")


def _is_concrete_number(x) -> bool:
  """True for Python numbers (hparams bound by functools.partial), not tracers."""
  return isinstance(x, numbers.Real)


def _validate(variant, label_smoothing, beta, ipo_length_norm,
              chosen_lengths, rejected_lengths) -> None:
  """Raises ValueError at call (trace) time for settings with no meaning."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown DPO variant {variant!r}; known: {list(VARIANTS)}")
  if _is_concrete_number(label_smoothing):
    if variant == "robust" and not 0.0 <= label_smoothing < 0.5:
      raise ValueError(
          f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if variant in ("ipo", "hinge") and label_smoothing != 0.0:
      # TRL silently ignores it here; a set-but-unused knob is a config error.
      raise ValueError(
          f"label_smoothing={label_smoothing} has no effect with variant={variant!r}; "
          "it applies to 'sigmoid' (cDPO) and 'robust' only")
  if variant == "ipo":
    if _is_concrete_number(beta) and beta <= 0:
      raise ValueError(f"IPO needs beta (its tau) > 0, got {beta}")
    if ipo_length_norm and (chosen_lengths is None or rejected_lengths is None):
      raise ValueError(
          "variant='ipo' with ipo_length_norm=True needs chosen_lengths and "
          "rejected_lengths (per-token-mean log-ratios, as TRL); pass them or set "
          "ipo_length_norm=False for the summed form")


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
    variant: str = "sigmoid",
    reference_free: bool = False,
    ipo_length_norm: bool = True,
    rpo_alpha: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pairwise DPO-family loss; the per-pair form is picked by `variant`.

  With h = [S(y_w) - S_ref(y_w)] - [S(y_l) - S_ref(y_l)] and l(z) = -log sigmoid(z):

    * "sigmoid": (1-eps) l(beta h) + eps l(-beta h). eps = 0 is DPO (Rafailov et
      al. 2023, Eq. 7); eps > 0 is cDPO (Mitchell's note; TRL <= 0.28
      `loss_type="sigmoid", label_smoothing=eps`).
    * "robust": [(1-eps) l(beta h) - eps l(-beta h)] / (1 - 2 eps), unbiased
      under label-flip rate eps in [0, 0.5) (Chowdhury et al. 2024). Unbounded
      below for eps > 0: a negative loss is legitimate.
    * "ipo": (h - 1/(2 beta))^2 (Azar et al. 2023, Eq. 17; beta plays tau, as
      TRL). With `ipo_length_norm=True` (default, as TRL) each side's log-ratio
      is divided by its own length, h = rho_w/|y_w| - rho_l/|y_l|; False is the
      summed form of the DPO authors' code.
    * "hinge": max(0, 1 - beta h) (SLiC / RSO); 1/beta is the margin.

  `reference_free=True` treats S_ref as 0 everywhere (loss and metrics), i.e. a
  uniform reference; the reference inputs are then ignored.

  Args:
    chosen_logps: [B] summed log pi_theta(y_w | x) over response tokens.
    rejected_logps: [B] same for the rejected response y_l.
    ref_chosen_logps: [B] summed log pi_ref(y_w | x); constant w.r.t. theta.
    ref_rejected_logps: [B] same for y_l.
    chosen_lengths: [B] scored tokens of y_w; needed for IPO with
      ipo_length_norm and for rpo_alpha > 0. Clamped to >= 1.
    rejected_lengths: [B] scored tokens of y_l; needed for IPO with
      ipo_length_norm. Clamped to >= 1.
    beta: inverse temperature on the log-ratio (tau for IPO).
    label_smoothing: probability eps that a pair's preference label is flipped
      ("sigmoid" and "robust" only; must be 0 for "ipo" and "hinge").
    variant: one of "sigmoid", "robust", "ipo", "hinge".
    reference_free: treat the reference log-probs as 0.
    ipo_length_norm: IPO on per-token-mean log-ratios (TRL) instead of sums.
    rpo_alpha: weight of the chosen responses' token-mean NLL added to the loss
      (TRL's `rpo_alpha`; the DPO+NLL objective of Pang et al. 2024, "Iterative
      Reasoning Preference Optimization"). 0 adds nothing.
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar, (weighted) mean over the B pairs.
    metrics: scalars rewards/{chosen,rejected,margins,accuracies}, logps/*,
      and nll_loss when rpo_alpha > 0. rewards/* are always the summed
      beta * rho (TRL main), also for length-normalised IPO, so they are
      comparable across variants; the IPO loss itself sees the per-token form
      (TRL <= 0.28 logged per-token IPO rewards instead).

  Raises:
    ValueError: at call/trace time for an unknown variant, robust with eps
      outside [0, 0.5), label_smoothing with "ipo"/"hinge", or length-normalised
      IPO without lengths.
  """
  _validate(variant, label_smoothing, beta, ipo_length_norm,
            chosen_lengths, rejected_lengths)
  chosen_logps = chosen_logps.astype(jnp.float32)
  rejected_logps = rejected_logps.astype(jnp.float32)
  if reference_free:
    ref_chosen_logps = jnp.zeros_like(chosen_logps)
    ref_rejected_logps = jnp.zeros_like(rejected_logps)
  # The reference is a constant: never let a gradient reach it.
  ref_chosen_logps = jax.lax.stop_gradient(ref_chosen_logps.astype(jnp.float32))
  ref_rejected_logps = jax.lax.stop_gradient(ref_rejected_logps.astype(jnp.float32))

  chosen_logratios = chosen_logps - ref_chosen_logps                 # [B]
  rejected_logratios = rejected_logps - ref_rejected_logps           # [B]
  chosen_rewards = beta * chosen_logratios                           # [B]
  rejected_rewards = beta * rejected_logratios                       # [B]
  margins = chosen_rewards - rejected_rewards                        # [B] beta * h

  eps = label_smoothing
  # softplus(-z) == -log_sigmoid(z) == l(z), finite for large |z|.
  if variant == "sigmoid":
    per_pair = ((1.0 - eps) * jax.nn.softplus(-margins)
                + eps * jax.nn.softplus(margins))                    # [B]
  elif variant == "robust":
    per_pair = ((1.0 - eps) * jax.nn.softplus(-margins)
                - eps * jax.nn.softplus(margins)) / (1.0 - 2.0 * eps)
  elif variant == "hinge":
    per_pair = jax.nn.relu(1.0 - margins)
  else:  # "ipo"
    if ipo_length_norm:
      chosen_len = jnp.maximum(chosen_lengths.astype(jnp.float32), 1.0)
      rejected_len = jnp.maximum(rejected_lengths.astype(jnp.float32), 1.0)
      h = chosen_logratios / chosen_len - rejected_logratios / rejected_len
    else:
      h = chosen_logratios - rejected_logratios
    per_pair = jnp.square(h - 1.0 / (2.0 * beta))                    # [B]

  mean = weighted_mean(weights, per_pair)
  metrics = pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, mean)
  loss = mean(per_pair)
  if rpo_alpha:
    if chosen_lengths is None:
      raise ValueError("rpo_alpha > 0 needs chosen_lengths")
    w = jnp.ones_like(chosen_logps) if weights is None else weights.astype(jnp.float32)
    num_tokens = jnp.maximum((w * chosen_lengths.astype(jnp.float32)).sum(), 1.0)
    nll = -(w * chosen_logps).sum() / num_tokens
    metrics["nll_loss"] = nll
    loss = loss + rpo_alpha * nll
  return loss, metrics
