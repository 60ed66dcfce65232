"""Attention of rotated queries over keys and values, with a choice of kernel.

`attention(q, k, v, ...)` is the whole score -> softmax -> value computation of
one decoder layer. Every implementation computes the same function:

  allowed[b, t, s] = s <= q_offset + t                    (causal, over slots)
                     and s > q_offset + t - window        (sliding window, if any)
                     and key_mask[b, s]                   (padding, if given)
                     and q_segment_ids[b, t] == kv_segment_ids[b, s]   (packing)
                     and (part_ids[b, s] == 0                 (packed shared prompts:
                          or part_ids[b, s] == part_ids[b, t])  a prompt, then responses)
  logits = softcap(scale * q . k)          softcap(x) = cap * tanh(x / cap)
  out    = softmax(logits where allowed, else a large negative) @ v

with query head h reading kv head h // (H // KV) (Hugging Face's repeat_kv order).
Rows whose real keys are all masked (padding queries) are finite but
meaningless, and differ between implementations; callers mask them out.

Implementations (`model.attention`):
  xla     the einsum/softmax/einsum below, materializing the float32 [B, H, T, S]
          scores; the reference, and what runs on CPU. On CPU (no soft-cap) the
          same function runs with each kv group's query heads as one matrix and
          the softmax backward written out, self-attention in query chunks
          that skip the score blocks above the causal diagonal (`_xla_cpu`):
          no transposed copies of the scores, one fewer pass over them, 5/8 of
          them at T = 256 (issue 29).
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused
          flash attention on NVIDIA GPUs (bf16/fp16 only). Causal and window via
          its mask type; key padding and segment ids as one boolean mask (cuDNN
          turns it into a bias, so that mask is the one [B, 1, T, S] array).
  splash  the Pallas TPU splash-attention kernel, run under `shard_map` over the
          batch ("data", "fsdp") and head ("tensor") mesh axes. Causal/local
          masks are static block-sparse masks (skipped blocks cost nothing);
          key padding is expressed through segment ids: a padding token gets
          segment id -1, a real token its segment (0 without packing), so real
          queries never see padding keys, and a padding query sees at least
          itself (no empty softmax row). Part ids (packed shared prompts) run
          as a cascade of two splash passes merged by their log-sum-exps
          (jaxalign.models.splash_parts): every token within its own part,
          then response queries over their segment's prompt keys; exact
          gradients, about twice the kernel's attention FLOPs, O(T) memory.
          Off TPU it runs the same kernel in Pallas interpret mode (slow; for
          tests).
  auto    splash on TPU, cudnn on GPU, xla elsewhere.
A call a kernel cannot serve (decode with a KV cache, soft-capping or float32
on cuDNN, a sequence length that is not a multiple of splash's 128-token
block) falls back to xla, with one logged line per reason. cuDNN takes part
ids in its boolean mask, as it takes segment ids.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("jaxalign")

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
# Large negative, finite: a fully masked row gives a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Mesh axes the batch and the heads are split over (jaxalign.config's mesh).
BATCH_MESH_AXES = ("data", "fsdp")
HEAD_MESH_AXES = ("tensor",)
SPLASH_BLOCK = 128    # the kernel's smallest block (a multiple of the TPU lane width)

_logged: set[tuple[str, str]] = set()


def check_implementation(name: str) -> None:
  """Raises ValueError unless `name` is one of IMPLEMENTATIONS."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {name!r}; want one of {IMPLEMENTATIONS}")


def resolve(name: str, platform: str) -> str:
  """"auto" -> the kernel for `platform` ("tpu", "gpu", "cpu"); others unchanged."""
  check_implementation(name)
  return _AUTO.get(platform, "xla") if name == "auto" else name


def current_platform() -> str:
  """The platform being compiled for: the devices of the mesh set by `jax.set_mesh`
  (abstract TPU devices when planning), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def choose(name: str, platform: str, *, seq_len: int, kv_len: int, dtype,
           softcap: float | None, decode: bool,
           parts: bool = False) -> tuple[str, str | None]:
  """(implementation that will run, why it differs from the requested one or None).

  The one place that decides; `jaxalign plan` asks it too, to know whether the
  attention FLOPs are visible to XLA.
  """
  impl = resolve(name, platform)
  if impl == "xla":
    return "xla", None
  if decode:
    return "xla", f"{impl} does not serve the KV-cache decode path"
  if impl == "cudnn":
    if softcap is not None:
      return "xla", "cudnn has no logit soft-capping"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return "xla", f"cudnn needs bfloat16/float16 inputs, got {jnp.dtype(dtype).name}"
    return "cudnn", None
  if seq_len != kv_len or seq_len % SPLASH_BLOCK:
    return "xla", (f"splash needs query and key lengths equal and a multiple of "
                   f"{SPLASH_BLOCK}, got {seq_len} and {kv_len}")
  return "splash", None


def _log_once(requested: str, reason: str) -> None:
  if (requested, reason) not in _logged:
    _logged.add((requested, reason))
    log.warning("attention=%s: %s; using xla for these calls", requested, reason)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
              softcap: float | None = None, window: int | None = None,
              key_mask: jax.Array | None = None, q_offset: jax.Array | int | None = None,
              q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None,
              part_ids: jax.Array | None = None,
              implementation: str = "xla") -> jax.Array:
  """Causal (optionally windowed, padded, packed) grouped-query attention.

  Args:
    q: [B, T, H, Dh] rotated queries.
    k: [B, S, KV, Dh] rotated keys; H % KV == 0.
    v: [B, S, KV, Dh] values.
    scale: multiplies q . k before the soft-cap.
    softcap: Gemma's logit soft-cap (None: off).
    window: static sliding window: query slot i sees slots (i - window, i].
    key_mask: [B, S] bool, True on real keys (None: all real).
    q_offset: slot of the first query (the KV-cache decode path, S >= T):
      query t sits at slot q_offset + t. None: self-attention, T == S.
    q_segment_ids: [B, T] int >= 0; with kv_segment_ids [B, S], attention never
      crosses segments (packed sequences). Both or neither.
    part_ids: [B, T] int (self-attention with segment ids only): 0 on a
      segment's shared prompt, r > 0 on its response r; a query of part r sees
      the prompt and part r, never another response (packed shared prompts).
    implementation: one of IMPLEMENTATIONS ("auto" resolved per platform).

  Returns:
    [B, T, H, Dh] in q's dtype.
  """
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  if part_ids is not None and (q_segment_ids is None or q_offset is not None):
    raise ValueError("part_ids need segment ids and self-attention (no KV cache)")
  impl, reason = choose(implementation, current_platform(), seq_len=q.shape[1],
                        kv_len=k.shape[1], dtype=q.dtype, softcap=softcap,
                        decode=q_offset is not None, parts=part_ids is not None)
  if reason is not None:
    _log_once(implementation, reason)
  kwargs = dict(scale=scale, softcap=softcap, window=window, key_mask=key_mask,
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  if impl == "cudnn":
    return _cudnn(q, k, v, part_ids=part_ids, **kwargs)
  if impl == "splash":
    return _splash(q, k, v, part_ids=part_ids, **kwargs)
  return _xla(q, k, v, q_offset=0 if q_offset is None else q_offset, part_ids=part_ids,
              **kwargs)


def allowed_mask(T: int, S: int, *, q_offset=0, window: int | None = None,
                 key_mask=None, q_segment_ids=None, kv_segment_ids=None,
                 part_ids=None) -> jax.Array:
  """[B or 1, T, S] bool: which key slot each query may attend to (module docstring)."""
  q_idx = q_offset + jnp.arange(T)[:, None]
  k_idx = jnp.arange(S)[None, :]
  allowed = k_idx <= q_idx                                             # [T, S]
  if window is not None:
    allowed &= k_idx > q_idx - window
  allowed = allowed[None]                                              # [1, T, S]
  if key_mask is not None:
    allowed = allowed & key_mask.astype(bool)[:, None, :]
  if q_segment_ids is not None:
    allowed = allowed & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  if part_ids is not None:
    allowed = allowed & ((part_ids[:, None, :] == 0)
                         | (part_ids[:, :, None] == part_ids[:, None, :]))
  return allowed


def _xla(q, k, v, *, scale, softcap, window, key_mask, q_offset, q_segment_ids,
         kv_segment_ids, part_ids=None):
  B, T, H, Dh = q.shape
  G = k.shape[2]
  allowed = allowed_mask(T, k.shape[1], q_offset=q_offset, window=window, key_mask=key_mask,
                         q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         part_ids=part_ids)
  if softcap is None and current_platform() == "cpu":
    self_attention = isinstance(q_offset, int) and q_offset == 0 and T == k.shape[1]
    return _xla_cpu(q, k, v, allowed, scale=scale, self_attention=self_attention)
  q = q.reshape(B, T, G, H // G, Dh)                                   # [B, T, G, R, Dh]
  logits = jnp.einsum("btgrk,bsgk->bgrts", q, k,
                      preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(allowed[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  out = jnp.einsum("bgrts,bsgk->btgrk", probs, v)
  return out.reshape(B, T, H, Dh)



def _xla_cpu(q, k, v, allowed, *, scale: float, self_attention: bool) -> jax.Array:
  """`_xla` without soft-capping, laid out for XLA:CPU, with the softmax backward
  written out (`_scores_attention`): the same function and gradients (padding
  query rows, meaningless by contract, may differ).

  Each kv group's R query heads are one [T * R, Dh] matrix (rows in (t, r)
  order), so every dot of the forward and backward is a batched 2-D matmul over
  (b, g) contracting one axis (the einsum over "bgrts" contracts (r, t) in the
  value gradient, which XLA:CPU canonicalizes by copying the [T, S]
  probabilities transposed, per layer). Self-attention runs in query chunks
  (`causal_chunks`), each over the key prefix causality lets it see: the
  chunks skip the score blocks above the diagonal, which are all masked.
  """
  B, T, H, Dh = q.shape
  S, G = k.shape[1], k.shape[2]
  R = H // G
  qh = q.reshape(B, T, G, R, Dh).transpose(0, 2, 1, 3, 4).reshape(B, G, T * R, Dh)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [B, G, S, Dh]
  allowed = jnp.broadcast_to(allowed, (B, T, S))
  outs = []
  for a, b in (causal_chunks(T) if self_attention else [(0, T)]):
    end = b if self_attention else S       # query t sees keys s <= t only
    outs.append(_scores_attention(qh[:, :, a * R:b * R], kh[:, :, :end], vh[:, :, :end],
                                  allowed[:, a:b, :end], scale, R))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)  # [B, G, T * R, Dh]
  return out.reshape(B, G, T, R, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)


CPU_CHUNK = 64        # the smallest query chunk of _xla_cpu
CPU_MAX_CHUNKS = 16   # at most this many chunks (each is its own ops in the program)


def causal_chunks(T: int) -> list[tuple[int, int]]:
  """[(start, end)] query chunks of _xla_cpu's self-attention: CPU_CHUNK tokens (a
  multiple of it past CPU_MAX_CHUNKS chunks), the last one shorter where T is not a
  multiple; one chunk below 2 * CPU_CHUNK tokens.

  Chunk [a, b) attends to keys [0, b), so of the [T, T] scores they compute
  about T * (T + c) / 2 (c the chunk): 5/8 at T = 256 (docs/performance.md has
  the measured times).
  """
  if T < 2 * CPU_CHUNK:
    return [(0, T)]
  chunk = -(-max(CPU_CHUNK, -(-T // CPU_MAX_CHUNKS)) // CPU_CHUNK) * CPU_CHUNK
  return [(a, min(a + chunk, T)) for a in range(0, T, chunk)]


def _group_mask(allowed: jax.Array, G: int, R: int) -> jax.Array:
  """[B, T, S] -> [B, G, T * R, S], the rows in `_xla_cpu`'s (t, r) order."""
  B, T, S = allowed.shape
  return jnp.broadcast_to(allowed[:, None, :, None], (B, G, T, R, S)).reshape(B, G, T * R, S)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _scores_attention(q, k, v, allowed, scale, R):
  """softmax(scale * q k^T where allowed, else MASK_VALUE) v per (b, g).

  q: [B, G, T * R, Dh]; k, v: [B, G, S, Dh]; allowed: [B, T, S] bool. The
  backward uses the softmax identity FlashAttention's backward does (Dao et al.
  2022, Alg. 4): d logits = P * (dP - rowsum(dO * O)), where autodiff's
  rowsum(P * dP) is the same sum (O = P v) over the [T * R, S] scores instead of
  over [T * R, Dh]; masked logits get no gradient, as through the `where`.
  """
  return _scores_attention_fwd(q, k, v, allowed, scale, R)[0]


def _scores_attention_fwd(q, k, v, allowed, scale, R):
  logits = jnp.einsum("bgqk,bgsk->bgqs", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(_group_mask(allowed, q.shape[1], R), logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  out = jnp.einsum("bgqs,bgsk->bgqk", probs, v)
  return out, (q, k, v, allowed, probs, out)


def _scores_attention_bwd(scale, R, residuals, d_out):
  q, k, v, allowed, probs, out = residuals
  dv = jnp.einsum("bgqs,bgqk->bgsk", probs, d_out)
  dp = jnp.einsum("bgqk,bgsk->bgqs", d_out, v, preferred_element_type=jnp.float32)
  rowsum = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                   keepdims=True)                                      # [B, G, T * R, 1]
  d_logits = jnp.where(_group_mask(allowed, q.shape[1], R),
                       probs.astype(jnp.float32) * (dp - rowsum), 0.0) * scale
  d_logits = d_logits.astype(q.dtype)
  dq = jnp.einsum("bgqs,bgsk->bgqk", d_logits, k)
  dk = jnp.einsum("bgqs,bgqk->bgsk", d_logits, q)
  return dq, dk, dv, None


_scores_attention.defvjp(_scores_attention_fwd, _scores_attention_bwd)

def _cudnn(q, k, v, *, scale, softcap, window, key_mask, q_segment_ids, kv_segment_ids,
           part_ids=None):
  del softcap  # choose() never sends a soft-capped call here
  mask = None
  if key_mask is not None or q_segment_ids is not None:
    T, S = q.shape[1], k.shape[1]
    mask = jnp.ones((1, T, S), bool)
    if key_mask is not None:
      mask = mask & key_mask.astype(bool)[:, None, :]
    if q_segment_ids is not None:
      mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    if part_ids is not None:
      mask = mask & ((part_ids[:, None, :] == 0)
                     | (part_ids[:, :, None] == part_ids[:, None, :]))
    mask = jnp.broadcast_to(mask, (q.shape[0], T, S))[:, None]       # [B, 1, T, S]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation="cudnn")


def _mesh_split(mesh, axes: tuple[str, ...], size: int) -> tuple[str, ...]:
  """The axes of `axes` in `mesh` with more than one device, dropped from the end
  until their product divides `size`."""
  names = [a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1]
  while names and size % int(np.prod([mesh.shape[a] for a in names])):
    names.pop()
  return tuple(names)


def _splash_kernel(heads: int, seq_len: int, window: int | None, softcap: float | None,
                   interpret: bool, save_residuals: bool = False):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (seq_len, seq_len)
  # Our window keeps slots (i - window, i]: left extent window - 1, right 0.
  one = sm.CausalMask(shape) if window is None else sm.LocalMask(shape, (window - 1, 0), 0)
  block = next(b for b in (512, 256, 128) if seq_len % b == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                            head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                            save_residuals=save_residuals, interpret=interpret)


def _traced_at(fn, precision):
  """`fn` with its forward and its backward traced under matmul `precision`.

  A Pallas kernel's contractions take the precision in force when its body is
  traced, and the backward kernels are traced when the step is differentiated,
  outside any `with` around the forward call; this wraps both. Where `precision`
  is the process default already there is nothing to wrap and `fn` is returned as
  is: the wrapper's custom_vjp, whose forward enters the precision context, leaks
  tracers under nested rematerialization (model.remat_stages), so a bf16 splash step
  with remat_stages traces only at the default process precision.
  """
  if (precision or "default") == (jax.config.jax_default_matmul_precision or "default"):
    return fn

  @jax.custom_vjp
  def wrapped(*args):
    with jax.default_matmul_precision(precision):
      return fn(*args)

  def fwd(*args):
    with jax.default_matmul_precision(precision):
      return jax.vjp(fn, *args)   # (out, pullback): the pullback is a pytree of residuals

  def bwd(pullback, g):
    with jax.default_matmul_precision(precision):
      return pullback(g)

  wrapped.defvjp(fwd, bwd)
  return wrapped


def _kernel_precision(dtype) -> str | None:
  """The matmul precision the splash kernel is traced under: the process default
  for float32 inputs; "default" (one pass at the inputs' width) for narrower ones,
  since "highest" asks Mosaic for fp32 contractions of bf16 operands, which it
  refuses ("Bad lhs type")."""
  if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
    return jax.config.jax_default_matmul_precision
  return "default"


def _splash(q, k, v, *, scale, softcap, window, key_mask, q_segment_ids, kv_segment_ids,
            part_ids=None):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jaxalign.models import splash_parts
  B, T, H, _ = q.shape
  KV = k.shape[2]
  seg = (jnp.zeros((B, T), jnp.int32) if q_segment_ids is None
         else q_segment_ids.astype(jnp.int32))
  kv_seg = seg if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
  if key_mask is not None:   # padding: its own segment (-1) on both sides
    kv_seg = jnp.where(key_mask.astype(bool), kv_seg, -1)
    seg = jnp.where(key_mask.astype(bool), seg, -1)
  interpret = current_platform() != "tpu"
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)   # the kernel has no scale
  parts = part_ids is not None

  def local(q, k, v, seg, kv_seg, *part):
    kernel = _splash_kernel(q.shape[2], T, window, softcap, interpret, save_residuals=parts)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)           # [b, T, h, Dh] -> [b, h, T, Dh]
    if parts:   # self-attention: one part id per slot, queries and keys alike
      run = jax.vmap(lambda q, k, v, s, ks, p: splash_parts.shared_prompt_attention(
          kernel, q, k, v, s, ks, p))
    else:
      run = jax.vmap(lambda q, k, v, s, ks: kernel(q, k, v, sk.SegmentIds(q=s, kv=ks)))
    out = _traced_at(run, _kernel_precision(q.dtype))(
        heads_first(q), heads_first(k), heads_first(v), seg, kv_seg, *part)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)

  extra = (part_ids.astype(jnp.int32),) if parts else ()
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, seg, kv_seg, *extra)
  P = jax.sharding.PartitionSpec
  batch = _mesh_split(mesh, BATCH_MESH_AXES, B) or None
  heads = _mesh_split(mesh, HEAD_MESH_AXES, KV) or None
  qkv_spec, seg_spec = P(batch, None, heads, None), P(batch, None)
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(qkv_spec,) * 3 + (seg_spec,) * (2 + len(extra)),
                       out_specs=qkv_spec, check_vma=False)(q, k, v, seg, kv_seg, *extra)
