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

from jaxalign.losses._common import as_f32, logratio, pair_metrics, weighted_mean
from jaxalign.losses.registry import register

# Per-pair forms. The first four are the seed methods; the rest are TRL
# DPOTrainer's other loss types (TRL 1.16 `loss_type`), names as TRL spells them.
VARIANTS = ("sigmoid", "robust", "ipo", "hinge", "sigmoid_norm", "exo_pair", "nca_pair",
            "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
            "discopop", "sft")
# Variants that read label_smoothing (eps); the others must have eps = 0.
_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
# Variants whose per-pair value depends on the other pairs of the batch (sorting).
_BATCH_COUPLED = ("aot", "aot_unpaired")
_NEEDS_LENGTHS = ("sigmoid_norm", "sft")


def _is_concrete_number(x) -> bool:
  """True for Python numbers (hparams bound by functools.partial), not tracers."""
  return isinstance(x, numbers.Real)


def variant_list(variant) -> tuple[str, ...]:
  """`variant` as a tuple of names: one string, or a list/tuple (TRL 1.x multi-loss)."""
  names = (variant,) if isinstance(variant, str) else tuple(variant)
  if not names:
    raise ValueError("variant: give at least one DPO loss type")
  return names


def _validate(variants, label_smoothing, beta, ipo_length_norm,
              chosen_lengths, rejected_lengths, loss_weights, ld_alpha, use_weighting,
              tails, wpo) -> None:
  """Raises ValueError at call (trace) time for settings with no meaning."""
  for variant in variants:
    if variant not in VARIANTS:
      raise ValueError(f"unknown DPO variant {variant!r}; known: {list(VARIANTS)}")
  if len(set(variants)) != len(variants):
    raise ValueError(f"variant lists a loss type twice: {list(variants)}")
  if loss_weights is not None:
    if len(tuple(loss_weights)) != len(variants):
      raise ValueError(f"loss_weights needs one weight per variant ({len(variants)}), "
                       f"got {len(tuple(loss_weights))}")
    if any(_is_concrete_number(w) and w < 0 for w in loss_weights):
      raise ValueError(f"loss_weights must be >= 0, got {list(loss_weights)}")
  if _is_concrete_number(label_smoothing):
    if ("robust" in variants or "exo_pair" in variants) and not 0.0 <= label_smoothing < 0.5:
      raise ValueError(
          f"robust DPO / EXO need 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if "exo_pair" in variants and label_smoothing <= 0.0:
      # TRL: log(eps) = -inf and an infinite loss; its docs suggest 1e-3.
      raise ValueError("variant 'exo_pair' needs label_smoothing > 0 (its target "
                       "distribution [1 - eps, eps]; EXO's authors use 1e-3)")
    if label_smoothing != 0.0 and not any(v in _SMOOTHED for v in variants):
      # TRL silently ignores it here; a set-but-unused knob is a config error.
      raise ValueError(
          f"label_smoothing={label_smoothing} has no effect with variant={list(variants)}; "
          f"it applies to {list(_SMOOTHED)} only")
  if "ipo" in variants or "sppo_hard" in variants:
    if _is_concrete_number(beta) and beta <= 0:
      raise ValueError(f"IPO / SPPO need beta > 0, got {beta}")
  lengths_missing = chosen_lengths is None or rejected_lengths is None
  if "ipo" in variants and ipo_length_norm and lengths_missing:
    raise ValueError(
        "variant='ipo' with ipo_length_norm=True needs chosen_lengths and "
        "rejected_lengths (per-token-mean log-ratios, as TRL); pass them or set "
        "ipo_length_norm=False for the summed form")
  for v in _NEEDS_LENGTHS:
    if v in variants and lengths_missing:
      raise ValueError(f"variant {v!r} needs chosen_lengths and rejected_lengths")
  if ld_alpha is not None:
    if _is_concrete_number(ld_alpha) and not 0.0 <= ld_alpha <= 1.0:
      raise ValueError(f"ld_alpha must be in [0, 1] (1 = plain DPO), got {ld_alpha}")
    if any(t is None for t in tails):
      raise ValueError("ld_alpha needs the tail log-probs (chosen_tail_logps, ...: the "
                       "train step computes them when ld_alpha is set)")
  if use_weighting:
    if any(v in _BATCH_COUPLED for v in variants):
      raise ValueError("use_weighting (WPO) does not apply to 'aot' / 'aot_unpaired' "
                       "(their pairs are re-matched by sorting; TRL refuses it too)")
    if any(t is None for t in wpo):
      raise ValueError("use_weighting needs chosen_wpo_logps and rejected_wpo_logps "
                       "(the train step computes them when use_weighting is set)")


def _per_pair(variant, *, beta, eps, cl, rl, c_logps, r_logps, rc_logps, rr_logps,
              c_len, r_len, ipo_length_norm, discopop_tau, sft_nll):
  """[B] loss of one DPO loss type. cl, rl: chosen / rejected log-ratios rho."""
  sp = jax.nn.softplus          # softplus(-z) == -log sigmoid(z), finite for large |z|
  z = beta * (cl - rl)          # beta * h
  if variant == "sigmoid":
    return (1.0 - eps) * sp(-z) + eps * sp(z)
  if variant == "robust":
    return ((1.0 - eps) * sp(-z) - eps * sp(z)) / (1.0 - 2.0 * eps)
  if variant == "hinge":
    return jax.nn.relu(1.0 - z)
  if variant == "ipo":
    h = cl / c_len - rl / r_len if ipo_length_norm else cl - rl
    return jnp.square(h - 1.0 / (2.0 * beta))
  if variant == "sigmoid_norm":   # LN-DPO: each side's log-ratio over its own length
    return sp(-beta * (cl / c_len - rl / r_len))
  if variant == "exo_pair":
    # EXO (Ji et al. 2024, Eq. 16, K = 2): KL(softmax(beta rho) || [1 - eps, eps]).
    return (jax.nn.sigmoid(z) * (-sp(-z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (-sp(z) - jnp.log(eps)))
  if variant == "nca_pair":
    # NCA (Chen et al. 2024): -log s(r_w) - 1/2 log s(-r_w) - 1/2 log s(-r_l).
    cr, rr = beta * cl, beta * rl
    return sp(-cr) + 0.5 * sp(cr) + 0.5 * sp(rr)
  if variant == "bco_pair":
    # Paired BCO without the reward shift (TRL >= 0.29); the shifted form is loss "bco_pair".
    return sp(-beta * cl) + sp(beta * rl)
  if variant == "sppo_hard":
    # SPPO (Wu et al. 2024) with hard win probabilities 1 / 0.
    return jnp.square(cl - 0.5 / beta) + jnp.square(rl + 0.5 / beta)
  if variant in ("aot", "aot_unpaired"):
    # AOT (Melnyk et al. 2024): the sorted margins (paired) or the sorted chosen and
    # rejected log-ratios (unpaired) are matched by rank over the batch.
    if variant == "aot":
      d = jnp.sort(c_logps - r_logps) - jnp.sort(rc_logps - rr_logps)
    else:
      d = jnp.sort(cl) - jnp.sort(rl)
    return (1.0 - eps) * sp(-beta * d) + eps * sp(beta * d)
  if variant == "apo_zero":       # APO (D'Oosterlinck et al. 2024, Eq. 7)
    return (1.0 - jax.nn.sigmoid(beta * cl)) + jax.nn.sigmoid(beta * rl)
  if variant == "apo_down":       # APO Eq. 8
    return jax.nn.sigmoid(beta * cl) + (1.0 - jax.nn.sigmoid(z))
  if variant == "discopop":
    # DiscoPOP (Chris Lu et al. 2024, Eq. 5): log-ratio-modulated blend of the logistic
    # and exponential losses. exp(-z) * sigmoid(z/tau) is formed in log space so a very
    # negative z gives 0 * inf = 0, not NaN.
    m = jax.nn.sigmoid(z / discopop_tau)
    return sp(-z) * (1.0 - m) + jnp.exp(-z - sp(-z / discopop_tau))
  # "sft": the batch's chosen-token NLL, the same value on every pair (as TRL).
  return jnp.broadcast_to(sft_nll, cl.shape)


def dpo_columns(hparams: dict) -> tuple[str, ...]:
  """LD-DPO needs each sequence's tail log-prob, WPO its per-token weight mean."""
  cols = ()
  if hparams.get("ld_alpha") is not None:
    cols += ("tail_logps",)
  if hparams.get("use_weighting"):
    cols += ("wpo_logps",)
  return cols


# beta <= 0 trains a constant or reverses the preference; label smoothing of 0.5 or
# more flips which response is preferred. check_hparams is defined below.
@register(data="pairwise", needs_ref=True, name="dpo", columns=dpo_columns,
          check=lambda hparams: check_hparams(hparams),
          ranges={"beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "rpo_alpha": "[0, inf)",
                  "ld_alpha": "[0, 1]", "discopop_tau": "(0, inf)"})
def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    chosen_tail_logps: jax.Array | None = None,
    rejected_tail_logps: jax.Array | None = None,
    ref_chosen_tail_logps: jax.Array | None = None,
    ref_rejected_tail_logps: jax.Array | None = None,
    chosen_wpo_logps: jax.Array | None = None,
    rejected_wpo_logps: jax.Array | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    variant: str | tuple[str, ...] = "sigmoid",
    loss_weights: tuple[float, ...] | None = None,
    reference_free: bool = False,
    ipo_length_norm: bool = True,
    rpo_alpha: float = 0.0,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pairwise DPO-family loss; the per-pair form is picked by `variant`.

  With rho = S - S_ref per response, h = rho_w - rho_l, z = beta h and
  l(z) = -log sigmoid(z) (docs/losses.md has the sources of each):

    * "sigmoid": (1-eps) l(z) + eps l(-z). eps = 0 is DPO; eps > 0 is cDPO.
    * "robust": [(1-eps) l(z) - eps l(-z)] / (1 - 2 eps) (Chowdhury et al. 2024).
    * "ipo": (h - 1/(2 beta))^2 (Azar et al.); `ipo_length_norm=True` (TRL) uses
      h = rho_w/|y_w| - rho_l/|y_l|, False the summed form.
    * "hinge": max(0, 1 - z) (SLiC / RSO).
    * "sigmoid_norm": l(beta (rho_w/|y_w| - rho_l/|y_l|)) (LN-DPO, = ln_dpo_loss).
    * "exo_pair": sigma(z)[log sigma(z) - log(1-eps)] + sigma(-z)[log sigma(-z) - log eps]
      (EXO; needs eps > 0).
    * "nca_pair": l(beta rho_w) + l(-beta rho_w)/2 + l(-beta rho_l)/2 (NCA).
    * "bco_pair": l(beta rho_w) + l(-beta rho_l) (paired BCO without the shift; the
      running-shift form is the registered loss "bco_pair").
    * "sppo_hard": (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2 (SPPO, hard P).
    * "aot": (1-eps) l(beta d) + eps l(-beta d), d = sort(S_w - S_l) - sort(S_ref_w -
      S_ref_l) over the batch; "aot_unpaired": d = sort(rho_w) - sort(rho_l) (AOT).
    * "apo_zero": 1 - sigma(beta rho_w) + sigma(beta rho_l); "apo_down": sigma(beta
      rho_w) + 1 - sigma(z) (APO).
    * "discopop": l(z)(1 - sigma(z/tau)) + exp(-z) sigma(z/tau) (DiscoPOP).
    * "sft": the batch's chosen-token NLL, sum(-S_w) / sum(|y_w|).

  A list of variants with `loss_weights` (TRL 1.x `loss_type=[...]`,
  `loss_weights=[...]`) is the weighted sum of their batch means (weights 1 when
  None). `ld_alpha` (LD-DPO, Liu et al. 2024): every log-prob, policy and
  reference, becomes S_shared + alpha * S_tail, where the tail is the tokens past
  the shorter response of the pair (S_tail from the step's tail columns).
  `use_weighting` (WPO, Zhou et al. 2024): each pair's loss is multiplied by
  exp(w_w) exp(w_l), w the per-token mean of log p_t - log sum_v p_v^2 (no
  gradient; from the step's wpo columns).

  Args:
    chosen_logps, rejected_logps: [B] summed log pi_theta(y | x) over response tokens.
    ref_chosen_logps, ref_rejected_logps: [B] the same under the reference (constants).
    chosen_lengths, rejected_lengths: [B] scored tokens, clamped to >= 1; needed by
      "ipo" (length-normalised), "sigmoid_norm", "sft" and rpo_alpha.
    chosen_tail_logps, ...: [B] summed log-probs of the tokens past the pair's
      shorter length (policy and reference); needed with ld_alpha.
    chosen_wpo_logps, rejected_wpo_logps: [B] WPO's per-token mean of
      log p_t - log sum_v p_v^2; needed with use_weighting.
    beta: inverse temperature (tau for IPO).
    label_smoothing: eps, for the variants that read it (see _SMOOTHED).
    variant: one name of VARIANTS, or a list of them.
    loss_weights: one weight per variant (None: all 1).
    reference_free: treat the reference log-probs as 0 (uniform reference).
    ipo_length_norm: IPO on per-token-mean log-ratios (TRL) instead of sums.
    rpo_alpha: weight of the chosen token-mean NLL added (TRL <= 0.28 `rpo_alpha`,
      RPO of Pang et al. 2024); the same term as variant "sft".
    ld_alpha: LD-DPO's weight on the tail tokens, in [0, 1]; None: off.
    use_weighting: WPO weights on every pair's loss.
    discopop_tau: DiscoPOP's modulation temperature (TRL default 0.05).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar, (weighted) mean over the B pairs (sum over variants).
    metrics: rewards/{chosen,rejected,margins,accuracies} (summed beta * rho, of the
      LD-weighted log-probs when ld_alpha is set, as TRL), logps/*, nll_loss with
      rpo_alpha or "sft", loss/<variant> with several variants, wpo/weight_mean with
      use_weighting.

  Raises:
    ValueError: at call/trace time for settings with no meaning (see _validate).
  """
  variants = variant_list(variant)
  tails = (chosen_tail_logps, rejected_tail_logps, ref_chosen_tail_logps,
           ref_rejected_tail_logps)
  if reference_free:
    tails = tails[:2] + (0.0, 0.0)
  _validate(variants, label_smoothing, beta, ipo_length_norm, chosen_lengths,
            rejected_lengths, loss_weights, ld_alpha, use_weighting,
            tails, (chosen_wpo_logps, rejected_wpo_logps))
  raw_chosen = as_f32(chosen_logps)
  if reference_free:
    ref_chosen_logps = jnp.zeros_like(raw_chosen)
    ref_rejected_logps = jnp.zeros_like(raw_chosen)
  if ld_alpha is not None:
    # LD-DPO: S_shared + alpha * S_tail = S - (1 - alpha) * S_tail, policy and reference.
    keep = 1.0 - ld_alpha
    chosen_logps = chosen_logps - keep * chosen_tail_logps
    rejected_logps = rejected_logps - keep * rejected_tail_logps
    if not reference_free:
      ref_chosen_logps = ref_chosen_logps - keep * jax.lax.stop_gradient(ref_chosen_tail_logps)
      ref_rejected_logps = (ref_rejected_logps
                            - keep * jax.lax.stop_gradient(ref_rejected_tail_logps))
  # Log-ratios first, in the inputs' precision, then float32 (see logratio).
  chosen_logratios = logratio(chosen_logps, ref_chosen_logps)       # [B]
  rejected_logratios = logratio(rejected_logps, ref_rejected_logps)  # [B]
  rc_logps = jax.lax.stop_gradient(as_f32(ref_chosen_logps))
  rr_logps = jax.lax.stop_gradient(as_f32(ref_rejected_logps))
  chosen_logps, rejected_logps = as_f32(chosen_logps), as_f32(rejected_logps)
  chosen_rewards = beta * chosen_logratios                           # [B]
  rejected_rewards = beta * rejected_logratios                       # [B]

  w = jnp.ones_like(raw_chosen) if weights is None else as_f32(weights)
  c_len = r_len = None
  if chosen_lengths is not None and rejected_lengths is not None:
    c_len = jnp.maximum(as_f32(chosen_lengths), 1.0)
    r_len = jnp.maximum(as_f32(rejected_lengths), 1.0)
  sft_nll = None
  if "sft" in variants or rpo_alpha:
    if chosen_lengths is None:
      raise ValueError("rpo_alpha > 0 / variant 'sft' needs chosen_lengths")
    num_tokens = jnp.maximum((w * as_f32(chosen_lengths)).sum(), 1.0)
    sft_nll = -(w * raw_chosen).sum() / num_tokens    # the raw log-probs, not LD-weighted
  pair_weight = 1.0
  if use_weighting:
    pair_weight = jax.lax.stop_gradient(
        jnp.exp(as_f32(chosen_wpo_logps)) * jnp.exp(as_f32(rejected_wpo_logps)))

  mean = weighted_mean(weights, raw_chosen)
  metrics = pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, mean)
  eps = label_smoothing
  coefs = (1.0,) * len(variants) if loss_weights is None else tuple(loss_weights)
  loss = 0.0
  for name, coef in zip(variants, coefs):
    per_pair = _per_pair(
        name, beta=beta, eps=eps, cl=chosen_logratios, rl=rejected_logratios,
        c_logps=chosen_logps, r_logps=rejected_logps, rc_logps=rc_logps, rr_logps=rr_logps,
        c_len=c_len, r_len=r_len, ipo_length_norm=ipo_length_norm,
        discopop_tau=discopop_tau, sft_nll=sft_nll) * pair_weight    # [B]
    term = mean(per_pair)
    if len(variants) > 1:
      metrics[f"loss/{name}"] = term
    loss = loss + coef * term
  if sft_nll is not None:
    metrics["nll_loss"] = sft_nll
  if rpo_alpha:
    loss = loss + rpo_alpha * sft_nll
  if use_weighting:
    metrics["wpo/weight_mean"] = mean(pair_weight * jnp.ones_like(raw_chosen))
  return loss, metrics


def check_hparams(hparams: dict) -> tuple[str, str] | None:
  """Config-time check of dpo_loss's non-numeric settings: (key, problem) or None.

  Everything _validate checks that does not need arrays: variant names, the
  loss_weights length, label_smoothing relevance, WPO with AOT.
  """
  variant = hparams.get("variant", "sigmoid")
  try:
    variants = variant_list(variant)
    one = 0.0  # stands for every array: only the settings are checked here
    _validate(variants, hparams.get("label_smoothing", 0.0), hparams.get("beta", 0.1),
              hparams.get("ipo_length_norm", True), one, one, hparams.get("loss_weights"),
              hparams.get("ld_alpha"), hparams.get("use_weighting", False),
              (one,) * 4, (one,) * 2)
  except (ValueError, TypeError) as e:
    text = str(e)
    key = next((k for k in ("loss_weights", "label_smoothing", "ld_alpha", "use_weighting",
                            "beta") if text.startswith(k) or f" {k}" in text), "variant")
    return key, text
  return None
