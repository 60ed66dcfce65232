"""AFT: Alignment Fine-Tuning with the constraint alignment loss (Wang et al., arXiv 2309.02144v1).

The math, its (mostly secondary) sources and the reconstructions are in
docs/losses.md, `aft`. The pairwise constraint term is a separate public
function, `constraint_alignment_loss`, so that other pairwise losses can reuse
it: it only needs a score per candidate and which candidate should beat which.
"""

import jax
import jax.numpy as jnp

from jaxalign.losses.registry import register

_CONSTRAINTS = ("none", "detached", "boundary", "ranking")
_PAIR_CONSTRAINTS = ("none", "detached", "boundary")


def constraint_alignment_loss(
    scores: jax.Array,
    pair_mask: jax.Array,
    *,
    constraint: str = "detached",
    boundary_margin: float | None = None,
    detach_boundary: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-row log(1 + sum over pairs i > j of exp(s_j - s_i) [+ exp(T_ij - s_j)]).

  "none" is L_A; "detached" (DC) is L_A with s_j under stop-gradient (same
  value, the worse candidate gets no gradient); "boundary" (BC) adds
  exp(T_ij - s_j), T_ij = 2 B_j - s_i, B_j = min_{i > j} s_i - boundary_margin,
  which makes each pair's term stationary in s_j exactly at s_j = B_j. With
  binary labels (pair_mask[i, j] = positive_i and negative_j) B_j is the
  paper's B = min_p s(p) - beta_B for every negative.

  Args:
    scores: [B, G] candidate scores (AFT: length-normalised log-likelihoods).
    pair_mask: [B, G, G] True where candidate i should score above candidate j.
    constraint: "none", "detached" or "boundary".
    boundary_margin: beta_B of the boundary; required for "boundary".
    detach_boundary: stop the gradient through T_ij, s_i and min s_i inside it
      included (default; reconstruction, without it BC pushes the weakest
      positive down). False only for experiments.

  Returns:
    loss: [B]; exactly 0 (log 1) with gradient 0 for a row without pairs.
    parts: [B] arrays "align" (L_A's value, without the boundary part),
      "constraint" (loss - align: what the boundary adds, 0 unless BC),
      [B, G] "boundary" (B_j, 0 where j has no better candidate) and [B, G]
      "has_better" (j is the worse side of at least one pair).
  """
  if constraint not in _PAIR_CONSTRAINTS:
    raise ValueError(f"constraint must be one of {_PAIR_CONSTRAINTS}, got {constraint!r}")
  if constraint == "boundary" and boundary_margin is None:
    raise ValueError('constraint="boundary" needs boundary_margin (beta_B); it has no default')
  pair_mask = pair_mask.astype(bool)
  s = scores.astype(jnp.float32)
  s_better = s[:, :, None]                                               # [B, G, 1] s_i
  s_worse = s[:, None, :]                                                # [B, 1, G] s_j
  if constraint == "detached":
    s_worse = jax.lax.stop_gradient(s_worse)
  # log(1 + sum_k exp(a_k)) == logsumexp([0, a_1, ...]); the 0 entry keeps an
  # empty pair set at exactly log 1 = 0 with a finite (zero) gradient.
  neg_inf = jnp.asarray(-jnp.inf, jnp.float32)
  align_logits = jnp.where(pair_mask, s_worse - s_better, neg_inf)       # [B, G, G]
  zeros = jnp.zeros(s.shape[:1] + (1,), jnp.float32)
  batch = s.shape[0]
  align = jax.nn.logsumexp(
      jnp.concatenate([zeros, align_logits.reshape(batch, -1)], -1), axis=-1)  # [B]

  has_better = pair_mask.any(axis=1)                                     # [B, G] over i
  if constraint == "boundary":
    # B_j = min over the candidates that should beat j; +inf placeholders are
    # replaced before any arithmetic so no inf reaches a gradient.
    min_better = jnp.min(jnp.where(pair_mask, s_better, jnp.inf), axis=1)  # [B, G]
    boundary = jnp.where(has_better, min_better, 0.0) - boundary_margin
    target = 2.0 * boundary[:, None, :] - s_better                       # [B, G, G] T_ij
    if detach_boundary:
      target = jax.lax.stop_gradient(target)
    bound_logits = jnp.where(pair_mask, target - s_worse, neg_inf)
    loss = jax.nn.logsumexp(
        jnp.concatenate([zeros, align_logits.reshape(batch, -1),
                         bound_logits.reshape(batch, -1)], -1), axis=-1)
    boundary = jnp.where(has_better, boundary, 0.0)
  else:
    loss = align
    boundary = jnp.zeros_like(s)
  parts = {"align": align, "constraint": loss - align, "boundary": boundary,
           "has_better": has_better}
  return loss, parts


@register(data="ranked", needs_ref=False, name="aft", online=None,
          ranges={"vft_weight": "[0, inf)"})
def aft_loss(
    group_logps: jax.Array,
    group_lengths: jax.Array,
    group_mask: jax.Array,
    is_positive: jax.Array,
    answer_logps: jax.Array,
    answer_lengths: jax.Array,
    ranks: jax.Array | None = None,
    *,
    constraint: str = "detached",
    boundary_margin: float | None = None,
    vft_weight: float = 1.0,
    detach_boundary: bool = True,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """AFT loss vft_weight * L_VFT + L_A^{none|DC|BC|RBC} (arXiv 2309.02144v1, section 4).

  Scores are s(c) = S_theta(c) / |c| (no reference model). The alignment term
  sums over every (positive, negative) pair of a question, or every ordered
  pair i > j of a ranking; see `constraint_alignment_loss`.

  Args:
    group_logps: [B, G] summed log pi_theta(c | q) of the k sampled CoTs.
    group_lengths: [B, G] scored tokens of each CoT.
    group_mask: [B, G] True where a slot holds a real candidate (ragged sets).
    is_positive: [B, G] True for a correct final answer (G_P), False for G_N.
    answer_logps: [B] summed log pi_theta of the reference CoT (VFT target).
    answer_lengths: [B] scored tokens of the reference CoT.
    ranks: [B, G] for constraint="ranking" only: a lower rank is better
      (c_1 > ... > c_k as ranks 1..k); equal ranks form no pair.
    constraint: "detached" (default, a jaxalign choice: fully specified),
      "boundary" (BC), "none" (plain L_A, no constraint) or "ranking" (RBC,
      reconstruction: BC over every ranked pair, j's boundary from the
      candidates ranked above it).
    boundary_margin: beta_B of BC/RBC; no established value, so required there.
    vft_weight: weight of the token-mean NLL of the reference CoT (1 is a
      reconstruction).
    detach_boundary: stop-gradient on T_p (default; reconstruction).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar; a question with an empty G_P or G_N contributes log 1 = 0.
    metrics: scalars loss/{vft,align,constraint}, scores/{pos_mean,neg_mean,
      margin,boundary,pair_accuracy}, constraint/below_boundary_frac.
  """
  if constraint not in _CONSTRAINTS:
    raise ValueError(f"constraint must be one of {_CONSTRAINTS}, got {constraint!r}")
  if constraint in ("boundary", "ranking") and boundary_margin is None:
    raise ValueError(f"constraint={constraint!r} needs boundary_margin (beta_B); "
                     "it has no default")
  if constraint == "ranking" and ranks is None:
    raise ValueError('constraint="ranking" needs ranks')

  mask = group_mask.astype(bool)
  positive = mask & is_positive.astype(bool)                             # [B, G]
  negative = mask & ~is_positive.astype(bool)
  logps = jnp.where(mask, group_logps.astype(jnp.float32), 0.0)
  lengths = jnp.where(mask, group_lengths.astype(jnp.float32), 1.0)
  scores = logps / jnp.maximum(lengths, 1.0)                             # [B, G] s(c)

  if constraint == "ranking":
    better = ranks[:, :, None] < ranks[:, None, :]                       # i ranked above j
    pair_mask = mask[:, :, None] & mask[:, None, :] & better
    pair_constraint = "boundary"
  else:
    pair_mask = positive[:, :, None] & negative[:, None, :]             # [B, G, G]
    pair_constraint = constraint
  align, parts = constraint_alignment_loss(
      scores, pair_mask, constraint=pair_constraint, boundary_margin=boundary_margin,
      detach_boundary=detach_boundary)                                   # [B]

  w = (jnp.ones(scores.shape[:1], jnp.float32) if weights is None
       else weights.astype(jnp.float32))
  mean = lambda x: (w * x).sum() / jnp.maximum(w.sum(), 1.0)

  def pooled(x, m):  # weighted mean of x over the entries where m holds
    wm = m.astype(jnp.float32) * w.reshape(w.shape + (1,) * (m.ndim - 1))
    return (wm * x).sum() / jnp.maximum(wm.sum(), 1.0)

  num_answer_tokens = jnp.maximum((w * answer_lengths.astype(jnp.float32)).sum(), 1.0)
  vft = -(w * answer_logps.astype(jnp.float32)).sum() / num_answer_tokens

  has_both = positive.any(-1) & negative.any(-1)                         # [B]
  min_pos = jnp.min(jnp.where(positive, scores, jnp.inf), -1)
  max_neg = jnp.max(jnp.where(negative, scores, -jnp.inf), -1)
  margin = jnp.where(has_both, min_pos - max_neg, 0.0)
  pair_correct = (scores[:, :, None] > scores[:, None, :]).astype(jnp.float32)
  metrics = {
      "loss/vft": vft,
      "loss/align": mean(align),
      "loss/constraint": mean(parts["constraint"]),
      "scores/pos_mean": pooled(scores, positive),
      "scores/neg_mean": pooled(scores, negative),
      "scores/margin": pooled(margin, has_both),
      "scores/pair_accuracy": pooled(pair_correct, pair_mask),
  }
  if pair_constraint == "boundary":
    has_better = parts["has_better"]
    metrics["scores/boundary"] = pooled(parts["boundary"], has_better)
    metrics["constraint/below_boundary_frac"] = pooled(
        (scores < parts["boundary"]).astype(jnp.float32), has_better)
  loss = vft_weight * vft + mean(align)
  return loss, metrics
