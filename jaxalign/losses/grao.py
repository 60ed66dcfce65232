"""GRAO: Group Relative Alignment Optimization (Wang et al., arXiv 2508.07750v1).

The math, its sources and the decisions taken on the paper's ambiguities are in
docs/losses.md, `grao`. GRAO needs no reference model: "reference" means
the dataset's reference answer y, whose inputs are named `answer_*`.
"""

import jax
import jax.numpy as jnp

from jaxalign.losses.registry import register

_REFERENCE_REWARDS = ("zero", "judge")
_ZERO_STD = ("eps", "zero")
# A normalisation set whose population std is at most STD_FLOOR * max(1, max |R|)
# is a tie (every advantage 0). float32 rewards carry about 7 significant digits:
# a spread of 1e-5 of the rewards' scale is rounding noise (~100 ulps), which
# dividing by sigma (+ std_eps) would blow up to advantages of order one or, for the
# answer under G-only, to |R_y - mu| / sigma ~ 1e6.
STD_FLOOR = 1e-5


def grao_advantages(
    group_rewards: jax.Array,
    group_mask: jax.Array,
    answer_rewards: jax.Array,
    *,
    group_includes_reference: bool = True,
    std_eps: float = 1e-6,
    zero_std: str = "eps",
    std_floor: float = STD_FLOOR,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Group-relative advantages of the samples and of the reference answer (Eq. 4).

  A = (R - mu) / sigma with the population std. The normalisation set is the
  group's real samples, plus the answer when group_includes_reference.

  Args:
    group_rewards: [B, G] R(o_i, y); padding slots are ignored.
    group_mask: [B, G] True where a slot holds a real sample.
    answer_rewards: [B] R(y, y), the answer's own reward.
    group_includes_reference: y's reward enters mu and sigma (G+1, default) or
      not (G-only, Eq. 4 read literally; A_y is still (R_y - mu) / sigma).
    std_eps: added to sigma ("eps" guard).
    zero_std: "eps": divide by sigma + std_eps; "zero": divide by sigma. In both,
      a tie set (below) gets A = 0 for every member and for y.
    std_floor: a set is a tie when its std is at most std_floor * max(1, max |R|
      over the set) (STD_FLOOR: near-equal float32 rewards, e.g. [1, 1, 1, 1 + 1e-7],
      are rounding noise, not a ranking); 0: only exactly equal rewards.

  Returns:
    group_adv: [B, G], 0 in padding slots.
    answer_adv: [B]; 0 for a row with no real sample in the G-only reading.
    mu: [B] mean reward of the normalisation set.
    sigma: [B] its population std (without std_eps); 0 for a tie set.
  """
  if zero_std not in _ZERO_STD:
    raise ValueError(f"zero_std must be one of {_ZERO_STD}, got {zero_std!r}")
  # Advantages are weights from rewards only: never differentiate through them.
  rewards = jax.lax.stop_gradient(group_rewards.astype(jnp.float32))    # [B, G]
  answer = jax.lax.stop_gradient(answer_rewards.astype(jnp.float32))    # [B]
  mask = group_mask.astype(bool)
  fmask = mask.astype(jnp.float32)
  num_samples = fmask.sum(-1)                                            # [B]
  has_samples = num_samples > 0
  incl = 1.0 if group_includes_reference else 0.0

  # Centre on the set's largest reward first: a constant set then has deviations
  # that are exactly 0 (no rounding in the mean), so sigma == 0 exactly and
  # every advantage is exactly 0 under the eps guard.
  pivot = jnp.max(jnp.where(mask, rewards, -jnp.inf), axis=-1)            # [B]
  if group_includes_reference:
    pivot = jnp.maximum(pivot, answer)
  pivot = jnp.where(jnp.isfinite(pivot), pivot, 0.0)
  d = jnp.where(mask, rewards - pivot[:, None], 0.0)                     # [B, G]
  d_answer = answer - pivot                                              # [B]
  count = jnp.maximum(num_samples + incl, 1.0)
  mu_c = (d.sum(-1) + incl * d_answer) / count
  dev = jnp.where(mask, d - mu_c[:, None], 0.0)                          # [B, G]
  dev_answer = d_answer - mu_c                                           # [B]
  var = ((dev * dev).sum(-1) + incl * dev_answer * dev_answer) / count
  sigma = jnp.sqrt(var)                                                  # [B]
  # The tie floor scales with the set's largest |R|: float32 noise is relative.
  scale = jnp.max(jnp.where(mask, jnp.abs(rewards), 0.0), axis=-1)
  if group_includes_reference:
    scale = jnp.maximum(scale, jnp.abs(answer))
  spread = sigma > std_floor * jnp.maximum(scale, 1.0)                  # [B] not a tie
  sigma = jnp.where(spread, sigma, 0.0)

  # A tie set (all rewards equal, or within the floor) carries no relative signal:
  # every advantage is 0, in both guards. Under G-only the answer's deviation from
  # the samples' mean divided by a tiny sigma (+ std_eps) would be ~1e6.
  dev = jnp.where(spread[:, None], dev, 0.0)
  dev_answer = jnp.where(spread, dev_answer, 0.0)
  denom = sigma + std_eps if zero_std == "eps" else jnp.where(spread, sigma, 1.0)
  group_adv = dev / denom[:, None]
  # With no sample there is no group to be relative to.
  answer_adv = jnp.where(has_samples & spread, dev_answer / denom, 0.0)
  return group_adv, answer_adv, mu_c + pivot, sigma


@register(data="groups", needs_ref=False, name="grao", online="grao",
          ranges={"beta": "[0, inf)", "lam": "[0, inf)", "std_eps": "(0, inf)",
                  "std_floor": "[0, inf)"})
def grao_loss(
    group_logps: jax.Array,
    group_lengths: jax.Array,
    group_mask: jax.Array,
    group_rewards: jax.Array,
    answer_logps: jax.Array,
    answer_lengths: jax.Array,
    answer_rewards: jax.Array | None = None,
    *,
    beta: float = 0.5,
    lam: float = 0.6,
    group_includes_reference: bool = True,
    reference_reward: str = "zero",
    std_eps: float = 1e-6,
    zero_std: str = "eps",
    std_floor: float = STD_FLOOR,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRAO loss -J_GRAO (arXiv 2508.07750v1, Eq. 2-4), mean over prompts.

  Per prompt, with S^ the length-normalised log-likelihood under pi_theta and
  the mean over the group's real samples o_i:
    J = mean_i[A_i S^(o_i)] + beta A_y S^(y) + lam mean_i[A_i (S^(o_i) - S^(y))]
  (exploration + imitation + alignment). A positive advantage raises that
  sequence's likelihood; advantages carry no gradient.

  Args:
    group_logps: [B, G] summed log pi_theta(o_i | q) of the sampled responses.
    group_lengths: [B, G] scored tokens of each sample.
    group_mask: [B, G] True where a slot holds a real sample (ragged groups).
    group_rewards: [B, G] R(o_i, y), any real number (the paper: +1/0/-1 from a
      judge comparing o_i with y).
    answer_logps: [B] summed log pi_theta(y | q) of the dataset reference answer.
    answer_lengths: [B] scored tokens of y.
    answer_rewards: [B] R(y, y); read only with reference_reward="judge".
    beta: weight of the imitation term (paper: 0.5).
    lam: weight of the alignment regulariser (paper: 0.6).
    group_includes_reference: True (default, reconstruction): y's reward is in
      the normalisation group (G+1), so an all-lose group still learns from y.
      False: Eq. 4 literally, statistics over the G samples only.
    reference_reward: "zero" (default): R(y, y) = 0, a tie under the paper's
      ternary judge. "judge": use answer_rewards.
    std_eps: added to the group std (zero_std="eps").
    zero_std: "eps" (default): A = (R - mu) / (sigma + std_eps); under G+1 a
      zero-variance group has every A exactly 0; under G-only the samples' A are
      0 and so is A_y (not (R_y - mu) / std_eps ~ 1e6: an equal-reward group
      carries no relative signal).
      "zero": a zero-variance group gets every A (and A_y) = 0.
    std_floor: groups whose reward std is at most std_floor * max(1, max |R|)
      count as zero-variance (ties) in both guards (grao_advantages).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar, (weighted) mean over the B prompts of -J.
    metrics: scalars loss/{exploration,imitation,alignment} (signed shares of
      the loss, summing to it), reward/{mean,std,ref,win_rate}, adv/ref,
      frac_zero_std_groups, completion_length/mean, logps/{samples,answer}.
  """
  if reference_reward not in _REFERENCE_REWARDS:
    raise ValueError(f"reference_reward must be one of {_REFERENCE_REWARDS}, "
                     f"got {reference_reward!r}")
  if reference_reward == "judge":
    if answer_rewards is None:
      raise ValueError('reference_reward="judge" needs answer_rewards')
    answer_r = answer_rewards.astype(jnp.float32)
  else:
    answer_r = jnp.zeros(answer_logps.shape, jnp.float32)

  mask = group_mask.astype(bool)
  fmask = mask.astype(jnp.float32)
  num_samples = fmask.sum(-1)                                            # [B]
  inv_count = 1.0 / jnp.maximum(num_samples, 1.0)

  group_adv, answer_adv, _, sigma = grao_advantages(
      group_rewards, mask, answer_r, group_includes_reference=group_includes_reference,
      std_eps=std_eps, zero_std=zero_std, std_floor=std_floor)

  # Sanitise padding slots before dividing, so that neither the value nor the
  # gradient of a real slot can meet a 0-length or garbage padding entry.
  logps = jnp.where(mask, group_logps.astype(jnp.float32), 0.0)
  lengths = jnp.where(mask, group_lengths.astype(jnp.float32), 1.0)
  sample_scores = logps / jnp.maximum(lengths, 1.0)                      # [B, G] S^(o_i)
  answer_score = (answer_logps.astype(jnp.float32)
                  / jnp.maximum(answer_lengths.astype(jnp.float32), 1.0))  # [B] S^(y)

  exploration = (group_adv * sample_scores).sum(-1) * inv_count          # [B]
  # (1/G) sum_i of a term independent of i: itself, if the group is non-empty.
  imitation = beta * answer_adv * answer_score * (num_samples > 0)       # [B]
  alignment = lam * (group_adv * (sample_scores - answer_score[:, None])).sum(-1) * inv_count
  objective = exploration + imitation + alignment                        # [B] J

  w = (jnp.ones_like(answer_score) if weights is None
       else weights.astype(jnp.float32))
  mean = lambda x: (w * x).sum() / jnp.maximum(w.sum(), 1.0)
  ws = w[:, None] * fmask                                                # [B, G]
  sample_mean = lambda x: (ws * x).sum() / jnp.maximum(ws.sum(), 1.0)
  rewards = jnp.where(mask, group_rewards.astype(jnp.float32), 0.0)
  metrics = {
      "loss/exploration": -mean(exploration),
      "loss/imitation": -mean(imitation),
      "loss/alignment": -mean(alignment),
      "reward/mean": sample_mean(rewards),
      "reward/std": mean(sigma),   # mean per-group std of the normalisation set
      "reward/ref": mean(answer_r),
      "reward/win_rate": sample_mean((rewards > 0).astype(jnp.float32)),  # RAS, strict
      "adv/ref": mean(answer_adv),
      "frac_zero_std_groups": mean((sigma == 0).astype(jnp.float32)),
      "completion_length/mean": sample_mean(jnp.where(mask, group_lengths, 0)
                                            .astype(jnp.float32)),
      "logps/samples": sample_mean(sample_scores),
      "logps/answer": mean(answer_score),
  }
  return -mean(objective), metrics
