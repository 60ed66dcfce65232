"""jaxalign.models.attention: every kernel equals the reference, in values and gradients.

References, none of them our own code: a float64 NumPy transcription of the
definition (module docstring), `jax.nn.dot_product_attention(implementation=
"xla")` with a boolean mask, and Google's Pallas splash-attention kernel (run
on CPU in Pallas interpret mode), whose backward is hand-written. Only rows of
real (non-padding) queries are compared: padding rows are meaningless by
contract. The cuDNN path needs an NVIDIA GPU; its test skips elsewhere.
"""
import logging
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import attention as attn
from jaxalign.models import transformer


def _inputs(B, T, H, KV, Dh, S=None, seed=0, dtype=jnp.float32):
  S = T if S is None else S
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, H, Dh), dtype),
          jax.random.normal(kk, (B, S, KV, Dh), dtype),
          jax.random.normal(kv, (B, S, KV, Dh), dtype))


def _lengths_mask(lengths, T, side):
  idx = np.arange(T)[None]
  lengths = np.asarray(lengths)[:, None]
  return jnp.asarray(idx < lengths if side == "right" else idx >= T - lengths)


def numpy_attention(q, k, v, *, scale, softcap=None, window=None, key_mask=None, q_offset=0,
                    q_seg=None, kv_seg=None):
  """The definition, one query at a time, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, Dh = q.shape
  S, KV = k.shape[1], k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      g = h // (H // KV)
      for t in range(T):
        i = q_offset + t
        ok = np.arange(S) <= i
        if window is not None:
          ok &= np.arange(S) > i - window
        if key_mask is not None:
          ok &= np.asarray(key_mask[b], bool)
        if q_seg is not None:
          ok &= np.asarray(kv_seg[b]) == int(q_seg[b, t])
        if not ok.any():
          continue
        logits = scale * (k[b, :, g] @ q[b, t, h])
        if softcap is not None:
          logits = softcap * np.tanh(logits / softcap)
        logits = np.where(ok, logits, -np.inf)
        p = np.exp(logits - logits.max())
        out[b, t, h] = (p / p.sum()) @ v[b, :, g]
  return out


def _jit_attention(q, k, v, **kw):
  """attn.attention compiled once (eager op-by-op dispatch is slow on a loaded CPU)."""
  return jax.jit(lambda q, k, v: attn.attention(q, k, v, **kw))(q, k, v)


CASES = {   # name: (H, KV, softcap, window, padding side, lengths)
    "mha_right_pad": (4, 4, None, None, "right", (16, 11)),
    "gqa_left_pad": (4, 2, None, None, "left", (16, 9)),
    "mqa_window": (4, 1, None, 5, "right", (16, 14)),
    "softcap_window_left_pad": (4, 2, 20.0, 6, "left", (12, 16)),
}


def _assert_same_value_and_grads(ours, theirs, q, k, v):
  """Two scalar functions of (q, k, v): equal values and q/k/v gradients, jitted."""
  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
                      for f in (ours, theirs))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_xla_matches_the_numpy_definition(name):
  H, KV, softcap, window, side, lengths = CASES[name]
  q, k, v = _inputs(2, 16, H, KV, 8, seed=1)
  mask = _lengths_mask(lengths, 16, side)
  out = _jit_attention(q, k, v, scale=0.3, softcap=softcap, window=window, key_mask=mask,
                       implementation="xla")
  ref = numpy_attention(q, k, v, scale=0.3, softcap=softcap, window=window, key_mask=mask)
  keep = np.asarray(mask)[..., None, None]
  np.testing.assert_allclose(np.where(keep, out, 0), np.where(keep, ref, 0), atol=1e-5)


def test_xla_segments_and_decode_offset_match_the_numpy_definition():
  q, k, v = _inputs(2, 12, 4, 2, 8, seed=2)
  seg = jnp.asarray([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12])
  out = _jit_attention(q, k, v, scale=0.25, q_segment_ids=seg, kv_segment_ids=seg,
                       window=4, implementation="xla")
  ref = numpy_attention(q, k, v, scale=0.25, window=4, q_seg=seg, kv_seg=seg)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Decode: 3 queries at cache slots 6..8 of 10, a left-padded row.
  q, k, v = _inputs(2, 3, 4, 2, 8, S=10, seed=3)
  mask = jnp.asarray([[True] * 10, [False] * 2 + [True] * 8])
  out = _jit_attention(q, k, v, scale=0.25, key_mask=mask, q_offset=6, implementation="xla")
  ref = numpy_attention(q, k, v, scale=0.25, key_mask=mask, q_offset=6)
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if CASES[n][2] is None])
def test_xla_matches_jax_nn_values_and_gradients(name):
  H, KV, _, window, side, lengths = CASES[name]
  q, k, v = _inputs(2, 16, H, KV, 8, seed=4)
  mask = _lengths_mask(lengths, 16, side)
  w = jax.random.normal(jax.random.key(9), q.shape) * mask[..., None, None]

  def ours(q, k, v):
    return jnp.sum(w * attn.attention(q, k, v, scale=0.3, window=window, key_mask=mask,
                                      implementation="xla"))

  def theirs(q, k, v):
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None, None, :], scale=0.3, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0), implementation="xla")
    return jnp.sum(w * out)

  _assert_same_value_and_grads(ours, theirs, q, k, v)


def _value_and_grads(impl, q, k, v, w, **kw):
  f = lambda q, k, v: jnp.sum(w * attn.attention(q, k, v, implementation=impl, **kw))
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("case", ["gqa_right_pad_window_softcap", "left_pad_segments"])
def test_splash_kernel_matches_xla_values_and_gradients(case):
  # 128: the kernel's smallest block. Interpret mode runs the real Pallas kernel.
  B, T, H, KV, Dh = 2, 128, 4, 2, 16
  q, k, v = _inputs(B, T, H, KV, Dh, seed=5)
  if case == "gqa_right_pad_window_softcap":
    mask, seg = _lengths_mask((128, 90), T, "right"), None
    kw = dict(scale=0.25, softcap=5.0, window=40, key_mask=mask)
  else:
    mask = _lengths_mask((100, 128), T, "left")
    seg = jnp.asarray([[0] * 60 + [1] * 68, [0] * 30 + [1] * 50 + [2] * 48])
    kw = dict(scale=0.25, key_mask=mask, q_segment_ids=seg, kv_segment_ids=seg)
  w = jax.random.normal(jax.random.key(7), q.shape) * mask[..., None, None]
  ref_val, ref_grads = _value_and_grads("xla", q, k, v, w, **kw)
  val, grads = _value_and_grads("splash", q, k, v, w, **kw)
  np.testing.assert_allclose(val, ref_val, rtol=1e-4)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=2e-4)


def test_splash_under_a_mesh_shards_batch_and_heads():
  B, T, H, KV, Dh = 4, 128, 4, 2, 16
  q, k, v = _inputs(B, T, H, KV, Dh, seed=6)
  mask = _lengths_mask((128, 100, 70, 128), T, "right")
  kw = dict(scale=0.25, window=64, key_mask=mask)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  ref = _jit_attention(q, k, v, implementation="xla", **kw)
  with jax.set_mesh(mesh):
    f = jax.jit(lambda q, k, v, m: attn.attention(q, k, v, implementation="splash",
                                                  **{**kw, "key_mask": m}))
    out = f(q, k, v, mask)
    assert "shard_map" in str(f.trace(q, k, v, mask).jaxpr) or "shmap" in str(
        f.trace(q, k, v, mask).jaxpr)
  keep = np.asarray(mask)[..., None, None]
  np.testing.assert_allclose(np.where(keep, out, 0), np.where(keep, ref, 0), atol=1e-5)


def _shared_layout(rows, T):
  """(segment ids, part ids, real mask) [len(rows), T] of packed shared-prompt rows, each
  a list of units (prompt tokens, response tokens...), the rest padding (as
  jaxalign.data.packing.pack_shared_batch lays them: padding its own segment, part 0)."""
  seg, part = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
  real = np.zeros((len(rows), T), bool)
  for b, units in enumerate(rows):
    at = 0
    for u, (prompt, *responses) in enumerate(units):
      for r, n in enumerate((prompt, *responses)):
        seg[b, at:at + n], part[b, at:at + n] = u, r
        at += n
    seg[b, at:], real[b, :at] = len(units), True
  return jnp.asarray(seg), jnp.asarray(part), jnp.asarray(real)


SHARED_CASES = {   # name: (T, H, KV, softcap, window, rows of units (prompt, responses...))
    # Several units per row, units and parts across the 128-token block edge, padding.
    "gqa_packed_padded": (256, 4, 2, None, None,
                          [[(40, 30, 50), (60, 20, 26)], [(100, 90, 66)]]),
    "mqa_window_softcap": (128, 4, 1, 5.0, 24, [[(30, 10, 40, 20)], [(7, 3), (50, 60)]]),
}


@pytest.mark.parametrize("name", sorted(SHARED_CASES))
def test_shared_prompt_splash_matches_xla_values_and_gradients(name):
  """Packed shared prompts on splash (two kernel passes merged by log-sum-exp, a custom
  VJP through the kernel's backward) == the XLA reference, values and q/k/v gradients,
  under a mesh (shard_map over batch and heads). Prompt keys get every response's
  gradient: dk, dv on prompt tokens are compared too."""
  T, H, KV, softcap, window, rows = SHARED_CASES[name]
  seg, part, real = _shared_layout(rows, T)
  q, k, v = _inputs(len(rows), T, H, KV, 16, seed=11)
  kw = dict(scale=0.25, softcap=softcap, window=window, key_mask=real, q_segment_ids=seg,
            kv_segment_ids=seg, part_ids=part)
  w = jax.random.normal(jax.random.key(12), q.shape) * real[..., None, None]
  ref_val, ref_grads = _value_and_grads("xla", q, k, v, w, **kw)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    val, grads = _value_and_grads("splash", q, k, v, w, **kw)
    # The kernel runs (no fallback to xla).
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attn.attention(
        q, k, v, implementation="splash", **kw))(q, k, v))
  assert "pallas_call" in jaxpr
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=2e-5)


def _shared_mask(seg, part, real):
  """[B, T, T] bool of packed shared-prompt rows, from the definition (module docstring
  of jaxalign.models.attention), in NumPy."""
  seg, part, real = (np.asarray(x) for x in (seg, part, real))
  T = seg.shape[1]
  causal = np.tril(np.ones((T, T), bool))
  same_seg = seg[:, :, None] == seg[:, None, :]
  parts_ok = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
  return causal[None] & real[:, None, :] & same_seg & parts_ok


@pytest.mark.parametrize("kv,T", [(1, 48), (2, 48), (4, 48), (2, 160)])
def test_cpu_xla_packed_shared_matches_jax_nn_values_and_gradients(kv, T):
  """The CPU form of the xla kernel (query heads grouped per kv head, the softmax
  backward written out, T = 160 in query chunks of 64, 64, 32 over their causal key
  prefixes) == jax.nn.dot_product_attention with the definition's mask, values and
  q/k/v gradients, on packed shared-prompt rows with padding (MHA, GQA, MQA)."""
  assert len(attn.causal_chunks(T)) == (1 if T < 128 else 3)
  rows = ([[(10, 6, 9), (5, 4, 7)], [(20, 12, 3)]] if T < 128 else
          [[(50, 30, 20), (10, 20, 5)], [(70, 40, 45)]])   # units across chunk edges
  seg, part, real = _shared_layout(rows, T)
  q, k, v = _inputs(2, T, 4, kv, 8, seed=21)
  w = jax.random.normal(jax.random.key(22), q.shape) * real[..., None, None]
  mask = jnp.asarray(_shared_mask(seg, part, real))

  def ours(q, k, v):
    return jnp.sum(w * attn.attention(q, k, v, scale=0.3, key_mask=real, q_segment_ids=seg,
                                      kv_segment_ids=seg, part_ids=part,
                                      implementation="xla"))

  def theirs(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=0.3,
                                       implementation="xla")
    return jnp.sum(w * out)

  _assert_same_value_and_grads(ours, theirs, q, k, v)


def test_cpu_xla_gradient_makes_no_transposed_copy_of_the_scores():
  """On CPU the xla kernel's forward + backward compiles without copying or
  transposing a [B, H, T, S]-sized array (the scores, probabilities or their
  gradient): each kv group's query heads are one matrix, so every attention dot
  contracts a single axis (issue 29). The einsum over "bgrts" contracts (r, t) in
  the value gradient, and XLA:CPU copied the probabilities transposed for it."""
  B, T, H, KV, Dh = 2, 32, 4, 2, 8
  q, k, v = _inputs(B, T, H, KV, Dh, seed=23)
  seg = jnp.asarray([[0] * 20 + [1] * 12, [0] * 32])
  part = jnp.asarray([[0] * 8 + [1] * 6 + [2] * 6 + [0] * 5 + [1] * 7, [0] * 12 + [1] * 20])

  def f(q, k, v):
    return jnp.sum(attn.attention(q, k, v, scale=0.3, key_mask=jnp.ones((B, T), bool),
                                  q_segment_ids=seg, kv_segment_ids=seg, part_ids=part,
                                  implementation="xla"))

  hlo = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  score_sized = []
  for name, dims, op in re.findall(r"%(\S+) = f32\[([\d,]*)\]\S* (\w+)\(", hlo):
    if op in ("copy", "transpose") and math.prod(int(d) for d in dims.split(",")) == B * H * T * T:
      score_sized.append(name)
  assert score_sized == []
  assert "exponential" in hlo     # the softmax is in the compiled program


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_values_and_gradients():
  B, T, H, KV, Dh = 2, 256, 8, 2, 64
  q, k, v = _inputs(B, T, H, KV, Dh, seed=8, dtype=jnp.bfloat16)
  mask = _lengths_mask((256, 170), T, "right")
  seg = jnp.asarray([[0] * 100 + [1] * 156, [0] * 256])
  kw = dict(scale=Dh ** -0.5, window=96, key_mask=mask, q_segment_ids=seg, kv_segment_ids=seg)
  w = (jax.random.normal(jax.random.key(3), q.shape) * mask[..., None, None]).astype(q.dtype)
  up = lambda x: x.astype(jnp.float32)
  ref_val, ref_grads = _value_and_grads("xla", *map(up, (q, k, v)), up(w), **kw)
  val, grads = _value_and_grads("cudnn", q, k, v, w, **kw)
  np.testing.assert_allclose(up(val), ref_val, rtol=2e-2)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(up(g), r, atol=5e-2, rtol=5e-2)


def test_auto_resolution_and_fallbacks_with_one_logged_line(caplog):
  assert attn.resolve("auto", "tpu") == "splash"
  assert attn.resolve("auto", "gpu") == "cudnn"
  assert attn.resolve("auto", "cpu") == "xla"
  assert attn.resolve("splash", "cpu") == "splash"
  common = dict(seq_len=256, kv_len=256, dtype=jnp.bfloat16, softcap=None, decode=False)
  assert attn.choose("auto", "tpu", **common) == ("splash", None)
  assert attn.choose("auto", "gpu", **common) == ("cudnn", None)
  assert attn.choose("cudnn", "gpu", **{**common, "softcap": 50.0})[0] == "xla"
  assert attn.choose("cudnn", "gpu", **{**common, "dtype": jnp.float32})[0] == "xla"
  assert attn.choose("splash", "tpu", **{**common, "seq_len": 200, "kv_len": 200})[0] == "xla"
  assert attn.choose("splash", "tpu", **{**common, "decode": True})[0] == "xla"
  # Packed shared prompts (part ids) run on splash, as a two-pass cascade.
  assert attn.choose("splash", "tpu", **common, parts=True) == ("splash", None)
  assert attn.choose("auto", "tpu", **common, parts=True) == ("splash", None)
  with pytest.raises(ValueError, match="attention implementation"):
    attn.resolve("flash", "tpu")
  # Explicit splash on a 16-token sequence: xla, one line however often it is traced.
  q, k, v = _inputs(1, 16, 2, 2, 8)
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    for scale in (0.1, 0.2):
      out = jax.jit(lambda q, k, v: attn.attention(q, k, v, scale=scale,
                                                   implementation="splash"))(q, k, v)
  lines = [r for r in caplog.records if "attention=splash" in r.getMessage()]
  assert len(lines) == 1 and "multiple of 128" in lines[0].getMessage()
  np.testing.assert_allclose(out, numpy_attention(q, k, v, scale=0.2), atol=1e-5)


def test_packed_rows_equal_separate_rows_in_the_model():
  cfg = transformer.ModelConfig(attention="xla", sliding_window=5,
                                layer_types=("sliding", "full"))
  model = transformer.init_model(cfg, seed=0)
  a = jax.random.randint(jax.random.key(1), (1, 7), 0, cfg.vocab_size)
  b = jax.random.randint(jax.random.key(2), (1, 9), 0, cfg.vocab_size)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[0] * 7 + [1] * 9])
  pos = jnp.asarray([list(range(7)) + list(range(9))])
  run = jax.jit(lambda t, pos=None, seg=None: model(t, jnp.ones_like(t), positions=pos,
                                                   segment_ids=seg))
  hidden = run(packed, pos, seg)
  np.testing.assert_allclose(hidden[:, :7], run(a), atol=1e-5)
  np.testing.assert_allclose(hidden[:, 7:], run(b), atol=1e-5)


def test_model_with_splash_equals_model_with_xla():
  base = dict(max_seq_len=128, attn_logit_softcap=30.0, sliding_window=48,
              layer_types=("sliding", "full"))
  tokens = jax.random.randint(jax.random.key(3), (2, 128), 0, 32)
  mask = _lengths_mask((128, 101), 128, "right").astype(jnp.int32)
  outs = []
  for impl in ("xla", "splash"):
    model = transformer.init_model(transformer.ModelConfig(attention=impl, **base), seed=0)
    outs.append(jax.jit(lambda t, m, model=model: model(t, m))(tokens, mask))
  keep = np.asarray(mask, bool)[..., None]
  np.testing.assert_allclose(np.where(keep, outs[1], 0), np.where(keep, outs[0], 0), atol=2e-5)
