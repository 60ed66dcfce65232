"""Context parallelism: attention over a sequence split along the mesh's "context" axis.

With a mesh context size c > 1 (config.mesh.shape = (data, fsdp, context,
tensor)) every activation of the forward is split along the sequence into c
contiguous shards of T / c tokens (`constrain_sequence`; the logical rule
("activation_length", "context") of jaxalign/sharding.py). Everything but
attention is per-token or a reduction XLA partitions by itself (the log-prob
head's per-sequence sums reduce over the shards; the label shift at a shard
edge is a neighbour exchange XLA inserts). Attention needs every key of a
sequence, so it runs under `jax.shard_map` with one strategy:

  all-gather K/V, load-balanced: each device keeps its T / c queries and
  all-gathers the keys, values and the key side of the masks (segment ids, key
  padding, shared-prompt part ids) over "context", then attends its queries to
  the whole sequence. The backward reduce-scatters the keys' and values'
  gradients back to their shards (the transpose of the all-gather).

  Load balance (as MaxText's context_parallel_load_balance): with causal
  attention a contiguous split gives the last shard (2c - 1) / c times the mean
  work. When 2c divides T the forward runs the sequence in the balanced order
  instead: cut into 2c chunks, shard i holds chunks i and 2c - 1 - i, so every
  shard has the same number of unmasked (query, key) pairs. `Transformer.__call__`
  reorders its inputs (tokens, positions, masks, segment and part ids: replicated
  over context, so the reorder is local) with `balance` and its output back
  with `unbalance`; everything between is per token, and attention reads each
  token's slot from the order. Otherwise (T % 2c != 0) the shards are contiguous.

The mask is exactly `attention.attention`'s (causal, sliding window, key
padding, packing segment ids, shared-prompt part ids across shard edges, GQA):
  xla     the reference per shard: `attention.allowed_mask`'s mask, read at each
          query's and key's slot.
  splash  on TPU: the kernel built for the whole [T, T] mask with
          q_seq_shards = c and its mask tables split over "context" (the
          MaxText approach: `SplashAttentionKernel.manual_sharding_spec`), so each
          shard runs its [T/c, T] rows and skips the fully masked blocks.
Part ids (packed shared prompts) on splash run splash_parts' two-pass cascade
per shard (own part, then the segment's prompt; merged by log-sum-exp), the
query side local and the key side gathered.

XLA's reference per shard does every block, balanced or not; splash skips
the masked blocks, so the order decides its time (`flops.context_imbalance`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import attention as attention_lib

CONTEXT_AXIS = "context"
STRATEGY = "all-gather K/V, load-balanced causal order (2c chunks: shard i holds i, 2c-1-i)"


def context_shards() -> int:
  """Devices on the context axis of the mesh being traced for (1: none)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[CONTEXT_AXIS])


def balanced(length: int, shards: int | None = None) -> bool:
  """Whether a sequence of `length` tokens runs in the load-balanced order over
  `shards` (default: the mesh's context size) context shards."""
  shards = context_shards() if shards is None else shards
  return shards > 1 and length % (2 * shards) == 0


def balanced_slots(length: int, shards: int) -> np.ndarray:
  """[length] int32: the slot (natural position) of each place of the balanced order."""
  chunks = np.arange(length, dtype=np.int32).reshape(2 * shards, length // (2 * shards))
  order = [c for i in range(shards) for c in (i, 2 * shards - 1 - i)]
  return chunks[order].reshape(-1)


def balance(x: jax.Array, axis: int = 1) -> jax.Array:
  """`x` with its sequence axis in the balanced order (unchanged when not `balanced`)."""
  if not balanced(x.shape[axis]):
    return x
  return jnp.take(x, balanced_slots(x.shape[axis], context_shards()), axis=axis)


def unbalance(x: jax.Array, axis: int = 1) -> jax.Array:
  """The inverse of `balance`: the sequence axis back in natural order."""
  if not balanced(x.shape[axis]):
    return x
  inverse = np.argsort(balanced_slots(x.shape[axis], context_shards())).astype(np.int32)
  return jnp.take(x, inverse, axis=axis)


def constrain_sequence(x: jax.Array, axis: int = 1) -> jax.Array:
  """`x` with dimension `axis` (the sequence) split over "context", the others left
  to XLA; unchanged without a context axis larger than 1."""
  if context_shards() == 1:
    return x
  P = jax.sharding.PartitionSpec
  spec = [P.UNCONSTRAINED] * x.ndim
  spec[axis] = CONTEXT_AXIS
  return jax.lax.with_sharding_constraint(x, P(*spec))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
              softcap: float | None = None, window: int | None = None,
              key_mask: jax.Array | None = None, q_offset=None,
              q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None,
              part_ids: jax.Array | None = None,
              implementation: str = "xla") -> jax.Array:
  """`attention.attention` with the sequence split over the mesh's "context" axis.

  Same arguments and result ([B, T, H, Dh]); self-attention only (q_offset None,
  kv_segment_ids equal to q_segment_ids). When `balanced(T)` every [B, T, ...]
  argument and the result are in the balanced order (`balance`), as the
  transformer runs them. Without a context axis larger than 1, or for a KV-cache
  call, it is `attention.attention` itself.
  """
  shards = context_shards()
  if shards == 1 or q_offset is not None:
    return attention_lib.attention(
        q, k, v, scale=scale, softcap=softcap, window=window, key_mask=key_mask,
        q_offset=q_offset, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        part_ids=part_ids, implementation=implementation)
  B, T, H, _ = q.shape
  KV = k.shape[2]
  if T % shards:
    raise ValueError(f"sequence length {T} does not split into {shards} context shards")
  impl, reason = attention_lib.choose(
      implementation, attention_lib.current_platform(), seq_len=T // shards,
      kv_len=T // shards, dtype=q.dtype, softcap=softcap, decode=False,
      parts=part_ids is not None)
  if impl == "cudnn":
    impl, reason = "xla", "cudnn is not run per context shard"
  if reason is not None:
    attention_lib._log_once(implementation, reason)
  seg = (jnp.zeros((B, T), jnp.int32) if q_segment_ids is None
         else q_segment_ids.astype(jnp.int32))
  real = jnp.ones((B, T), bool) if key_mask is None else key_mask.astype(bool)
  mesh = jax.sharding.get_abstract_mesh()
  P = jax.sharding.PartitionSpec
  batch = attention_lib._mesh_split(mesh, attention_lib.BATCH_MESH_AXES, B) or None
  heads = attention_lib._mesh_split(mesh, attention_lib.HEAD_MESH_AXES, KV) or None
  qkv_spec, tok_spec = P(batch, CONTEXT_AXIS, heads, None), P(batch, CONTEXT_AXIS)
  gather = lambda x: jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)
  # The natural position of every place of the (balanced or contiguous) order.
  slots = (balanced_slots(T, shards) if balanced(T, shards)
           else np.arange(T, dtype=np.int32))
  to_natural = np.argsort(slots).astype(np.int32)

  if impl == "splash":
    local_heads = H // int(np.prod([mesh.shape[a] for a in heads or ()]))
    parts = part_ids is not None
    kernel = _splash_kernel(local_heads, T, shards, window, softcap,
                            attention_lib.current_platform() != "tpu", slots,
                            save_residuals=parts)
    kernel_spec = kernel.manual_sharding_spec(
        jax.sharding.NamedSharding(mesh, P(None, CONTEXT_AXIS)))
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)   # the kernel has no scale

    def local_splash(kernel, q, k, v, seg, real, *part):
      from jax.experimental.pallas.ops.tpu.splash_attention import (
          splash_attention_kernel as sk)
      from jaxalign.models import splash_parts
      # Padding is its own segment (-1) on both sides, as attention._splash.
      q_seg = jnp.where(real, seg, -1)
      # The keys in natural order: the kernel's key index is the key's slot, its
      # query rows are told their slots by the mask's q_sequence.
      natural = lambda x: jnp.take(gather(x), to_natural, axis=1)
      kv_seg = natural(q_seg)
      heads_first = lambda x: jnp.swapaxes(x, 1, 2)           # [b, t, h, Dh] -> [b, h, t, Dh]
      if part:   # packed shared prompts: the two-pass cascade (splash_parts), per shard
        q_part, kv_part = part[0], natural(part[0])
        num_parts = jnp.max(kv_part) + 1      # the whole sequence's: the same on every shard

        def one(q, k, v, s, ks, qp, kp):
          own, prompt = splash_parts.shared_prompt_ids(s, qp, ks, kp, num_parts=num_parts)
          return splash_parts.cascade((kernel, kernel), q, (k, k), (v, v), (own, prompt))

        run = jax.vmap(one)
        extra = (q_part, kv_part)
      else:
        run = jax.vmap(lambda q, k, v, s, ks: kernel(q, k, v, sk.SegmentIds(q=s, kv=ks)))
        extra = ()
      out = attention_lib._traced_at(run, attention_lib._kernel_precision(q.dtype))(
          heads_first(q), heads_first(natural(k)), heads_first(natural(v)), q_seg, kv_seg,
          *extra)
      return jnp.swapaxes(out, 1, 2).astype(q.dtype)

    extra = (part_ids.astype(jnp.int32),) if parts else ()
    return jax.shard_map(
        local_splash, mesh=mesh,
        in_specs=(kernel_spec,) + (qkv_spec,) * 3 + (tok_spec,) * (2 + len(extra)),
        out_specs=qkv_spec, check_vma=False)(kernel, q, k, v, seg, real, *extra)

  parts = part_ids is not None
  operands = (q, k, v, seg, real) + ((part_ids.astype(jnp.int32),) if parts else ())

  def local_xla(q, k, v, seg, real, *rest):
    t = q.shape[1]
    q_slot = jax.lax.dynamic_slice_in_dim(jnp.asarray(slots),
                                          jax.lax.axis_index(CONTEXT_AXIS) * t, t)
    k_slot = jnp.asarray(slots)
    k_all, v_all = gather(k), gather(v)
    allowed = k_slot[None, :] <= q_slot[:, None]                        # [t, T] causal
    if window is not None:
      allowed &= k_slot[None, :] > q_slot[:, None] - window
    allowed = (allowed[None] & gather(real)[:, None, :]
               & (seg[:, :, None] == gather(seg)[:, None, :]))          # [b, t, T]
    if rest:
      q_part, kv_part = rest[0], gather(rest[0])
      allowed = allowed & ((kv_part[:, None, :] == 0)
                           | (q_part[:, :, None] == kv_part[:, None, :]))
    return _xla_masked(q, k_all, v_all, allowed, scale=scale, softcap=softcap)

  return jax.shard_map(
      local_xla, mesh=mesh, in_specs=(qkv_spec,) * 3 + (tok_spec,) * (len(operands) - 3),
      out_specs=qkv_spec, check_vma=False)(*operands)


def _xla_masked(q, k, v, allowed, *, scale, softcap):
  """softmax(softcap(scale q.k) where allowed) @ v, grouped-query, float32 scores;
  `attention._xla` with the mask given."""
  b, t, H, Dh = q.shape
  G = k.shape[2]
  q = q.reshape(b, t, G, H // G, Dh)
  logits = jnp.einsum("btgrk,bsgk->bgrts", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(allowed[:, None, None], logits, attention_lib.MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bgrts,bsgk->btgrk", probs, v).reshape(b, t, H, Dh)


def _splash_kernel(heads: int, seq_len: int, shards: int, window: int | None,
                   softcap: float | None, interpret: bool, slots: np.ndarray,
                   save_residuals: bool = False):
  """The splash kernel of the whole [seq_len, seq_len] causal (local) mask, its rows
  split into `shards` query shards (each shard's blocks must be whole); row r is the
  query of slot slots[r] (the balanced order), the key columns are slots."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (seq_len, seq_len)
  one = sm.CausalMask(shape) if window is None else sm.LocalMask(shape, (window - 1, 0), 0)
  # A computable mask evaluates mask_function(q_sequence[rows], columns), in the
  # block tables and inside the kernel (q_sequence split over the shards with it).
  one.q_sequence = np.asarray(slots, np.int32)
  rows = seq_len // shards
  block = next(b for b in (512, 256, 128) if rows % b == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                            head_shards=1, q_seq_shards=shards,
                            attn_logits_soft_cap=softcap, save_residuals=save_residuals,
                            interpret=interpret)
