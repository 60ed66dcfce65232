"""Per-sequence loss columns: what a loss needs from the token log-probs beyond their sum.

A loss asks for them by name (LossSpec.columns); the train step computes them
from the forward's token outputs and passes them in LossInputs.columns /
ref_columns. LD-DPO reads "tail_logps", WPO "wpo_logps" (losses/dpo.py), ORPO
"unscored_logps" and "unscored_lengths" (losses/orpo.py). The step itself asks for
"token_logit_means", "token_top1" and "token_entropies" (sums over each sequence's
scored tokens) for TRL's per-token metrics (train/step.py's TOKEN_METRICS).

Every batch layout (padded, packed, shared prompts, packed shared prompts)
hands over its token outputs in one flat form (jaxalign/logprobs.py fills it):

  logps:      [G, N] float32 log-prob of each scored token (anything elsewhere).
  mask:       [G, N] bool, True on scored tokens.
  slot:       [G, N] int in [0, n]: the scored token's sequence in its group; n
              elsewhere.
  rank:       [G, N] int, the scored token's 1-based place among its sequence's
              scored tokens (anything elsewhere).
  log_sum_sq: [G, N] log sum_v p_v^2 where the token is predicted (only when
              asked for: it costs a pass over the vocabulary).
  stats:      {"logit_mean", "top1", "entropy"}: [G, N] per-token metrics
              (logprobs.token_logps_and_stats; only when asked for: no extra
              pass, a few more sums in the log-probs' own scan), no gradient.
  unscored:   ([B * S] sums, [B * S] counts) of each sequence's real tokens that
              are not scored, less its first: the prompt, for tokenize's
              sequences (only when asked for; each layout knows where its
              prompt tokens are, a shared prompt's included, so it sums them).

The G * n slots, flattened in order, are the batch's [B, S] sequences: a padded
or shared-prompt row is a group of one slot (G = B * S, n = 1, rank the running
count), a packed group's rows are its n = B_g * S slots. So one segment-sum
formula serves every layout.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

TokenOutputs = dict   # {"logps", "mask", "slot", "rank"[, "log_sum_sq", "stats"]: [G, N]}


def slot_sum(values: jax.Array, slot: jax.Array, num_slots: int) -> jax.Array:
  """[G, N] values summed per slot -> [G, num_slots]; slot num_slots is dropped."""
  seg = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_slots + 1))
  return seg(values, slot)[:, :num_slots]


def _at_slot(per_slot: jax.Array, slot: jax.Array) -> jax.Array:
  """[G, n] per-slot values -> [G, N] at each token's slot (0 on slot n)."""
  padded = jnp.pad(per_slot, ((0, 0), (0, 1)))
  return jnp.take_along_axis(padded, slot, axis=1)


def tail_logps(tok: TokenOutputs, counts: jax.Array) -> jax.Array:
  """LD-DPO: summed log-probs of the scored tokens past the example's shortest sequence.

  For a pair: the tokens of rank > min(|y_w|, |y_l|) (TRL's tail mask). Gradients
  flow through the policy's log-probs.

  Args:
    tok: token outputs [G, N] (module docstring).
    counts: [B, S] scored tokens per sequence (0 for padding sequences).

  Returns:
    [B, S] float32.
  """
  g = tok["mask"].shape[0]
  per_group = counts.reshape(g, -1)                                   # [G, n]
  shortest = jnp.repeat(counts.min(axis=-1), counts.shape[-1]).reshape(per_group.shape)
  tail = tok["mask"] & (tok["rank"] > _at_slot(shortest, tok["slot"]))
  return slot_sum(jnp.where(tail, tok["logps"], 0.0), tok["slot"],
                  per_group.shape[1]).reshape(counts.shape)


def wpo_logps(tok: TokenOutputs, counts: jax.Array) -> jax.Array:
  """WPO: per-token mean of log p_t - log sum_v p_v^2 over each sequence, no gradient.

  tok: token outputs [G, N] with "log_sum_sq"; counts: [B, S]. Returns [B, S] float32.
  """
  g = tok["mask"].shape[0]
  aligned = jnp.where(tok["mask"], jax.lax.stop_gradient(tok["logps"]) - tok["log_sum_sq"], 0.0)
  total = slot_sum(aligned, tok["slot"], counts.size // g).reshape(counts.shape)
  return total / jnp.maximum(counts, 1).astype(jnp.float32)


def unscored_logps(tok: TokenOutputs, counts: jax.Array) -> jax.Array:
  """ORPO's prompt term: summed log-probs of each sequence's real unscored tokens after
  its first (the prompt). tok: token outputs with "unscored"; returns [B, S] float32."""
  return tok["unscored"][0].reshape(counts.shape)


def unscored_lengths(tok: TokenOutputs, counts: jax.Array) -> jax.Array:
  """How many tokens unscored_logps sums: [B, S] int32."""
  return tok["unscored"][1].reshape(counts.shape)


def _stat_sums(stat: str) -> Callable[[TokenOutputs, jax.Array], jax.Array]:
  """(token outputs with "stats", counts [B, S]) -> [B, S] the sum of per-token metric
  `stat` over each sequence's scored tokens (no gradient)."""
  def fn(tok: TokenOutputs, counts: jax.Array) -> jax.Array:
    g = tok["mask"].shape[0]
    values = jnp.where(tok["mask"], tok["stats"][stat], 0.0)
    return slot_sum(values, tok["slot"], counts.size // g).reshape(counts.shape)
  return fn


class Column(NamedTuple):
  fn: Callable[[TokenOutputs, jax.Array], jax.Array]   # (token outputs, counts [B, S]) -> [B, S]
  needs_log_sum_sq: bool
  needs_unscored: bool = False
  needs_stats: bool = False


# The per-sequence columns a loss may ask for, by name.
COLUMNS = {
    "tail_logps": Column(tail_logps, needs_log_sum_sq=False),
    "wpo_logps": Column(wpo_logps, needs_log_sum_sq=True),
    "unscored_logps": Column(unscored_logps, needs_log_sum_sq=False, needs_unscored=True),
    "unscored_lengths": Column(unscored_lengths, needs_log_sum_sq=False, needs_unscored=True),
    # Per-token metrics summed per sequence: the vocabulary-mean logit, argmax hits
    # of the label, the softmax's entropy.
    "token_logit_means": Column(_stat_sums("logit_mean"), False, needs_stats=True),
    "token_top1": Column(_stat_sums("top1"), False, needs_stats=True),
    "token_entropies": Column(_stat_sums("entropy"), False, needs_stats=True),
}


def token_request(names: tuple[str, ...]) -> dict | None:
  """The token_outputs dict to hand the log-prob functions for columns `names`.

  None without columns (no per-token outputs, no extra vocabulary pass); a dict
  holding "log_sum_sq" / "unscored" / "stats" when a column reads it.

  Raises:
    ValueError: for a name not in COLUMNS.
  """
  for name in names:
    if name not in COLUMNS:
      raise ValueError(f"unknown per-sequence column {name!r}; known: {sorted(COLUMNS)}")
  if not names:
    return None
  request = {}
  if any(COLUMNS[n].needs_log_sum_sq for n in names):
    request["log_sum_sq"] = None
  if any(COLUMNS[n].needs_unscored for n in names):
    request["unscored"] = None
  if any(COLUMNS[n].needs_stats for n in names):
    request["stats"] = None
  return request


def compute(names: tuple[str, ...], tok: TokenOutputs, counts: jax.Array) -> dict:
  """{name: [B, S]} columns from the filled token outputs and counts [B, S]."""
  return {name: COLUMNS[name].fn(tok, counts) for name in names}
