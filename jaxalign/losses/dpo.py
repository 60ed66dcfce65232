"""DPO (Rafailov et al. 2023) and its usual variants as pure functions.

The math and its invariants are in docs/losses.md (`dpo`, and its "Invariants"), and the sources
of TRL's other loss types in docs/losses.md. With rho = S - S_ref per response
(summed policy minus reference log-prob), h = rho_w - rho_l, the margin
z = beta h and l(z) = -log sigmoid(z), the per-pair losses come in families:

  * margin losses, a function of z alone: sigmoid_loss (DPO, cDPO), robust_loss,
    hinge_loss, exo_pair_loss, discopop_loss; aot_loss applies sigmoid_loss to
    rank-matched differences over the batch;
  * squared-target losses (IPO family): ipo_loss, sppo_hard_loss;
  * anchored losses, of each response's own reward r = beta rho: nca_pair_loss,
    bco_pair_loss, apo_zero_loss, apo_down_loss.

Each is a small function of [B] arrays returning [B]. `dpo_loss`, the registered
"dpo" loss, combines them by name (`variant`: one name or TRL's weighted list)
and adds what every variant shares: reference-free rows, LD-DPO's tail
weighting, WPO's pair weights, the RPO / "sft" chosen NLL and TRL's metrics.
"""

import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.losses._common import as_f32, logratio, pair_metrics, weighted_mean
from jaxalign.losses.registry import register

# softplus(-z) == -log sigmoid(z) == l(z), finite for large |z|.
_sp = jax.nn.softplus


# --- margin losses: l-shaped functions of z = beta * h --------------------------------
def sigmoid_loss(margins: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """DPO (Rafailov et al. 2023, Eq. 7); cDPO (Mitchell's note) when eps > 0.

  (1 - eps) l(z) + eps l(-z): the label is flipped with probability eps.

  Args:
    margins: [B] z = beta * (rho_w - rho_l).
    label_smoothing: eps in [0, 0.5].

  Returns:
    [B] per-pair loss.
  """
  return (1.0 - label_smoothing) * _sp(-margins) + label_smoothing * _sp(margins)


def robust_loss(margins: jax.Array, label_smoothing: float) -> jax.Array:
  """Robust DPO (Chowdhury et al. 2024): [(1-eps) l(z) - eps l(-z)] / (1 - 2 eps).

  Unbiased under a label flip rate eps in [0, 0.5); unbounded below for eps > 0.
  margins: [B] z; returns [B].
  """
  eps = label_smoothing
  return ((1.0 - eps) * _sp(-margins) - eps * _sp(margins)) / (1.0 - 2.0 * eps)


def hinge_loss(margins: jax.Array) -> jax.Array:
  """SLiC / RSO hinge: max(0, 1 - z) (beta is the reciprocal margin). [B] -> [B]."""
  return jax.nn.relu(1.0 - margins)


def exo_pair_loss(margins: jax.Array, label_smoothing: float) -> jax.Array:
  """EXO (Ji et al. 2024, Eq. 16, K = 2): KL(softmax(beta rho) || [1 - eps, eps]).

  sigma(z)[log sigma(z) - log(1-eps)] + sigma(-z)[log sigma(-z) - log eps];
  needs eps > 0 (its authors use 1e-3). margins: [B] z; returns [B].
  """
  eps = label_smoothing
  return (jax.nn.sigmoid(margins) * (-_sp(-margins) - jnp.log1p(-eps))
          + jax.nn.sigmoid(-margins) * (-_sp(margins) - jnp.log(eps)))


def discopop_loss(margins: jax.Array, tau: float = 0.05) -> jax.Array:
  """DiscoPOP (Chris Lu et al. 2024, Eq. 5): l(z)(1 - sigma(z/tau)) + exp(-z) sigma(z/tau).

  A log-ratio-modulated blend of the logistic and exponential losses. The
  exponential part is formed in log space, exp(-z - softplus(-z/tau)), so a very
  negative z gives 0, not 0 * inf = NaN. margins: [B] z; returns [B].
  """
  m = jax.nn.sigmoid(margins / tau)
  return _sp(-margins) * (1.0 - m) + jnp.exp(-margins - _sp(-margins / tau))


def aot_loss(chosen: jax.Array, rejected: jax.Array, *, beta: float,
             label_smoothing: float = 0.0) -> jax.Array:
  """AOT (Melnyk et al. 2024): sigmoid_loss of beta d, d = sort(chosen) - sort(rejected).

  The two [B] quantities are matched by rank over the batch, so a pair's value
  depends on the other pairs. Paired AOT ("aot") passes the policy margins
  S_w - S_l and the reference margins S_ref,w - S_ref,l; unpaired
  ("aot_unpaired") passes rho_w and rho_l. Returns [B].
  """
  return sigmoid_loss(beta * _sorted_difference(chosen, rejected), label_smoothing)


def _sorted_difference(chosen, rejected) -> jax.Array:
  """[B] sort(chosen) - sort(rejected) in the inputs' precision, then float32.

  The margins are differences of large log-probs, and the matched differences
  small: subtracting after a float32 cast would lose their digits. NumPy inputs
  are sorted by NumPy, so float64 survives without JAX's x64 mode too.
  """
  if isinstance(chosen, np.ndarray) and isinstance(rejected, np.ndarray):
    return as_f32(np.sort(chosen) - np.sort(rejected))
  return as_f32(jnp.sort(chosen) - jnp.sort(rejected))


# --- squared-target losses (IPO family) -----------------------------------------------
def ipo_loss(h: jax.Array, *, beta: float) -> jax.Array:
  """IPO (Azar et al. 2023): (h - 1/(2 tau))^2, tau passed as beta (as TRL).

  h: [B] log-ratio difference, summed or per-token-mean (dpo_loss's
  ipo_length_norm). Minimised at h = 1/(2 beta). Returns [B].
  """
  return jnp.square(h - 1.0 / (2.0 * beta))


def sppo_hard_loss(chosen_logratios: jax.Array, rejected_logratios: jax.Array, *,
                   beta: float) -> jax.Array:
  """SPPO (Wu et al. 2024) with hard win probabilities 1 / 0.

  (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2; rho: [B] log-ratios. Returns [B].
  """
  return jnp.square(chosen_logratios - 0.5 / beta) + jnp.square(rejected_logratios + 0.5 / beta)


# --- anchored losses: each response's own reward r = beta * rho -----------------------
def nca_pair_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
  """NCA (Chen et al. 2024): l(r_w) + l(-r_w)/2 + l(-r_l)/2. r: [B]; returns [B]."""
  return _sp(-chosen_rewards) + 0.5 * _sp(chosen_rewards) + 0.5 * _sp(rejected_rewards)


def bco_pair_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
  """Paired BCO without the reward shift (TRL >= 0.29): l(r_w) + l(-r_l).

  The running-shift form is the registered loss "bco_pair". r: [B]; returns [B].
  """
  return _sp(-chosen_rewards) + _sp(rejected_rewards)


def apo_zero_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
  """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): 1 - sigma(r_w) + sigma(r_l). [B] -> [B].

  1 - sigma(x) is computed as sigma(-x): no cancellation when the loss is small
  (r_w large), where 1 - sigma(x) in float32 keeps only a few digits.
  """
  return jax.nn.sigmoid(-chosen_rewards) + jax.nn.sigmoid(rejected_rewards)


def apo_down_loss(chosen_rewards: jax.Array, margins: jax.Array) -> jax.Array:
  """APO-down (D'Oosterlinck et al. 2024, Eq. 8): sigma(r_w) + 1 - sigma(z). [B] -> [B].

  1 - sigma(z) as sigma(-z), as apo_zero_loss.
  """
  return jax.nn.sigmoid(chosen_rewards) + jax.nn.sigmoid(-margins)


# --- what dpo_loss shares across variants ----------------------------------------------
def ld_logps(logps: jax.Array, tail_logps: jax.Array, ld_alpha: float) -> jax.Array:
  """LD-DPO (Liu et al. 2024): S_shared + alpha S_tail = S - (1 - alpha) S_tail.

  logps, tail_logps: [B] summed log-probs of the response and of its tokens past
  the pair's shorter length. Returns [B], in the inputs' precision.
  """
  return logps - (1.0 - ld_alpha) * tail_logps


def wpo_weights(chosen_wpo_logps: jax.Array, rejected_wpo_logps: jax.Array) -> jax.Array:
  """WPO (Zhou et al. 2024): [B] pair weights exp(w_w) exp(w_l), no gradient.

  w: [B] per-token mean of log p_t - log sum_v p_v^2 (the step's wpo_logps column).
  """
  return jax.lax.stop_gradient(
      jnp.exp(as_f32(chosen_wpo_logps)) * jnp.exp(as_f32(rejected_wpo_logps)))


def chosen_nll(chosen_logps: jax.Array, chosen_lengths: jax.Array,
               weights: jax.Array) -> jax.Array:
  """The batch's chosen-token NLL sum(-S_w) / sum(|y_w|) (RPO's term, variant "sft").

  chosen_logps, chosen_lengths, weights: [B] (weights 0 on padding rows). Returns [].
  """
  num_tokens = jnp.maximum((weights * as_f32(chosen_lengths)).sum(), 1.0)
  return -(weights * as_f32(chosen_logps)).sum() / num_tokens


class PairTerms(NamedTuple):
  """The [B] float32 quantities the per-pair losses read (built once by dpo_loss)."""
  chosen_logratios: jax.Array       # rho_w
  rejected_logratios: jax.Array     # rho_l
  chosen_rewards: jax.Array         # beta rho_w
  rejected_rewards: jax.Array       # beta rho_l
  margins: jax.Array                # z = beta (rho_w - rho_l)
  chosen_logps: jax.Array           # S_w (LD-weighted with ld_alpha)
  rejected_logps: jax.Array
  # AOT's inputs, in the inputs' precision (not cast: aot_loss subtracts first).
  policy_margins: jax.Array         # S_w - S_l
  ref_margins: jax.Array            # S_ref,w - S_ref,l, no gradient
  raw_logratios: tuple              # (rho_w, rho_l) before the float32 cast
  chosen_lengths: jax.Array | None  # |y_w| clamped to >= 1
  rejected_lengths: jax.Array | None
  sft_nll: jax.Array | None         # [] chosen_nll, when a variant or rpo_alpha reads it


class Knobs(NamedTuple):
  """dpo_loss's hyperparameters that the per-pair losses read."""
  beta: float
  label_smoothing: float
  ipo_length_norm: bool
  discopop_tau: float


def _per_token_h(x: PairTerms) -> jax.Array:
  """[B] rho_w / |y_w| - rho_l / |y_l| (LN-DPO, length-normalised IPO)."""
  return x.chosen_logratios / x.chosen_lengths - x.rejected_logratios / x.rejected_lengths


def _ipo_h(x: PairTerms, k: Knobs) -> jax.Array:
  return _per_token_h(x) if k.ipo_length_norm else x.chosen_logratios - x.rejected_logratios


# The per-pair form of each DPO loss type, (terms, knobs) -> [B]. The first four are
# the seed methods; the rest are TRL DPOTrainer's other loss types (TRL 1.16
# `loss_type`), names as TRL spells them.
PER_PAIR: dict[str, Callable[[PairTerms, Knobs], jax.Array]] = {
    "sigmoid": lambda x, k: sigmoid_loss(x.margins, k.label_smoothing),
    "robust": lambda x, k: robust_loss(x.margins, k.label_smoothing),
    "ipo": lambda x, k: ipo_loss(_ipo_h(x, k), beta=k.beta),
    "hinge": lambda x, k: hinge_loss(x.margins),
    # LN-DPO, l(beta h) of per-token-mean log-ratios (= ln_dpo_loss; no eps term, so
    # no 0 * inf where h is infinite).
    "sigmoid_norm": lambda x, k: _sp(-k.beta * _per_token_h(x)),
    "exo_pair": lambda x, k: exo_pair_loss(x.margins, k.label_smoothing),
    "nca_pair": lambda x, k: nca_pair_loss(x.chosen_rewards, x.rejected_rewards),
    "bco_pair": lambda x, k: bco_pair_loss(x.chosen_rewards, x.rejected_rewards),
    "sppo_hard": lambda x, k: sppo_hard_loss(x.chosen_logratios, x.rejected_logratios,
                                             beta=k.beta),
    "aot": lambda x, k: aot_loss(x.policy_margins, x.ref_margins,
                                 beta=k.beta, label_smoothing=k.label_smoothing),
    "aot_unpaired": lambda x, k: aot_loss(*x.raw_logratios,
                                          beta=k.beta, label_smoothing=k.label_smoothing),
    "apo_zero": lambda x, k: apo_zero_loss(x.chosen_rewards, x.rejected_rewards),
    "apo_down": lambda x, k: apo_down_loss(x.chosen_rewards, x.margins),
    "discopop": lambda x, k: discopop_loss(x.margins, k.discopop_tau),
    # The batch's chosen-token NLL, the same value on every pair (as TRL).
    "sft": lambda x, k: jnp.broadcast_to(x.sft_nll, x.chosen_logratios.shape),
}
VARIANTS = tuple(PER_PAIR)
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
  _validate_variants(variants, label_smoothing, beta, ipo_length_norm, chosen_lengths,
                     rejected_lengths, loss_weights)
  _validate_columns(variants, ld_alpha, use_weighting, tails, wpo)


def _validate_variants(variants, label_smoothing, beta, ipo_length_norm,
                       chosen_lengths, rejected_lengths, loss_weights) -> None:
  """The loss types, their weights and the hyperparameters they read."""
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


def _validate_columns(variants, ld_alpha, use_weighting, tails, wpo) -> None:
  """LD-DPO's and WPO's settings and the step columns they need."""
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


def _pair_terms(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths, beta) -> PairTerms:
  """PairTerms of (LD-weighted) log-probs [B]; sft_nll is left None."""
  ref_chosen_logps, ref_rejected_logps = _no_grad(ref_chosen_logps), _no_grad(ref_rejected_logps)
  # Log-ratios first, in the inputs' precision, then float32 (see logratio).
  chosen_logratios = logratio(chosen_logps, ref_chosen_logps)        # [B]
  rejected_logratios = logratio(rejected_logps, ref_rejected_logps)  # [B]
  c_len = r_len = None
  if chosen_lengths is not None and rejected_lengths is not None:
    c_len = jnp.maximum(as_f32(chosen_lengths), 1.0)
    r_len = jnp.maximum(as_f32(rejected_lengths), 1.0)
  return PairTerms(
      chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
      chosen_rewards=beta * chosen_logratios, rejected_rewards=beta * rejected_logratios,
      margins=beta * (chosen_logratios - rejected_logratios),
      chosen_logps=as_f32(chosen_logps), rejected_logps=as_f32(rejected_logps),
      policy_margins=chosen_logps - rejected_logps,
      ref_margins=ref_chosen_logps - ref_rejected_logps,
      raw_logratios=(chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps),
      chosen_lengths=c_len, rejected_lengths=r_len, sft_nll=None)


def _effective_logps(logps, tails, reference_free, ld_alpha):
  """The [B] (S_w, S_l, S_ref,w, S_ref,l) the losses see: reference 0 when reference-free,
  each LD-weighted (ld_logps; reference tails without gradient) when ld_alpha is set."""
  chosen, rejected, ref_chosen, ref_rejected = logps
  if reference_free:
    ref_chosen = ref_rejected = jnp.zeros_like(as_f32(chosen))
  if ld_alpha is None:
    return chosen, rejected, ref_chosen, ref_rejected
  chosen = ld_logps(chosen, tails[0], ld_alpha)
  rejected = ld_logps(rejected, tails[1], ld_alpha)
  if not reference_free:
    ref_chosen = ld_logps(ref_chosen, _no_grad(tails[2]), ld_alpha)
    ref_rejected = ld_logps(ref_rejected, _no_grad(tails[3]), ld_alpha)
  return chosen, rejected, ref_chosen, ref_rejected


def _no_grad(x):
  """stop_gradient on a JAX array; a NumPy array (a constant) is left as it is, so a
  float64 one keeps its precision without JAX's x64 mode (as logratio)."""
  return jax.lax.stop_gradient(x) if isinstance(x, jax.Array) else x


def _variants_sum(variants, loss_weights, x: PairTerms, knobs: Knobs, pair_weight, mean,
                  metrics: dict) -> jax.Array:
  """sum_k weight_k * mean(PER_PAIR[variant_k] * pair_weight); adds loss/<variant>
  to `metrics` when there are several."""
  coefs = (1.0,) * len(variants) if loss_weights is None else tuple(loss_weights)
  loss = 0.0
  for name, coef in zip(variants, coefs):
    term = mean(PER_PAIR[name](x, knobs) * pair_weight)
    if len(variants) > 1:
      metrics[f"loss/{name}"] = term
    loss = loss + coef * term
  return loss


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
  """Pairwise DPO-family loss: the weighted sum of the PER_PAIR losses named by `variant`.

  Formulas and sources are on each variant's function (module docstring);
  "sigmoid_norm" is l(beta h) of per-token-mean log-ratios (LN-DPO), "sft" the
  chosen_nll. Shared by every variant: `ld_alpha` turns each log-prob, policy and
  reference, into ld_logps; `use_weighting` multiplies each pair's loss by
  wpo_weights; `rpo_alpha` adds rpo_alpha * chosen_nll (RPO, TRL <= 0.28).

  Args:
    chosen_logps, rejected_logps: [B] summed log pi_theta(y | x) over response tokens.
    ref_chosen_logps, ref_rejected_logps: [B] the same under the reference (constants).
    chosen_lengths, rejected_lengths: [B] scored tokens (clamped to >= 1); read by
      "ipo" (length-normalised), "sigmoid_norm", "sft" and rpo_alpha.
    chosen_tail_logps, ...: [B] the step's tail_logps column, policy and reference.
    chosen_wpo_logps, rejected_wpo_logps: [B] the step's wpo_logps column.
    beta: inverse temperature (tau for IPO). label_smoothing: eps (see _SMOOTHED).
    variant, loss_weights: one name of VARIANTS, or TRL 1.x's list `loss_type=[...]`
      with one weight each (None: all 1).
    reference_free: reference log-probs 0. ipo_length_norm: IPO on per-token means.
    ld_alpha: LD-DPO's tail weight in [0, 1] (None: off). use_weighting: WPO.
    discopop_tau: DiscoPOP's temperature. weights: [B] row weights (0: padding).

  Returns:
    loss: scalar, (weighted) mean over the B pairs, summed over variants.
    metrics: rewards/* (beta * rho of the LD-weighted log-probs, as TRL), logps/*,
      nll_loss (rpo_alpha or "sft"), loss/<variant> (several), wpo/weight_mean.

  Raises ValueError at call/trace time for settings with no meaning (_validate).
  """
  variants = variant_list(variant)
  logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
  tails = (chosen_tail_logps, rejected_tail_logps) + (
      (0.0, 0.0) if reference_free else (ref_chosen_tail_logps, ref_rejected_tail_logps))
  _validate(variants, label_smoothing, beta, ipo_length_norm, chosen_lengths,
            rejected_lengths, loss_weights, ld_alpha, use_weighting,
            tails, (chosen_wpo_logps, rejected_wpo_logps))
  raw_chosen = as_f32(chosen_logps)
  x = _pair_terms(*_effective_logps(logps, tails, reference_free, ld_alpha),
                  chosen_lengths, rejected_lengths, beta)
  if "sft" in variants or rpo_alpha:
    if chosen_lengths is None:
      raise ValueError("rpo_alpha > 0 / variant 'sft' needs chosen_lengths")
    w = jnp.ones_like(raw_chosen) if weights is None else as_f32(weights)
    x = x._replace(sft_nll=chosen_nll(raw_chosen, chosen_lengths, w))  # not LD-weighted
  pair_weight = wpo_weights(chosen_wpo_logps, rejected_wpo_logps) if use_weighting else 1.0
  mean = weighted_mean(weights, raw_chosen)
  metrics = pair_metrics(x.chosen_rewards, x.rejected_rewards, x.chosen_logps,
                         x.rejected_logps, mean)
  loss = _variants_sum(variants, loss_weights, x,
                       Knobs(beta, label_smoothing, ipo_length_norm, discopop_tau),
                       pair_weight, mean, metrics)
  if x.sft_nll is not None:
    metrics["nll_loss"] = x.sft_nll
  if rpo_alpha:
    loss = loss + rpo_alpha * x.sft_nll
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
