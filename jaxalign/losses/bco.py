"""BCO: Binary Classifier Optimization (Jung et al., arXiv 2404.04656).

The math and its invariants are in docs/losses.md (`bco`, and its "Invariants"). The loss follows
TRL's `BCOTrainer` (trl/experimental/bco/bco_trainer.py): unpaired examples with
a binary desirable/undesirable label, implicit reward r = beta * (S_theta - S_ref),
a detached reward shift delta (the running mean of every reward seen so far), and
optional UDM (underlying distribution matching) importance weights on the
undesirable examples.

Contents:
  * `BcoState`, `init_bco_state`, `reward_batch_sums`, `update_bco_state`: the
    running reward moments (TRL `RunningMoments`), explicit and checkpointable.
  * `bco_loss`: the unpaired BCO loss; `bco_pair_loss`: TRL DPOTrainer's
    `loss_type="bco_pair"` (with delta <= v0.28, without delta >= v0.29).
  * `mean_pool`, `fit_udm_classifier`, `predict_desirable_prob`,
    `density_ratio_weights`, `udm_weights`: the UDM density-ratio classifier as
    pure functions (host side, once before training; the loss only sees weights).

Data parallelism (docs/losses.md, "Invariants"): delta must use *global* batch
statistics. Under `jax.jit` with a batch sharded over devices, a plain `.sum()`
over the batch axis is already a global sum (GSPMD inserts the all-reduce), so
`bco_loss` needs nothing more. Code that sees only its local shard (inside
`shard_map`, or one host's data before a cross-host reduction) must compute
`reward_batch_sums` locally, `jax.lax.psum` (or add up) the three sums across the
data axes, and pass the totals to `update_bco_state`; that is why the update
takes sums and counts rather than the rewards themselves.
"""

import functools
from typing import NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data import tables
from jaxalign.losses._common import logratio, pair_metrics, unpaired_metrics, weighted_mean
from jaxalign.losses.registry import one_of, register

# TRL RunningMoments' initial count: tiny, so the first update sets the mean to
# the first batch's mean, yet never zero, so nothing divides by zero.
_INITIAL_COUNT = 1e-24


# ----------------------------------------------------------------------------
# Running reward moments (the reward shift delta).
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class BcoState:
  """Running moments of every implicit reward seen in training (TRL RunningMoments).

  All fields are float32 scalars `[]`. Not an EMA: `mean` is the count-weighted
  mean of all rewards fed to `update_bco_state` so far, `var` their population
  variance (Chan et al.'s parallel merge), `count` how many (a weighted count
  when row weights are fractional). Lives in the train state and is
  checkpointed (TRL `running.json`).
  """
  mean: jax.Array
  var: jax.Array
  count: jax.Array


def init_bco_state() -> BcoState:
  """TRL's initial moments: mean 0, var 1, count 1e-24."""
  return BcoState(mean=jnp.zeros((), jnp.float32),
                  var=jnp.ones((), jnp.float32),
                  count=jnp.full((), _INITIAL_COUNT, jnp.float32))


def reward_batch_sums(
    rewards: jax.Array,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The additive statistics of one batch of rewards, for `update_bco_state`.

  Args:
    rewards: [B] implicit rewards (detached here); all labels pooled.
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    (batch_sum, batch_count, batch_sum_sq): float32 scalars sum(w r), sum(w),
    sum(w r^2). Each is a plain sum over the batch, so sums from several data
    shards (or hosts) add up to the global batch's: `jax.lax.psum` them inside
    `shard_map`. Under `jit` with sharded inputs the sum is already global.
  """
  r = jax.lax.stop_gradient(rewards.astype(jnp.float32))
  w = jnp.ones_like(r) if weights is None else weights.astype(jnp.float32)
  return (w * r).sum(), w.sum(), (w * r * r).sum()


def update_bco_state(
    state: BcoState,
    batch_sum: jax.Array,
    batch_count: jax.Array,
    batch_sum_sq: jax.Array,
) -> BcoState:
  """Merges one (global) batch's reward sums into the running moments.

  mean' = (count * mean + batch_sum) / (count + batch_count): the count-weighted
  mean of everything seen, so one update with batches A and B together equals
  an update with A then B. The variance merge is TRL's (Chan et al. 1979).
  A batch with count 0 (all padding) leaves the moments unchanged.

  Args:
    state: the current moments.
    batch_sum: [] sum of the batch's rewards (see `reward_batch_sums`).
    batch_count: [] number (or total weight) of the batch's rewards.
    batch_sum_sq: [] sum of the squared rewards; only `var` depends on it.

  Returns:
    The updated `BcoState`.
  """
  batch_sum = jnp.asarray(batch_sum, jnp.float32)
  n = jnp.asarray(batch_count, jnp.float32)
  batch_sum_sq = jnp.asarray(batch_sum_sq, jnp.float32)
  total = state.count + n
  # n * (batch_mean - mean), written without dividing by n (n may be 0).
  n_times_delta = batch_sum - n * state.mean
  mean = state.mean + n_times_delta / total
  safe_n = jnp.where(n > 0, n, 1.0)
  # Sum of squared deviations from the batch's own mean, clamped against the
  # rounding of sum_sq - sum^2 / n.
  batch_m2 = jnp.maximum(batch_sum_sq - batch_sum * batch_sum / safe_n, 0.0)
  # delta^2 * count * n / total == (n * delta)^2 / n * count / total.
  between = n_times_delta * n_times_delta / safe_n * state.count / total
  var = (state.var * state.count + batch_m2 + between) / total
  return BcoState(mean=mean, var=var, count=total)


# ----------------------------------------------------------------------------
# UDM: the density-ratio classifier on prompt embeddings (host side, once).
# ----------------------------------------------------------------------------


class UdmClassifier(NamedTuple):
  """Logistic-regression parameters: p(desirable | e) = sigmoid(e @ coef + intercept)."""
  coef: jax.Array       # [E]
  intercept: jax.Array  # []


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked mean over tokens (the TRL UDM recipe's pooling).

  Args:
    hidden: [B, T, D] token embeddings from a frozen encoder.
    mask: [B, T] attention mask (True / 1 on real tokens).

  Returns:
    [B, D] float32 mean of the unmasked tokens; 0 for a row with no token.
  """
  m = mask.astype(jnp.float32)[..., None]                            # [B, T, 1]
  summed = (hidden.astype(jnp.float32) * m).sum(axis=1)              # [B, D]
  return summed / jnp.maximum(m.sum(axis=1), 1e-9)


def _logits(params: UdmClassifier, embeddings: jax.Array) -> jax.Array:
  return jnp.dot(embeddings.astype(jnp.float32), params.coef,
                 precision=jax.lax.Precision.HIGHEST) + params.intercept


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_udm_classifier(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    l2: float = 1.0,
    steps: int = 30,
) -> UdmClassifier:
  """Balanced L2 logistic regression, desirable (1) vs undesirable (0) prompts.

  Minimises sum_i s_i * logloss_i + (l2 / 2) * ||coef||^2 (intercept not
  penalised) with class weights s_i = N / (2 * N_class(i)): the minimiser of
  scikit-learn's `LogisticRegression(C=1/l2, class_weight="balanced")`, TRL's
  UDM classifier (C = 1). Solved by damped Newton steps with a backtracking
  line search: deterministic, a fixed number of steps, jitted (`steps` is
  static; one compile per input shape). Both classes must be present.

  Args:
    embeddings: [N, E] prompt embeddings (both classes stacked).
    labels: [N] bool or {0, 1}, True / 1 = the prompt is from the desirable set.
    l2: L2 strength on the coefficients (1 / C).
    steps: Newton iterations (the problem is strongly convex; ~10 suffice).

  Returns:
    `UdmClassifier(coef [E], intercept [])`.
  """
  x = embeddings.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  n, e = x.shape
  xb = jnp.concatenate([x, jnp.ones((n, 1), jnp.float32)], axis=1)  # [N, E+1]
  n_pos = y.sum()
  n_neg = n - n_pos
  s = jnp.where(y > 0, n / (2.0 * jnp.maximum(n_pos, 1.0)),
                n / (2.0 * jnp.maximum(n_neg, 1.0)))                 # [N]
  penalty = jnp.concatenate([jnp.full((e,), l2, jnp.float32), jnp.zeros((1,))])
  sign = 2.0 * y - 1.0
  dot = lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)

  def objective(theta):
    # softplus(-z) == -log_sigmoid(z): the logistic loss, stable at any margin.
    return (s * jax.nn.softplus(-sign * dot(xb, theta))).sum() + 0.5 * (penalty * theta**2).sum()

  def newton_step(_, theta):
    p = jax.nn.sigmoid(dot(xb, theta))                               # [N]
    grad = dot(xb.T, s * (p - y)) + penalty * theta                  # [E+1]
    curvature = s * p * (1.0 - p)                                    # [N]
    hess = dot(xb.T * curvature, xb) + jnp.diag(penalty + 1e-6)      # [E+1, E+1]
    direction = jnp.linalg.solve(hess, grad)
    f0 = objective(theta)
    slope = jnp.dot(grad, direction)

    # Armijo backtracking: halve the step until sufficient decrease (<= 30 times).
    def not_done(carry):
      t, k = carry
      return (objective(theta - t * direction) > f0 - 1e-4 * t * slope) & (k < 30)

    t, _ = jax.lax.while_loop(not_done, lambda c: (0.5 * c[0], c[1] + 1),
                              (jnp.ones((), jnp.float32), 0))
    return theta - t * direction

  theta = jax.lax.fori_loop(0, steps, newton_step, jnp.zeros((e + 1,), jnp.float32))
  return UdmClassifier(coef=theta[:e], intercept=theta[e])


def predict_desirable_prob(params: UdmClassifier, embeddings: jax.Array) -> jax.Array:
  """[N] probability that each prompt comes from the desirable prompt set
  (scikit-learn's `predict_proba(...)[:, 1]`)."""
  return jax.nn.sigmoid(_logits(params, embeddings))


def density_ratio_weights(
    p_desirable: jax.Array,
    *,
    min_density_ratio: float = 0.5,
    max_density_ratio: float = 10.0,
) -> jax.Array:
  """UDM weights clip(p / (1 - p + 1e-8), min, max) (TRL `_get_udm_weight`).

  p / (1 - p) estimates P_desirable(x) / P_undesirable(x) for balanced classes;
  the 1e-8 and the clip bounds are TRL's. Finite for p in [0, 1].

  Args:
    p_desirable: [N] classifier probability that the prompt is desirable.

  Returns:
    [N] float32 weights in [min_density_ratio, max_density_ratio].
  """
  p = p_desirable.astype(jnp.float32)
  return jnp.clip(p / (1.0 - p + 1e-8), min_density_ratio, max_density_ratio)


def udm_weights(
    params: UdmClassifier,
    embeddings: jax.Array,
    *,
    min_density_ratio: float = 0.5,
    max_density_ratio: float = 10.0,
) -> jax.Array:
  """[N] UDM importance weights for prompts, from a fitted classifier.

  Pass the result to `bco_loss(..., udm_weights=...)`, which applies it to the
  undesirable examples only (desirable rows keep weight 1 whatever is here).

  Args:
    params: from `fit_udm_classifier`.
    embeddings: [N, E] prompt embeddings, made as for the fit.
  """
  return density_ratio_weights(predict_desirable_prob(params, embeddings),
                               min_density_ratio=min_density_ratio,
                               max_density_ratio=max_density_ratio)


def prepare_udm(examples: Sequence[dict], *, prompt_embeddings, seed: int = 0,
                udm: str = "off", prompt_sample_size: int = 1024,
                min_density_ratio: float = 0.5,
                max_density_ratio: float = 10.0) -> Sequence[dict]:
  """Host side, once before training: adds a `udm_weights` column when UDM is on.

  Args:
    examples: tokenized unpaired examples (`label` [], optional `embedding` [E]).
    prompt_embeddings: zero-argument callable returning [N, D] prompt embeddings
      from the reference model (mean-pooled hidden states), computed only if needed.
    seed: seeds the per-class prompt sample.
    udm: "off" (every weight 1, TRL's default without an embedding function),
      "model" (reference-model embeddings) or "column" (each record's `embedding`).
    prompt_sample_size: prompts drawn per class, with replacement, to fit the
      classifier (TRL `prompt_sample_size`).
    min_density_ratio, max_density_ratio: clip bounds of p / (1 - p).

  Returns:
    The examples, each with `udm_weights` [] float32 (1.0 when udm is "off"): a
    `tables.with_column` view, so a lazy source stays lazy.
  """
  n = len(examples)
  if udm == "off":
    return tables.with_column(examples, "udm_weights", np.ones(n, np.float32))
  if udm not in ("model", "column"):
    raise ValueError(f"loss.options.udm must be 'off', 'model' or 'column', got {udm!r}")
  # One pass over the examples (a lazy source tokenizes each row once); the result is
  # a view adding the column, not a list of every example.
  labels, columns = np.zeros(n, np.int64), []
  for i, ex in enumerate(examples):
    labels[i] = int(ex["label"])
    if udm == "column":
      if "embedding" not in ex:
        raise ValueError("loss.options.udm='column' needs an `embedding` field in every "
                         "record")
      columns.append(np.asarray(ex["embedding"], np.float32))
  emb = (np.stack(columns) if udm == "column"
         else np.asarray(prompt_embeddings(), np.float32))
  rng = np.random.default_rng(seed)
  sample = []
  for cls in (1, 0):
    members = np.flatnonzero(labels == cls)
    if members.size == 0:
      raise ValueError("UDM needs both desirable and undesirable examples")
    sample.append(rng.choice(members, size=prompt_sample_size, replace=True))
  idx = np.concatenate(sample)
  params = fit_udm_classifier(jnp.asarray(emb[idx]), jnp.asarray(labels[idx]))
  weights = np.asarray(udm_weights(params, jnp.asarray(emb),
                                   min_density_ratio=min_density_ratio,
                                   max_density_ratio=max_density_ratio), np.float32)
  return tables.with_column(examples, "udm_weights", weights)


# ----------------------------------------------------------------------------
# Losses.
# ----------------------------------------------------------------------------


@register(data="unpaired", needs_ref=True, name="bco", init_state=init_bco_state,
          prepare=prepare_udm, prepared_columns={"udm_weights": ((), jnp.float32)},
          ranges={"beta": "(0, inf)", "min_density_ratio": "(0, inf)",
                  "max_density_ratio": "(0, inf)"})
def bco_loss(
    logps: jax.Array,
    ref_logps: jax.Array,
    labels: jax.Array,
    udm_weights: jax.Array | None = None,
    *,
    state: BcoState,
    beta: float = 0.1,
    update_state: bool = True,
    min_density_ratio: float = 0.5,
    max_density_ratio: float = 10.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], BcoState]:
  """Unpaired BCO loss (TRL BCOTrainer.bco_loss + get_batch_loss_metrics).

  Per example, with r = beta * (S_theta - S_ref) and delta the running reward
  mean *after* this batch's update (detached):
    desirable:    -log sigmoid(r - delta)
    undesirable:  -w(x) * log sigmoid(-(r - delta))
  and the loss is the mean over **all** examples of the batch, desirable and
  undesirable together (TRL's `nanmean` of the concatenation; not divided by
  the sum of UDM weights). A batch with no desirable (or no undesirable)
  examples is fine: the other set's mean is the loss.

  Args:
    logps: [B] summed log pi_theta(y | x) over response tokens.
    ref_logps: [B] summed log pi_ref(y | x); constant w.r.t. theta.
    labels: [B] bool, True = desirable.
    udm_weights: optional [B] density-ratio weights w(x) (see `udm_weights`);
      applied to undesirable examples only, values on desirable rows ignored.
      Clipped here to [min_density_ratio, max_density_ratio] (idempotent for
      weights already clipped). None = no UDM (w = 1).
    state: running reward moments (`init_bco_state()` before the first step).
    beta: inverse temperature on the log-ratio.
    update_state: fold this batch's rewards into `state` before reading delta
      (training); False in evaluation (delta = state.mean, state unchanged).
    min_density_ratio: lower clip of the UDM weights (TRL default 0.5).
    max_density_ratio: upper clip of the UDM weights (TRL default 10).
    weights: optional [B] row weights (0 for padding rows). Padding rows enter
      neither the loss nor the running moments.

  Returns:
    loss: scalar, sum(w * per_example) / max(sum(w), 1).
    metrics: scalars `rewards/{chosen,rejected,margins}`, `logps/{chosen,
      rejected}` (this batch's means, 0 for an empty set), the sums and counts
      TRL logs for exact window means (`rewards/chosen_sum`, `logps/chosen_sum`,
      `count/chosen`, same for rejected), `delta`, and with UDM
      `udm/weight_mean` (mean over undesirable rows) and `udm/weight_clip_frac`
      (fraction of undesirable rows at a clip bound).
    new_state: the updated moments (`state` itself when update_state=False).
  """
  logps = logps.astype(jnp.float32)
  # The reference is a constant: never let a gradient reach it.
  ref_logps = jax.lax.stop_gradient(ref_logps.astype(jnp.float32))
  is_desirable = labels.astype(bool)                                  # [B]
  w = jnp.ones_like(logps) if weights is None else weights.astype(jnp.float32)

  rewards = beta * (logps - ref_logps)                                # [B]
  if update_state:
    new_state = update_bco_state(state, *reward_batch_sums(rewards, w))
  else:
    new_state = state
  # Updated before use, as TRL; delta carries no gradient.
  delta = jax.lax.stop_gradient(new_state.mean)
  shifted = rewards - delta                                           # [B]
  # softplus(-z) == -log_sigmoid(z), finite for large |z|.
  desirable_loss = jax.nn.softplus(-shifted)                          # [B]
  undesirable_loss = jax.nn.softplus(shifted)                         # [B]
  if udm_weights is None:
    density_ratio = jnp.ones_like(logps)
  else:
    raw = jax.lax.stop_gradient(udm_weights.astype(jnp.float32))
    density_ratio = jnp.clip(raw, min_density_ratio, max_density_ratio)
  per_example = jnp.where(is_desirable, desirable_loss,
                          density_ratio * undesirable_loss)           # [B]
  loss = (w * per_example).sum() / jnp.maximum(w.sum(), 1.0)

  metrics = unpaired_metrics(rewards, logps, is_desirable, w)
  metrics["delta"] = delta
  if udm_weights is not None:   # over the undesirable examples, the ones it weights
    at_bound = ((raw <= min_density_ratio) | (raw >= max_density_ratio))
    w_rejected = jnp.where(is_desirable, 0.0, w)
    n_rejected = jnp.maximum(metrics["count/rejected"], 1.0)
    metrics["udm/weight_mean"] = (w_rejected * density_ratio).sum() / n_rejected
    metrics["udm/weight_clip_frac"] = (w_rejected * at_bound.astype(jnp.float32)).sum() / n_rejected
  return loss, metrics, new_state


# Paired BCO with the running reward shift (TRL <= 0.28 DPOTrainer "bco_pair"; the
# shift-free TRL >= 0.29 form is dpo variant "bco_pair").
@register(data="pairwise", needs_ref=True, name="bco_pair", init_state=init_bco_state,
          ranges={"beta": "(0, inf)"},
          check=one_of("shift_count", ("rewards", "batch"), "rewards"))
def bco_pair_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    state: BcoState | None = None,
    beta: float = 0.1,
    update_state: bool = True,
    shift_count: str = "rewards",
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], BcoState | None]:
  """Paired BCO, TRL DPOTrainer `loss_type="bco_pair"`.

  Per pair: -log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta)), mean over
  pairs. With `state` (TRL <= v0.28) delta is the running mean of all 2B
  rewards, updated before use; with `state=None` (TRL >= v0.29) delta = 0.

  How the running mean counts (`shift_count`):
    * "rewards" (default): every one of the 2B rewards is one sample, pooled
      with its row weight: TRL's current BCOTrainer counting (RunningMoments
      over all rewards). delta is then the mean of every reward seen, however
      they were batched, padded or split into micro-batches.
    * "batch": TRL <= v0.28 DPOTrainer, which feeds its RunningMoments the
      *scalar* batch mean (one sample per step, variance 0 within it). Use it
      to reproduce TRL 0.28 exactly (delta, var and count).
  delta is the same in both whenever every batch holds the same number of valid
  pairs; `var` and `count` differ.

  Args:
    chosen_logps: [B] summed log pi_theta(y_w | x).
    rejected_logps: [B] summed log pi_theta(y_l | x).
    ref_chosen_logps: [B] summed log pi_ref(y_w | x); constant w.r.t. theta.
    ref_rejected_logps: [B] same for y_l.
    state: running reward moments, or None for the shift-free form.
    beta: inverse temperature on the log-ratio.
    update_state: as in `bco_loss`.
    shift_count: "rewards" or "batch", see above.
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar, (weighted) mean over the B pairs.
    metrics: scalars rewards/{chosen,rejected,margins,accuracies}, logps/*,
      delta.
    new_state: updated moments (None when state is None).
  """
  if shift_count not in ("rewards", "batch"):
    raise ValueError(f"shift_count must be 'rewards' or 'batch', got {shift_count!r}")
  # Log-ratios in the inputs' precision, then float32 (see _common.logratio).
  chosen_rewards = beta * logratio(chosen_logps, ref_chosen_logps)     # [B]
  rejected_rewards = beta * logratio(rejected_logps, ref_rejected_logps)  # [B]
  chosen_logps = jnp.asarray(chosen_logps).astype(jnp.float32)
  rejected_logps = jnp.asarray(rejected_logps).astype(jnp.float32)
  w = jnp.ones_like(chosen_logps) if weights is None else weights.astype(jnp.float32)

  new_state = state
  if state is None:
    delta = jnp.zeros((), jnp.float32)
  else:
    if update_state:
      s_w, n_w, q_w = reward_batch_sums(chosen_rewards, w)
      s_l, n_l, q_l = reward_batch_sums(rejected_rewards, w)
      if shift_count == "rewards":
        new_state = update_bco_state(state, s_w + s_l, n_w + n_l, q_w + q_l)
      else:  # TRL 0.28: the scalar mean of the 2B rewards is one sample
        m = (s_w + s_l) / jnp.maximum(n_w + n_l, 1e-24)
        one = (n_w + n_l > 0).astype(jnp.float32)   # an all-padding batch adds nothing
        new_state = update_bco_state(state, one * m, one, one * m * m)
    delta = jax.lax.stop_gradient(new_state.mean)
  # softplus(-z) == -log_sigmoid(z), finite for large |z|.
  per_pair = (jax.nn.softplus(-(chosen_rewards - delta))
              + jax.nn.softplus(rejected_rewards - delta))           # [B]

  mean = weighted_mean(w, per_pair)
  metrics = {
      **pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, mean),
      "delta": delta,
  }
  return mean(per_pair), metrics, new_state
