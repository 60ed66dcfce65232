"""Per-sequence log-probs from hidden states, chunked over the vocabulary.

Full float32 [N, T, V] logits never exist, forward or backward: `token_logps`
scans the vocabulary in chunks of `chunk_size` columns with an online
logsumexp, and its custom VJP recomputes each chunk's logits in the backward
pass. Peak extra memory is O(N * T * chunk_size) instead of O(N * T * V).

Under a mesh, `batch_axes` names the mesh axes the rows are split over (the
step passes its batch sharding's). The flattened hidden states, every chunk's
logits and the backward's per-row arrays are then pinned to that split with
`with_sharding_constraint`: without it XLA's propagation may choose to gather
the whole global batch onto every device for the chunk matmul against a
vocabulary- or embed-sharded head (Llama-3.1-8B DPO on v5p-64: 74 GiB per chip
with, 22 GiB without that gather). Outside a mesh, or with one device, the
constraint is skipped and nothing changes.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxalign.sharding import CONTEXT_AXIS

BatchAxes = str | tuple[str, ...] | None


def _mesh_batch_axes(batch_axes: BatchAxes) -> BatchAxes:
  """`batch_axes` if the current (abstract) mesh has them with more than one device, else None."""
  if not batch_axes:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  if any(a not in mesh.axis_names for a in names):
    raise ValueError(f"batch axes {names} are not all axes of the mesh {mesh.axis_names}")
  if math.prod(mesh.shape[a] for a in names) == 1:
    return None
  return names  # a tuple: hashable, as custom_vjp's static arguments must be


def _token_axes(batch_axes: BatchAxes, T: int) -> BatchAxes:
  """Mesh axes of the flattened [N * T] token rows: the batch axes, then "context"
  when the mesh splits the sequence over it (context parallelism: the [N, T] rows
  are split (batch, context), which the flattening keeps) and T divides by it."""
  axes = _mesh_batch_axes(batch_axes) or ()
  mesh = jax.sharding.get_abstract_mesh()
  if (not mesh.empty and CONTEXT_AXIS in mesh.axis_names and mesh.shape[CONTEXT_AXIS] > 1
      and T % mesh.shape[CONTEXT_AXIS] == 0):
    axes = (*axes, CONTEXT_AXIS)
  return tuple(axes) or None


def _rows(x: jax.Array, batch_axes: BatchAxes) -> jax.Array:
  """Pins x's leading (row) dimension to the batch axes; the rest unconstrained-replicated."""
  if batch_axes is None:
    return x
  return jax.lax.with_sharding_constraint(x, P(batch_axes, *(None,) * (x.ndim - 1)))


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def _fill_token_outputs(token_outputs: dict, logps, mask, slot, rank, log_sum_sq,
                        stats=None) -> None:
  """Fills `token_outputs` with the flat per-token form losses/columns.py reads.

  logps, mask, slot, rank: [G, N] (slot: the scored token's sequence in its group,
  num_slots elsewhere; rank: its 1-based place among that sequence's scored tokens);
  log_sum_sq: () -> [G, N], called only if the dict holds that key;
  stats: {name: [G, N]} (token_logps_and_stats), stored if the dict holds "stats".
  """
  if "log_sum_sq" in token_outputs:
    token_outputs["log_sum_sq"] = log_sum_sq()
  if "stats" in token_outputs:
    token_outputs["stats"] = stats
  token_outputs.update(logps=logps, mask=mask, slot=slot, rank=rank)


def _fill_rows(token_outputs: dict, logps, mask, log_sum_sq, stats=None) -> None:
  """_fill_token_outputs for [N, T] rows that are one sequence each (one slot a row)."""
  _fill_token_outputs(token_outputs, logps, mask, jnp.where(mask, 0, 1).astype(jnp.int32),
                      jnp.cumsum(mask.astype(jnp.int32), axis=1), log_sum_sq, stats)


def _fill_unscored(token_outputs: dict, logps, unscored, slot=None, num_slots=None,
                   extra=None) -> None:
  """token_outputs["unscored"] = (sums, counts) [G * n]: each sequence's real tokens
  that are not scored, less its first (nothing predicts it) -- the prompt, for
  tokenize's sequences -- when the dict asks for them by holding that key.

  logps, unscored: [G, N] (position t predicts token t + 1, unscored its mask);
  slot: [G, N] each token's slot (None: one slot a row); extra: (sums, counts)
  [G, n] added (a shared prompt's tokens, scored apart from the rows).
  """
  if "unscored" not in token_outputs:
    return
  values = jnp.where(unscored, logps, 0.0)
  if slot is None:
    sums, counts = values.sum(axis=1, keepdims=True), unscored.sum(axis=1, keepdims=True)
  else:
    seg = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_slots + 1))
    where = jnp.where(unscored, slot, num_slots)
    sums = seg(values, where)[:, :num_slots]
    counts = seg(unscored.astype(jnp.int32), where)[:, :num_slots]
  if extra is not None:
    sums, counts = sums + extra[0], counts + extra[1]
  token_outputs["unscored"] = (sums.reshape(-1), counts.reshape(-1).astype(jnp.int32))


def _fill_packed(token_outputs: dict, rows, num_slots: int, first=None) -> None:
  """_fill_token_outputs for packed rows (packed_sequence_logps).

  rows: (logps, mask, slot [G, N], log_sum_sq: () -> [G, N], stats: None or
    {name: [G, N]}) of the flattened rows.
  first: None, or packed shared prompts' (logps, scored [G, num_slots], log_sum_sq:
    () -> [G, num_slots], stats) of each slot's first response token, scored apart
    from the rows; those lead the flat axis with rank 1, the rows' ranks after them.
  """
  logps, mask, slot, log_sum_sq, stats = rows
  if first is None:
    offset = jnp.zeros(mask.shape[:1] + (num_slots,), jnp.int32)
    _fill_token_outputs(token_outputs, logps, mask, slot,
                        _packed_ranks(mask, slot, num_slots, offset), log_sum_sq, stats)
    return
  first_logps, scored, first_log_sum_sq, first_stats = first
  lead = lambda a, b: jnp.concatenate([a, b], axis=1)
  first_slot = jnp.where(scored, jnp.arange(num_slots, dtype=slot.dtype), num_slots)
  rank = _packed_ranks(mask, slot, num_slots, scored.astype(jnp.int32))
  _fill_token_outputs(token_outputs, lead(first_logps, logps), lead(scored, mask),
                      lead(first_slot, slot), lead(jnp.ones_like(first_slot), rank),
                      lambda: lead(first_log_sum_sq(), log_sum_sq()),
                      None if stats is None else {k: lead(first_stats[k], stats[k]) for k in stats})


def _packed_ranks(mask, slot, num_slots, offset):
  """[G, N] rank of each scored token of packed rows among its slot's scored tokens.

  mask, slot: [G, N], a slot's tokens in order in one row; offset: [G, num_slots]
  scored tokens the slot has before its tokens in the rows. The rank is the running
  count along the rows less the count before the slot's first scored one there.
  """
  running = jnp.cumsum(mask.astype(jnp.int32), axis=1)                 # [G, N]
  start = jax.vmap(lambda v, i: jax.ops.segment_min(v, i, num_segments=num_slots + 1))(
      jnp.where(mask, running, jnp.iinfo(jnp.int32).max), slot)        # [G, num_slots + 1]
  before = jnp.pad(start[:, :num_slots] - 1 - offset, ((0, 0), (0, 1)))
  return running - jnp.take_along_axis(before, slot, axis=1)


def _router_arg(router_stats: dict | None) -> dict:
  """The model's router_stats keyword when asked for (a model without experts may
  not take it)."""
  return {} if router_stats is None else {"router_stats": router_stats}


def _chunk_layout(vocab: int, chunk_size: int) -> tuple[int, int]:
  chunk = min(chunk_size, vocab)
  return chunk, -(-vocab // chunk)


def _chunk(h, head_w, i, chunk, cap, batch_axes):
  """Logits of vocabulary chunk i.

  The last chunk starts at V - chunk (so no padded copy of the head is made)
  and overlaps the previous one; columns below i * chunk are marked invalid.

  Returns:
    start: [] first column of the chunk.
    z: [M, C] float32 logits before the softcap.
    logits: [M, C] float32 logits after the softcap, -inf on invalid columns.
    valid: [C] bool.
  """
  vocab = head_w.shape[1]
  start = jnp.minimum(i * chunk, vocab - chunk)
  w = jax.lax.dynamic_slice_in_dim(head_w, start, chunk, axis=1).astype(h.dtype)
  z = _rows(jnp.dot(h, w, preferred_element_type=jnp.float32), batch_axes)  # [M, C]
  valid = start + jnp.arange(chunk) >= i * chunk                        # [C]
  logits = _rows(jnp.where(valid, _softcap(z, cap), -jnp.inf), batch_axes)
  return start, w, z, logits, valid


def _forward(h, head_w, targets, chunk_size, cap, batch_axes, stats=False):
  """h: [M, D]; head_w: [D, V]; targets: [M]. Returns (logps [M], lse [M], stats).

  stats: None, or (with `stats`) the per-token metrics of the same scan, read off
  the chunk logits the log-probs need anyway (no extra matmul), as a dict of [M]
  float32: "logit_mean" (the logits' mean over the vocabulary), "top1" (1.0 where
  the first argmax over the vocabulary is the target) and "entropy" (of the
  softmax, lse - sum_v p_v z_v). The log-prob arithmetic is the same either way.
  """
  M = h.shape[0]
  vocab = head_w.shape[1]
  h, targets = _rows(h, batch_axes), _rows(targets, batch_axes)
  chunk, num_chunks = _chunk_layout(vocab, chunk_size)

  def body(carry, i):
    (running_max, running_sum, target_logit), extra = carry
    start, _, _, logits, valid = _chunk(h, head_w, i, chunk, cap, batch_axes)
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    running_sum = (running_sum * jnp.exp(running_max - new_max)
                   + jnp.exp(logits - new_max[:, None]).sum(axis=-1))
    local = targets - start
    in_chunk = (local >= 0) & (local < chunk)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=-1)[:, 0]
    # -inf picks (invalid overlap columns) are excluded by in_chunk & valid.
    hit = in_chunk & valid[jnp.clip(local, 0, chunk - 1)]
    target_logit = jnp.where(hit, picked, target_logit)
    if extra is not None:
      extra = _stats_update(extra, logits, valid, start, running_max, new_max)
    carry = (new_max, running_sum, target_logit)
    return (tuple(_rows(c, batch_axes) for c in carry),
            None if extra is None else tuple(_rows(c, batch_axes) for c in extra)), None

  init = tuple(_rows(c, batch_axes) for c in (
      jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32),
      jnp.zeros((M,), jnp.float32)))
  extra = None
  if stats:
    extra = tuple(_rows(c, batch_axes) for c in (
        jnp.zeros((M,), jnp.float32), jnp.full((M,), -jnp.inf, jnp.float32),
        jnp.zeros((M,), jnp.int32), jnp.zeros((M,), jnp.float32)))
  ((running_max, running_sum, target_logit), extra), _ = jax.lax.scan(
      body, (init, extra), jnp.arange(num_chunks))
  lse = running_max + jnp.log(running_sum)
  out = None
  if stats:
    logit_sum, _, best_index, weighted = extra
    out = {"logit_mean": logit_sum / vocab,
           "top1": (best_index == targets).astype(jnp.float32),
           "entropy": lse - weighted / running_sum}
  return target_logit - lse, lse, out


def _stats_update(extra, logits, valid, start, running_max, new_max):
  """One chunk's step of _forward's metric accumulators.

  extra: (logit_sum, best_value, best_index, weighted) [M]: the sum of the logits
  over the vocabulary so far; the largest logit so far and its column (the first
  one on ties, as argmax); and sum_v exp(z_v - running max) * z_v, rescaled with
  the running max like the sum of exps, so that sum_v p_v z_v = weighted / sum.
  """
  logit_sum, best_value, best_index, weighted = extra
  z = jnp.where(valid, logits, 0.0)          # invalid columns are -inf: kept out of sums
  logit_sum = logit_sum + z.sum(axis=-1)
  chunk_best = logits.max(axis=-1)
  better = chunk_best > best_value            # strict: an earlier column wins a tie
  best_index = jnp.where(better, start + jnp.argmax(logits, axis=-1).astype(jnp.int32),
                         best_index)
  best_value = jnp.maximum(best_value, chunk_best)
  weighted = (weighted * jnp.exp(running_max - new_max)
              + (jnp.exp(logits - new_max[:, None]) * z).sum(axis=-1))
  return logit_sum, best_value, best_index, weighted


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_logps_flat(h, head_w, targets, chunk_size, cap, batch_axes):
  return _forward(h, head_w, targets, chunk_size, cap, batch_axes)[0]


def _fwd(h, head_w, targets, chunk_size, cap, batch_axes):
  logps, lse, _ = _forward(h, head_w, targets, chunk_size, cap, batch_axes)
  return logps, (h, head_w, targets, lse)


def _bwd(chunk_size, cap, batch_axes, res, g):
  """d logp_m / d logit_mv = onehot(target_m) - softmax_mv, recomputed per chunk."""
  h, head_w, targets, lse = res
  chunk, num_chunks = _chunk_layout(head_w.shape[1], chunk_size)
  g = _rows(g.astype(jnp.float32), batch_axes)
  h, targets, lse = (_rows(x, batch_axes) for x in (h, targets, lse))

  def body(carry, i):
    dh, dw = carry
    start, w, z, logits, valid = _chunk(h, head_w, i, chunk, cap, batch_axes)
    probs = jnp.exp(logits - lse[:, None])                              # [M, C]; 0 if invalid
    onehot = ((targets - start)[:, None] == jnp.arange(chunk)) & valid
    dlogits = g[:, None] * (onehot.astype(jnp.float32) - probs)
    if cap is not None:
      dlogits = dlogits * (1.0 - jnp.square(jnp.tanh(z / cap)))
    dz = _rows(dlogits.astype(h.dtype), batch_axes)
    dh = _rows(dh + jnp.dot(dz, w.T, preferred_element_type=jnp.float32), batch_axes)
    dw_chunk = jnp.dot(h.T, dz, preferred_element_type=jnp.float32)     # [D, C]
    # Overlapping last chunk: invalid columns carry zero gradient, so add.
    dw = jax.lax.dynamic_update_slice_in_dim(
        dw, jax.lax.dynamic_slice_in_dim(dw, start, chunk, axis=1) + dw_chunk, start, axis=1)
    return (dh, dw), None

  init = (_rows(jnp.zeros(h.shape, jnp.float32), batch_axes),
          jnp.zeros(head_w.shape, jnp.float32))
  (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  return dh.astype(h.dtype), dw.astype(head_w.dtype), None


_token_logps_flat.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_logps_stats_flat(h, head_w, targets, chunk_size, cap, batch_axes):
  logps, _, stats = _forward(h, head_w, targets, chunk_size, cap, batch_axes, stats=True)
  return logps, stats


def _fwd_stats(h, head_w, targets, chunk_size, cap, batch_axes):
  logps, lse, stats = _forward(h, head_w, targets, chunk_size, cap, batch_axes, stats=True)
  return (logps, stats), (h, head_w, targets, lse)


def _bwd_stats(chunk_size, cap, batch_axes, res, g):
  """The log-probs' backward, unchanged; the metrics are constants (their cotangent,
  zero under the stop_gradient of token_logps_and_stats, is dropped)."""
  return _bwd(chunk_size, cap, batch_axes, res, g[0])


_token_logps_stats_flat.defvjp(_fwd_stats, _bwd_stats)


def token_logps(
    hidden: jax.Array,
    head_w: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 8192,
    final_logit_softcap: float | None = None,
    batch_axes: BatchAxes = None,
) -> jax.Array:
  """log softmax(softcap(hidden @ head_w))[targets], chunked over the vocabulary.

  Args:
    hidden: [N, T, D] final hidden states (any float dtype; the matmul runs in
      it, accumulation and softmax in float32).
    head_w: [D, V] output projection.
    targets: [N, T] int token ids in [0, V).
    chunk_size: vocabulary columns per chunk; V need not be divisible by it.
    final_logit_softcap: Gemma2's cap * tanh(logits / cap), or None.
    batch_axes: mesh axes that N is split over (e.g. ("data", "fsdp")); keeps
      the chunk arrays split the same way under a mesh. None: no constraint.

  Returns:
    [N, T] float32 log-probabilities. Differentiable w.r.t. hidden and head_w;
    the backward recomputes chunk logits rather than storing [N, T, V].
  """
  N, T, D = hidden.shape
  logps = _token_logps_flat(hidden.reshape(N * T, D), head_w,
                            targets.reshape(N * T).astype(jnp.int32),
                            int(chunk_size), final_logit_softcap,
                            _token_axes(batch_axes, T))
  return logps.reshape(N, T)


def token_logps_and_stats(
    hidden: jax.Array,
    head_w: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 8192,
    final_logit_softcap: float | None = None,
    batch_axes: BatchAxes = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """token_logps, plus per-token metrics from the same vocabulary scan.

  The metrics cost no extra matmul or pass over the vocabulary (they read the
  chunk logits the online logsumexp computes anyway), and the log-probs and their
  gradient are the same arithmetic as token_logps's.

  Returns:
    logps: [N, T] float32, differentiable as token_logps's.
    stats: {"logit_mean", "top1", "entropy"} [N, T] float32, no gradient: the
      mean over the vocabulary of the (softcapped) logits, 1.0 where the first
      argmax is the target, and the softmax's entropy.
  """
  N, T, D = hidden.shape
  logps, stats = _token_logps_stats_flat(
      hidden.reshape(N * T, D), head_w, targets.reshape(N * T).astype(jnp.int32),
      int(chunk_size), final_logit_softcap, _token_axes(batch_axes, T))
  stats = {k: jax.lax.stop_gradient(v).reshape(N, T) for k, v in stats.items()}
  return logps.reshape(N, T), stats


def _logps_for(token_outputs, hidden, head_w, targets, **kw):
  """(token_logps, its stats when `token_outputs` asks for them by holding "stats", else
  None): one scan either way, and exactly token_logps when the stats are not asked."""
  if token_outputs is not None and "stats" in token_outputs:
    return token_logps_and_stats(hidden, head_w, targets, **kw)
  return token_logps(hidden, head_w, targets, **kw), None


def token_log_sum_sq_probs(
    hidden: jax.Array,
    head_w: jax.Array,
    *,
    chunk_size: int = 8192,
    final_logit_softcap: float | None = None,
    batch_axes: BatchAxes = None,
) -> jax.Array:
  """log sum_v p_v^2 per position (WPO's weight normaliser), chunked, no gradient.

  = logsumexp(2 z) - 2 logsumexp(z) over the vocabulary, z the (softcapped)
  logits; one extra pass over the vocabulary chunks, never [N, T, V].

  Returns:
    [N, T] float32, a constant w.r.t. the parameters.
  """
  N, T, D = hidden.shape
  ax = _token_axes(batch_axes, T)
  h = _rows(jax.lax.stop_gradient(hidden).reshape(N * T, D), ax)
  head_w = jax.lax.stop_gradient(head_w)
  chunk, num_chunks = _chunk_layout(head_w.shape[1], int(chunk_size))

  def body(carry, i):
    m1, s1, m2, s2 = carry
    _, _, _, logits, _ = _chunk(h, head_w, i, chunk, final_logit_softcap, ax)
    n1 = jnp.maximum(m1, logits.max(-1))
    s1 = s1 * jnp.exp(m1 - n1) + jnp.exp(logits - n1[:, None]).sum(-1)
    n2 = jnp.maximum(m2, 2.0 * logits.max(-1))
    s2 = s2 * jnp.exp(m2 - n2) + jnp.exp(2.0 * logits - n2[:, None]).sum(-1)
    return (n1, s1, n2, s2), None

  neg = jnp.full((N * T,), -jnp.inf, jnp.float32)
  zero = jnp.zeros((N * T,), jnp.float32)
  (m1, s1, m2, s2), _ = jax.lax.scan(body, (neg, zero, neg, zero), jnp.arange(num_chunks))
  out = (m2 + jnp.log(s2)) - 2.0 * (m1 + jnp.log(s1))
  return out.reshape(N, T)


def sequence_logps_from_hidden(
    hidden: jax.Array,
    head_w: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 8192,
    final_logit_softcap: float | None = None,
    batch_axes: BatchAxes = None,
    token_outputs: dict | None = None,
    attention_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Summed log-probs of the scored tokens of each row.

  Token t is predicted from hidden position t - 1, so loss_mask[:, 0] is
  ignored (nothing predicts the first token).

  Args:
    hidden: [N, T, D] hidden states of `tokens`.
    head_w: [D, V] output projection.
    tokens: [N, T] int token ids.
    loss_mask: [N, T] bool/int, 1 where token t is a scored response token.
    chunk_size: vocabulary chunk, see token_logps.
    final_logit_softcap: see token_logps.
    batch_axes: see token_logps.
    token_outputs: when a dict, filled with the per-position arrays behind the
      sums, in losses/columns.py's flat form with each row a group of one slot:
      "logps" [N, T] (position t-1 predicts token t, as summed), "mask" [N, T]
      bool (scored), "slot" [N, T] (0 scored, 1 elsewhere), "rank" [N, T] (the
      scored token's 1-based place in its row) and "log_sum_sq" [N, T] if the dict
      asks for it by holding that key (token_log_sum_sq_probs, same positions);
      "stats" {name: [N, T]} if it holds that key (token_logps_and_stats, from
      the log-probs' own scan); "unscored" ([N] sums, [N] counts of each row's
      real unscored tokens after its first, _fill_unscored) if it holds that key.
    attention_mask: [N, T], 1 on real tokens; needed for "unscored" only.

  Returns:
    logps_sum: [N] float32 sum over scored tokens of log p(token_t | tokens_<t).
    num_tokens: [N] int32 number of scored tokens.
  """
  # Shift by padding the targets rather than slicing hidden (no [N, T-1, D] copy).
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  mask = jnp.concatenate([loss_mask[:, 1:].astype(bool),
                          jnp.zeros_like(loss_mask[:, :1], dtype=bool)], axis=1)
  logps, stats = _logps_for(token_outputs, hidden, head_w, targets, chunk_size=chunk_size,
                            final_logit_softcap=final_logit_softcap,
                            batch_axes=batch_axes)                      # [N, T]
  logps_sum = jnp.sum(jnp.where(mask, logps, 0.0), axis=1)
  if token_outputs is not None:
    _fill_rows(token_outputs, logps, mask, lambda: (
        token_log_sum_sq_probs(hidden, head_w, chunk_size=chunk_size,
                               final_logit_softcap=final_logit_softcap,
                               batch_axes=batch_axes)), stats)
    if "unscored" in token_outputs:
      if attention_mask is None:
        raise ValueError("the unscored-token column needs the attention mask")
      real = attention_mask.astype(bool)
      # Token t + 1 is real and so is t, which predicts it: the row's first real
      # token is never counted, whichever side the row is padded on.
      unscored = jnp.concatenate([real[:, 1:] & real[:, :-1], jnp.zeros_like(real[:, :1])],
                                 axis=1) & ~mask
      _fill_unscored(token_outputs, logps, unscored)
  return logps_sum, mask.sum(axis=1).astype(jnp.int32)


def sequence_logps(
    model,
    tokens: jax.Array,
    attention_mask: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 8192,
    batch_axes: BatchAxes = None,
    token_outputs: dict | None = None,
    router_stats: dict | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One forward of `model` over all N rows, then sequence_logps_from_hidden.

  Args:
    model: a jaxalign Transformer (callable as model(tokens, attention_mask),
      with head_weight() and config.final_logit_softcap).
    tokens: [N, T] int; chosen and rejected (or a group) concatenated on N.
    attention_mask: [N, T], 1 for real tokens.
    loss_mask: [N, T], 1 for scored response tokens; and-ed with attention_mask.
    chunk_size: vocabulary chunk, see token_logps.
    batch_axes: mesh axes N is split over, see token_logps.
    router_stats: when a dict, filled by a mixture-of-experts model with its
      router statistics over the real tokens (models/moe.py; {} when dense).

  Returns:
    logps_sum: [N] float32; num_tokens: [N] int32.
  """
  hidden = model(tokens, attention_mask, **_router_arg(router_stats))  # [N, T, D]
  loss_mask = loss_mask.astype(bool) & attention_mask.astype(bool)
  return sequence_logps_from_hidden(
      hidden, model.head_weight(), tokens, loss_mask, chunk_size=chunk_size,
      final_logit_softcap=model.config.final_logit_softcap, batch_axes=batch_axes,
      token_outputs=token_outputs, attention_mask=attention_mask)


def packed_sequence_logps(
    model,
    tokens: jax.Array,
    attention_mask: jax.Array,
    loss_mask: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    slot: jax.Array,
    num_slots: int,
    *,
    part_ids: jax.Array | None = None,
    first_index: jax.Array | None = None,
    first_token: jax.Array | None = None,
    first_loss: jax.Array | None = None,
    chunk_size: int = 8192,
    batch_axes: BatchAxes = None,
    token_outputs: dict | None = None,
    router_stats: dict | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-sequence summed log-probs of packed rows (jaxalign.data.packing).

  Each group's rows hold up to `num_slots` sequences end to end; attention
  stays inside a segment and positions restart at each sequence, so every
  token's log-prob is the one it has in its own padded row. Token log-probs
  are summed per slot, inside each group.

  Args:
    model: a jaxalign Transformer.
    tokens, attention_mask, loss_mask, segment_ids, positions: [G, R, L] int;
      loss_mask is 0 on each sequence's first token.
    slot: [G, R, L] int in [0, num_slots]: the sequence of the group a token
      belongs to; num_slots on padding.
    num_slots: sequences per group (B_g * S).
    part_ids: [G, R, L] int, packed shared prompts (data.packing with
      data.share_prompt): 0 on a unit's prompt, s + 1 on its response s, which
      attends to the prompt and itself. Then a response's first token is not
      scored in the rows (the token before it may be another response's): it
      is scored from the prompt's last hidden state, gathered per slot:
    first_index: [G, num_slots] int r * L + t of the prompt's last token;
    first_token: [G, num_slots] int the slot's first response token;
    first_loss: [G, num_slots] int 1 where that token is scored.
    chunk_size: vocabulary chunk, see token_logps.
    batch_axes: mesh axes G is split over, see token_logps.
    token_outputs: when a dict, filled with the per-token arrays behind the sums
      in losses/columns.py's flat form, the G groups' rows flattened: "logps"
      [G, N] (position t predicts token t + 1, as summed), "mask" [G, N] bool
      (scored), "slot" [G, N] (the scored token's slot, num_slots elsewhere),
      "rank" [G, N] (its 1-based place in its sequence), "log_sum_sq" [G, N] if
      the dict holds that key (token_log_sum_sq_probs), "stats" {name: [G, N]}
      if it holds that key (token_logps_and_stats); N = R * L. With first_index,
      N = num_slots + R * L: the slots' first response tokens lead, before all
      of their scored tokens in the rows.
    router_stats: as sequence_logps' (the rows' unused tails are not real tokens).

  Returns:
    logps_sum: [G, num_slots] float32; num_tokens: [G, num_slots] int32.
  """
  G, R, L = tokens.shape
  flat = lambda x: x.reshape(G * R, L)  # one forward over all rows
  hidden = model(flat(tokens), flat(attention_mask), positions=flat(positions),
                 segment_ids=flat(segment_ids),
                 part_ids=None if part_ids is None else flat(part_ids),
                 **_router_arg(router_stats))                           # [G*R, L, D]
  # Token t of a row is predicted from position t - 1 (same segment: t is scored
  # only if it is not a segment's first token).
  toks = flat(tokens)
  targets = jnp.concatenate([toks[:, 1:], jnp.zeros_like(toks[:, :1])], axis=1)
  mask = flat(loss_mask).astype(bool) & flat(attention_mask).astype(bool)
  mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  where = flat(slot)
  where = jnp.concatenate([where[:, 1:], jnp.full_like(where[:, :1], num_slots)], axis=1)
  logps, stats = _logps_for(token_outputs, hidden, model.head_weight(), targets,
                            chunk_size=chunk_size,
                            final_logit_softcap=model.config.final_logit_softcap,
                            batch_axes=batch_axes)                      # [G*R, L]
  logps, mask = logps.reshape(G, R * L), mask.reshape(G, R * L)
  if stats is not None:
    stats = {k: v.reshape(G, R * L) for k, v in stats.items()}
  where = jnp.where(mask, where.reshape(G, R * L), num_slots)
  seg_sum = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_slots + 1))
  sums = seg_sum(jnp.where(mask, logps, 0.0), where)[:, :num_slots]
  counts = seg_sum(mask.astype(jnp.int32), where)[:, :num_slots]
  log_sum_sq = lambda h: token_log_sum_sq_probs(  # only called when asked
      h, model.head_weight(), chunk_size=chunk_size,
      final_logit_softcap=model.config.final_logit_softcap, batch_axes=batch_axes)
  rows = (logps, mask, where, lambda: log_sum_sq(hidden).reshape(G, R * L), stats)
  wants_unscored = token_outputs is not None and "unscored" in token_outputs
  if first_index is None:
    if token_outputs is not None:
      _fill_packed(token_outputs, rows, num_slots)
    if wants_unscored:
      _fill_unscored(token_outputs, logps, *_packed_unscored(
          attention_mask, segment_ids, slot, mask, num_slots))
    return sums, counts
  # [G, num_slots, D]: one gathered hidden state per slot, scored like the rest.
  h_first = jnp.take_along_axis(hidden.reshape(G, R * L, -1), first_index[..., None], axis=1)
  first, first_stats = _logps_for(token_outputs, h_first, model.head_weight(), first_token,
                                  chunk_size=chunk_size,
                                  final_logit_softcap=model.config.final_logit_softcap,
                                  batch_axes=batch_axes)                # [G, num_slots]
  scored = first_loss.astype(bool)
  if token_outputs is not None:
    _fill_packed(token_outputs, rows, num_slots,
                 (first, scored, lambda: log_sum_sq(h_first), first_stats))
  if wants_unscored:
    _fill_unscored(token_outputs, logps, *_packed_unscored(
        attention_mask, segment_ids, slot, mask, num_slots, part_ids=part_ids,
        first=(first_index, first, scored), row_logps=logps))
  return (sums + jnp.where(scored, first, 0.0),
          counts + scored.astype(jnp.int32))


def _packed_unscored(attention_mask, segment_ids, slot, mask, num_slots, *, part_ids=None,
                     first=None, row_logps=None):
  """The unscored tokens of packed rows, for _fill_unscored: (mask [G, N], slot [G, N],
  num_slots, extra).

  A row token t + 1 counts when it is real, unscored and predicted inside its own
  sequence (t in the same segment; with shared prompts also the same part). With
  packed shared prompts (part_ids, first = (first_index, first_logps, first_scored)
  [G, num_slots], row_logps [G, N]) `extra` adds, to every slot that has a
  response, its unit's prompt tokens after the first (summed per row and segment,
  read at the slot's first_index) and its first response token when unscored.
  """
  G, R, L = attention_mask.shape
  shift = lambda x: jnp.concatenate([x[..., 1:], x[..., :1]], axis=-1)  # t -> t + 1
  real = attention_mask.astype(bool)
  inside = real & (shift(segment_ids) == segment_ids)
  inside = inside.at[..., -1].set(False)                 # the row's last: nothing follows
  if part_ids is not None:
    inside = inside & (shift(part_ids) == part_ids)
  target_real = shift(real) & inside
  target_slot = shift(slot).reshape(G, R * L)
  flat = lambda x: x.reshape(G, R * L)
  if part_ids is None:
    return flat(target_real) & ~mask, target_slot, num_slots, None
  response = flat(target_real & (shift(part_ids) > 0)) & ~mask
  first_index, first_logps, first_scored = first
  # Per (row, segment): the prompt tokens after the unit's first, summed.
  prompt = flat(target_real & (shift(part_ids) == 0))
  keys = (jnp.arange(R)[:, None] * (L + 1) + shift(segment_ids)).reshape(G, R * L)
  seg = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=R * (L + 1)))
  unit_sums = seg(jnp.where(prompt, row_logps, 0.0), keys)              # [G, R * (L + 1)]
  unit_counts = seg(prompt.astype(jnp.int32), keys)
  slot_key = ((first_index // L) * (L + 1)
              + jnp.take_along_axis(flat(segment_ids), first_index, axis=1))
  # A slot with a response has tokens in the rows (empty slots: none).
  has = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_slots + 1))(
      flat(real).astype(jnp.int32), flat(slot))[:, :num_slots] > 0        # [G, num_slots]
  first_unscored = has & ~first_scored
  extra = (jnp.where(has, jnp.take_along_axis(unit_sums, slot_key, axis=1), 0.0)
           + jnp.where(first_unscored, first_logps, 0.0),
           jnp.where(has, jnp.take_along_axis(unit_counts, slot_key, axis=1), 0)
           + first_unscored.astype(jnp.int32))
  return response, target_slot, num_slots, extra


def shared_prompt_logps(
    model,
    prompt: jax.Array,
    prompt_mask: jax.Array,
    response: jax.Array,
    response_mask: jax.Array,
    response_loss: jax.Array,
    *,
    chunk_size: int = 8192,
    batch_axes: BatchAxes = None,
    token_outputs: dict | None = None,
    router_stats: dict | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-sequence summed log-probs with each example's prompt computed once.

  The prompts run once into a KV cache; the S responses of an example then
  attend to that cache and to themselves, with positions continuing after the
  prompt, so each response's log-probs are those of prompt + response in one
  row, and gradients reach the prompt's tokens from every response. A
  response's first token is predicted from the prompt's last hidden state.

  Args:
    model: a jaxalign Transformer (uses init_cache and decode).
    prompt, prompt_mask: [B, P] int, left-padded, at least one real token each.
    response, response_mask, response_loss: [B, S, R] int, right-padded.
    chunk_size, batch_axes: see token_logps.
    token_outputs: when a dict, filled as sequence_logps_from_hidden's, each
      response a group of one slot: "logps", "mask", "slot", "rank", ("log_sum_sq",
      "stats") [B * S, R], position t for response token t.
    router_stats: as sequence_logps', over the real tokens that run: each
      prompt once and the responses.

  Returns:
    logps_sum: [B, S] float32; num_tokens: [B, S] int32.
  """
  B, P = prompt.shape
  _, S, R = response.shape
  cache = model.init_cache(B, P + R)
  prompt_stats, response_stats = ({}, {}) if router_stats is not None else (None, None)
  h_prompt, cache = model.decode(prompt, prompt_mask, cache,
                                 **_router_arg(prompt_stats))            # [B, P, D]
  per_response = lambda x: jnp.repeat(x, S, axis=0)  # [B, ...] -> [B*S, ...]
  per_layer_batch = lambda x: jnp.repeat(x, S, axis=1)  # [L, B, ...] -> [L, B*S, ...]
  cache = cache.replace(k=per_layer_batch(cache.k), v=per_layer_batch(cache.v),
                        mask=per_response(cache.mask))
  flat = lambda x: x.reshape(B * S, R)
  h_resp, _ = model.decode(flat(response), flat(response_mask), cache,
                           **_router_arg(response_stats))               # [B*S, R, D]
  if router_stats is not None and prompt_stats:
    router_stats.update({k: prompt_stats[k] + response_stats[k] for k in prompt_stats})
  # Token t of a response is predicted from response position t - 1; token 0 from
  # the prompt's last position.
  hidden = jnp.concatenate([per_response(h_prompt[:, -1:]), h_resp[:, :-1]], axis=1)
  mask = flat(response_loss).astype(bool) & flat(response_mask).astype(bool)
  logps, stats = _logps_for(token_outputs, hidden, model.head_weight(), flat(response),
                            chunk_size=chunk_size,
                            final_logit_softcap=model.config.final_logit_softcap,
                            batch_axes=batch_axes)                      # [B*S, R]
  sums = jnp.sum(jnp.where(mask, logps, 0.0), axis=1)
  if token_outputs is not None:
    _fill_rows(token_outputs, logps, mask, lambda: (
        token_log_sum_sq_probs(hidden, model.head_weight(), chunk_size=chunk_size,
                               final_logit_softcap=model.config.final_logit_softcap,
                               batch_axes=batch_axes)), stats)
    if "unscored" in token_outputs:
      # The prompt's tokens after its first, scored once per example from its own
      # hidden states (left-padded: a token counts when it and its predecessor are
      # real), go to each response that has tokens; then the responses' own
      # unscored tokens (response token 0 is predicted from the prompt's last).
      real = prompt_mask.astype(bool)
      targets = jnp.concatenate([prompt[:, 1:], jnp.zeros_like(prompt[:, :1])], axis=1)
      inside = jnp.concatenate([real[:, 1:] & real[:, :-1], jnp.zeros_like(real[:, :1])],
                               axis=1)
      prompt_logps = token_logps(h_prompt, model.head_weight(), targets,
                                 chunk_size=chunk_size,
                                 final_logit_softcap=model.config.final_logit_softcap,
                                 batch_axes=batch_axes)                  # [B, P]
      has = flat(response_mask).astype(bool).any(axis=1)                  # [B*S]
      extra = (jnp.where(has, per_response(jnp.where(inside, prompt_logps, 0.0).sum(1)), 0.0),
               jnp.where(has, per_response(inside.sum(1)), 0))
      _fill_unscored(token_outputs, logps,
                     flat(response_mask).astype(bool) & ~mask,
                     extra=(extra[0][:, None], extra[1][:, None]))
  return sums.reshape(B, S), mask.sum(axis=1).astype(jnp.int32).reshape(B, S)
