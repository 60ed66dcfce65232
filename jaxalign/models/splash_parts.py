"""Splash attention over a union of key sets, and packed shared prompts on it.

The splash kernel's masks are a static block mask ANDed with segment-id
equality, so "a response sees its prompt and itself" (packed shared prompts:
`part_ids` in jaxalign.models.attention) is no single splash call. It is two:

  pass own     every token attends causally within its own part of its own
               segment (segment ids that combine segment and part);
  pass prompt  every response token attends to its segment's prompt tokens
               (ids: response queries and prompt keys carry their segment,
               every other query and key an id that matches nothing).

For every query the two key sets are disjoint and their union is the
shared-prompt mask. `cascade` runs the passes (the kernel returns each pass's
output and log-sum-exp, `save_residuals`) and merges them:

  lse = logsumexp_i(lse_i),   out = sum_i exp(lse_i - lse) * out_i

A row with no allowed key in a pass gets, from the kernel, a log-sum-exp near
the mask value (-2.4e38: its scores are all the mask value) or -inf (no block
visited), so it weighs exactly 0. Gradients are exact: the flash backward of a
pass run with the MERGED output and log-sum-exp (P = exp(s - lse) restricted
to the pass's keys, D = rowsum(out * dout)) is that pass's share of the merged
softmax's dq, dk and dv, so `cascade`'s custom VJP calls the kernel's backward
once per pass with the merged residuals and sums the shares; prompt keys
receive every response's gradient. The kernel module keeps that backward
private (`_splash_attention_bwd`); `_pass_backward` is the one place that
calls it, and the shared-prompt equality tests (values and gradients against
the XLA reference) cover it.

Cost: two kernel passes over the row's causal blocks (the static mask is the
same for both), so about twice a packed splash call's attention FLOPs, at
O(T) memory (no [T, T] array). Splash's dynamic-mask path would run one pass,
but its mask is a [heads, T, T] array per example (partial mask blocks of
int8): 32 heads x 4096^2 = 512 MiB per sequence and layer at the 8B recipe's
T=4096, the [B, H, T, T] cost the XLA fallback already pays.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

# Ids of the prompt pass that match nothing (segments are >= 0, padding -1).
NO_QUERY = -2
NO_KEY = -3


def cascade(kernels: Sequence[sk.SplashAttentionKernel], q: jax.Array,
            ks: Sequence[jax.Array], vs: Sequence[jax.Array],
            segment_ids: Sequence[sk.SegmentIds | None]) -> jax.Array:
  """Softmax attention of `q` over the union of the passes' key sets, exact gradients.

  Pass i is kernels[i](q, ks[i], vs[i], segment_ids[i]); the passes' allowed
  (query, key) sets must be disjoint (a key seen by two passes counts twice).
  Query and key lengths may differ (kernels built for masks of shape
  (Tq, Tk_i)); every query row must see at least one key in some pass.

  Args:
    kernels: splash kernels made with save_residuals=True (`make_kernel`), one
      per pass; one kernel may serve several passes.
    q: [H, Tq, Dh] queries, already scaled.
    ks: per pass, [KV, Tk_i, Dh] keys (H % KV == 0); the same array may be
      passed for several passes (its gradients are summed).
    vs: per pass, [KV, Tk_i, Dh] values.
    segment_ids: per pass, SegmentIds(q=[Tq], kv=[Tk_i]) int32, or None.

  Returns:
    [H, Tq, Dh] in q's dtype.
  """
  kernels = tuple(kernels)
  if not len(kernels) == len(ks) == len(vs) == len(segment_ids):
    raise ValueError("cascade: one kernel, key, value and segment ids per pass")

  # The kernels travel as arguments, not in a closure: they are pytrees of mask
  # arrays, which are tracers when built under shard_map.
  def forward(kernels, q, ks, vs, ids):
    outs, lses = [], []
    for kernel, k, v, i in zip(kernels, ks, vs, ids):
      out, (lse,) = kernel(q, k, v, i)                                 # [H, Tq, Dh], [H, Tq]
      outs.append(out)
      lses.append(lse)
    out, lse = _merge(outs, lses)
    return out.astype(q.dtype), lse

  @jax.custom_vjp
  def run(kernels, q, ks, vs, ids):
    return forward(kernels, q, ks, vs, ids)[0]

  def run_fwd(kernels, q, ks, vs, ids):
    out, lse = forward(kernels, q, ks, vs, ids)
    return out, (kernels, q, ks, vs, ids, out, lse)

  def run_bwd(res, dout):
    kernels, q, ks, vs, ids, out, lse = res
    dq = jnp.zeros(q.shape, jnp.float32)
    dks, dvs = [], []
    for kernel, k, v, i in zip(kernels, ks, vs, ids):
      dq_i, dk, dv = _pass_backward(kernel, q, k, v, i, out, lse, dout)
      dq = dq + dq_i.astype(jnp.float32)
      dks.append(dk)
      dvs.append(dv)
    none = lambda tree: jax.tree.map(lambda _: None, tree)
    return none(kernels), dq.astype(q.dtype), tuple(dks), tuple(dvs), none(ids)

  run.defvjp(run_fwd, run_bwd)
  return run(kernels, q, tuple(ks), tuple(vs), tuple(segment_ids))


def _merge(outs, lses):
  """(sum_i w_i out_i, logsumexp_i lse_i) in float32, w_i = exp(lse_i - lse); a pass
  whose row saw nothing (lse_i -inf, its out NaN) contributes 0."""
  lses = jnp.stack(lses).astype(jnp.float32)                           # [N, H, Tq]
  top = jnp.max(lses, axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  lse = top + jnp.log(jnp.sum(jnp.exp(lses - top), axis=0))           # [H, Tq]
  out = 0.0
  for out_i, lse_i in zip(outs, lses):
    w = jnp.where(jnp.isneginf(lse_i), 0.0, jnp.exp(lse_i - lse))[..., None]
    out = out + jnp.where(w > 0, w * out_i.astype(jnp.float32), 0.0)
  return out, lse


def _pass_backward(kernel: sk.SplashAttentionKernel, q, k, v, segment_ids, out, lse, dout):
  """(dq, dk, dv) of one pass given the cascade's merged `out` and `lse`: the kernel's
  own backward (private in jax's splash module; its residual tuple is
  (q, k, v, segment_ids, sinks, out, logsumexp, dq_mask_info, dkv_mask_info))."""
  kw = kernel.kwargs
  res = (q, k, v, segment_ids, None, out, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
  # Private: the kernel module has no public backward that takes given residuals.
  grads = sk._splash_attention_bwd(
      False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
      kw["attn_logits_soft_cap"], kw["interpret"], res, dout)
  _, _, _, dq, dk, dv, _, _ = grads
  return dq, dk, dv


def shared_prompt_ids(q_segment_ids: jax.Array, q_part_ids: jax.Array,
                      kv_segment_ids: jax.Array, kv_part_ids: jax.Array, *,
                      num_parts) -> tuple[sk.SegmentIds, sk.SegmentIds]:
  """Segment ids of the two shared-prompt passes (module docstring): (own, prompt).

  Args:
    q_segment_ids: [..., Tq] int32, a query's segment (>= 0), -1 on padding.
    q_part_ids: [..., Tq] int32, 0 on a segment's prompt, r > 0 on its response r.
    kv_segment_ids, kv_part_ids: [..., Tk] the same for the keys.
    num_parts: int or int32 scalar above every part id (the own pass numbers a
      token segment * num_parts + part, exact while that stays below 2**31).

  Returns:
    SegmentIds(q, kv) of the own pass and of the prompt pass, int32.
  """
  def own(seg, part):
    return jnp.where(seg >= 0, seg * num_parts + part, -1).astype(jnp.int32)

  prompt_q = jnp.where((q_segment_ids >= 0) & (q_part_ids > 0), q_segment_ids, NO_QUERY)
  prompt_kv = jnp.where((kv_segment_ids >= 0) & (kv_part_ids == 0), kv_segment_ids, NO_KEY)
  return (sk.SegmentIds(q=own(q_segment_ids, q_part_ids), kv=own(kv_segment_ids, kv_part_ids)),
          sk.SegmentIds(q=prompt_q.astype(jnp.int32), kv=prompt_kv.astype(jnp.int32)))


def shared_prompt_attention(kernel: sk.SplashAttentionKernel, q: jax.Array, k: jax.Array,
                            v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                            part_ids: jax.Array) -> jax.Array:
  """One sequence's packed shared-prompt self-attention on splash (two passes).

  Args:
    kernel: made with save_residuals=True for a causal (or local) mask of (T, T).
    q: [H, T, Dh] scaled queries; k, v: [KV, T, Dh].
    q_segment_ids, kv_segment_ids: [T] int32, -1 on padding.
    part_ids: [T] int32, 0 on prompts (and padding), r > 0 on response r.

  Returns:
    [H, T, Dh] in q's dtype.
  """
  num_parts = jnp.max(part_ids) + 1
  own, prompt = shared_prompt_ids(q_segment_ids, part_ids, kv_segment_ids, part_ids,
                                  num_parts=num_parts)
  return cascade((kernel, kernel), q, (k, k), (v, v), (own, prompt))
