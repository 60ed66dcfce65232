"""Chunked log-probs equal the naive full-logits computation, values and grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import logprobs
from jaxalign.models.transformer import ModelConfig, init_model

N, T, D, V = 3, 7, 8, 50


def _naive_token_logps(hidden, head_w, targets, cap=None):
  logits = jnp.einsum("ntd,dv->ntv", hidden, head_w)
  if cap is not None:
    logits = cap * jnp.tanh(logits / cap)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _inputs(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k1, (N, T, D))
  head_w = jax.random.normal(k2, (D, V))
  targets = jax.random.randint(k3, (N, T), 0, V)
  return hidden, head_w, targets


@pytest.mark.parametrize("chunk_size,cap", [(16, None), (16, 3.0), (50, None), (64, None)])
def test_token_logps_value_and_grads_match_naive(chunk_size, cap):
  hidden, head_w, targets = _inputs()
  weights = jax.random.normal(jax.random.key(9), (N, T))  # non-uniform cotangent

  def chunked(h, w):
    lp = logprobs.token_logps(h, w, targets, chunk_size=chunk_size, final_logit_softcap=cap)
    return jnp.sum(weights * lp), lp

  def naive(h, w):
    lp = _naive_token_logps(h, w, targets, cap)
    return jnp.sum(weights * lp), lp

  (_, lp_c), grads_c = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head_w)
  (_, lp_n), grads_n = jax.value_and_grad(naive, argnums=(0, 1), has_aux=True)(hidden, head_w)
  assert lp_c.dtype == jnp.float32 and lp_c.shape == (N, T)
  np.testing.assert_allclose(lp_c, lp_n, rtol=1e-5, atol=1e-6)
  for gc, gn in zip(grads_c, grads_n):
    np.testing.assert_allclose(gc, gn, rtol=1e-5, atol=1e-6)


def test_token_logps_jit_and_targets_in_last_overlapping_chunk():
  hidden, head_w, _ = _inputs()
  # V=50, chunk 16: last chunk is columns 34..49, overlapping 32..47's tail.
  targets = jnp.broadcast_to(jnp.array([33, 34, 47, 48, 49, 0, 31]), (N, T))
  got = jax.jit(lambda h, w: logprobs.token_logps(h, w, targets, chunk_size=16))(hidden, head_w)
  np.testing.assert_allclose(got, _naive_token_logps(hidden, head_w, targets), rtol=1e-5)


def test_sequence_logps_masks_prompt_and_padding():
  hidden, head_w, tokens = _inputs()
  loss_mask = jnp.zeros((N, T), bool).at[:, 3:6].set(True)  # prompt 0..2, pad 6
  sums, counts = logprobs.sequence_logps_from_hidden(hidden, head_w, tokens, loss_mask,
                                                     chunk_size=16)
  np.testing.assert_array_equal(counts, [3, 3, 3])
  # Token t is scored by hidden[t-1].
  naive = _naive_token_logps(hidden[:, :-1], head_w, tokens[:, 1:])
  np.testing.assert_allclose(sums, jnp.sum(naive[:, 2:5], axis=1), rtol=1e-5)
  for t in (1, 2, 6):  # prompt and padding targets are ignored
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % V)
    sums2, _ = logprobs.sequence_logps_from_hidden(hidden, head_w, changed, loss_mask,
                                                   chunk_size=16)
    np.testing.assert_array_equal(sums2, sums)
  changed = tokens.at[:, 4].set((tokens[:, 4] + 1) % V)  # a scored token does matter
  sums3, _ = logprobs.sequence_logps_from_hidden(hidden, head_w, changed, loss_mask,
                                                 chunk_size=16)
  assert np.all(np.asarray(sums3) != np.asarray(sums))


def test_sequence_logps_on_transformer_matches_naive():
  config = ModelConfig(vocab_size=40, final_logit_softcap=5.0)
  model = init_model(config, seed=0)
  tokens = jax.random.randint(jax.random.key(1), (4, 9), 0, 40)
  attention_mask = jnp.arange(9)[None] < jnp.array([9, 7, 5, 9])[:, None]
  loss_mask = (jnp.arange(9)[None] >= jnp.array([3, 2, 4, 1])[:, None]) & attention_mask
  sums, counts = logprobs.sequence_logps(model, tokens, attention_mask, loss_mask,
                                         chunk_size=16)
  logp = jax.nn.log_softmax(model.logits(model(tokens, attention_mask)), axis=-1)
  per_token = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  want = jnp.sum(jnp.where(loss_mask[:, 1:], per_token, 0.0), axis=1)
  np.testing.assert_allclose(sums, want, rtol=1e-5)
  np.testing.assert_array_equal(counts, loss_mask[:, 1:].sum(1))


def test_value_and_grad_memory_is_chunked():
  B, T_, D_, V_ = 8, 2048, 64, 128256

  def loss_of_logps(hidden, head_w, targets):
    return jnp.sum(logprobs.token_logps(hidden, head_w, targets))

  args = (jax.ShapeDtypeStruct((B, T_, D_), jnp.float32),
          jax.ShapeDtypeStruct((D_, V_), jnp.float32),
          jax.ShapeDtypeStruct((B, T_), jnp.int32))
  compiled = jax.jit(jax.value_and_grad(loss_of_logps, argnums=(0, 1))).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  full_logits = B * T_ * V_ * 4
  assert temp < 0.25 * full_logits, (temp, full_logits)


def _sharding_constraints(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("sharding_constraint")


def test_batch_axes_pin_the_chunks_under_a_mesh_and_change_no_value():
  """Under a mesh the chunk arrays are constrained to the batch axes; values and grads
  are those of the unconstrained (no mesh) computation."""
  rows, t = 8, 4
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  hidden = jax.random.normal(k1, (rows, t, D))
  head_w = jax.random.normal(k2, (D, V))
  targets = jax.random.randint(k3, (rows, t), 0, V)

  def loss(h, w, axes):
    return jnp.sum(logprobs.token_logps(h, w, targets, chunk_size=16, batch_axes=axes) ** 2)

  grad = jax.value_and_grad(loss, argnums=(0, 1))
  want = jax.jit(grad, static_argnums=2)(hidden, head_w, None)
  # No mesh: batch_axes is ignored (nothing to constrain to).
  assert _sharding_constraints(lambda h, w: grad(h, w, ("data", "fsdp")), hidden, head_w) == 0
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  with jax.set_mesh(mesh):
    h_sharded = jax.device_put(hidden, spec)
    assert _sharding_constraints(lambda h, w: grad(h, w, ("data", "fsdp")), h_sharded,
                                 head_w) > 0
    got = jax.jit(grad, static_argnums=2)(h_sharded, head_w, ("data", "fsdp"))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # One device along the batch axes: no constraint either.
  single = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(single):
    assert _sharding_constraints(lambda h, w: grad(h, w, ("data", "fsdp")), hidden,
                                 head_w) == 0
    with pytest.raises(ValueError, match="not all axes"):
      logprobs.token_logps(hidden, head_w, targets, batch_axes=("batch",))


def _full_logits(hidden, head_w, cap=None):
  logits = jnp.einsum("ntd,dv->ntv", hidden, head_w)
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def _full_logit_stats(hidden, head_w, targets, cap=None):
  """(vocabulary-mean logit, argmax == target, softmax entropy) [N, T] from the full logits."""
  logits = _full_logits(hidden, head_w, cap)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return (logits.mean(-1), (jnp.argmax(logits, -1) == targets).astype(jnp.float32),
          -(jnp.exp(logp) * logp).sum(-1))


# 16 and 64 do not divide V = 50 (an overlapping last chunk; one chunk of 50). Ties
# between chunks: test_top1_is_the_first_of_largest_logits_tied_across_chunks.
@pytest.mark.parametrize("chunk_size,cap", [(16, None), (16, 3.0), (25, None), (25, 3.0),
                                            (64, None)])
def test_token_stats_match_full_logits(chunk_size, cap):
  """token_logps_and_stats's per-token metrics == a direct computation on the
  materialized logits: the vocabulary-mean logit, whether the (first) argmax is the
  target, and the entropy of the softmax; the log-probs are token_logps's."""
  hidden, head_w, targets = _inputs()
  head_w = 3.0 * head_w   # logits of several units: a peaked softmax, saturated caps
  logits = _full_logits(hidden, head_w, cap)
  # Half the positions' targets are the argmax (hits), the rest random (mostly misses).
  targets = jnp.where(jnp.arange(T) % 2 == 0, jnp.argmax(logits, -1), targets)
  want = _full_logit_stats(hidden, head_w, targets, cap)
  logps, stats = jax.jit(lambda h, w: logprobs.token_logps_and_stats(
      h, w, targets, chunk_size=chunk_size, final_logit_softcap=cap))(hidden, head_w)
  np.testing.assert_allclose(stats["logit_mean"], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stats["top1"], want[1])
  np.testing.assert_allclose(stats["entropy"], want[2], rtol=1e-5, atol=2e-5)
  assert 0.5 <= float(want[1].mean()) < 1
  if cap is None:   # peaked and flat softmaxes both (a cap flattens all of them)
    assert float(want[2].min()) < 1.0 < float(want[2].max())
  np.testing.assert_array_equal(logps, logprobs.token_logps(
      hidden, head_w, targets, chunk_size=chunk_size, final_logit_softcap=cap))


def test_top1_is_the_first_of_largest_logits_tied_across_chunks():
  """top1 is "the first argmax is the target" (torch's argmax) when the largest logit is
  tied between columns of different chunks (16 does not divide V = 50: an overlapping
  last chunk). Small-integer inputs make every logit exact in any summation order, and
  the head's columns repeat every 16, so each position's maximum sits in column m < 16
  and again in m + 16 and m + 32: a target m counts, m + 16 does not. No softcap: XLA
  may round tanh of equal inputs differently in different fusions (one ulp), so capped
  logits need not tie exactly; a saturated cap tied only by that rounding."""
  k1, k2 = jax.random.split(jax.random.key(3))
  hidden = jax.random.randint(k1, (N, T, D), -3, 4).astype(jnp.float32)
  head_w = jax.random.randint(k2, (D, 16), -3, 4).astype(jnp.float32)[:, np.arange(V) % 16]
  logits = np.einsum("ntd,dv->ntv", np.asarray(hidden), np.asarray(head_w))
  first = logits.argmax(-1)                 # numpy: the first of the tied maxima
  assert (first < 16).all()
  targets = jnp.asarray(np.where(np.arange(T) % 2 == 0, first, first + 16))
  _, stats = jax.jit(lambda h, w: logprobs.token_logps_and_stats(
      h, w, targets, chunk_size=16))(hidden, head_w)
  np.testing.assert_array_equal(stats["top1"], np.broadcast_to(np.arange(T) % 2 == 0, (N, T)))


@pytest.mark.parametrize("chunk_size,cap", [(16, None), (16, 3.0)])
def test_token_stats_leave_logps_and_grads_bit_identical(chunk_size, cap):
  """Asking for the metrics changes no bit of the log-probs or their gradient (jitted,
  as the step runs them), and no gradient flows through the metrics."""
  hidden, head_w, targets = _inputs()
  weights = jax.random.normal(jax.random.key(9), (N, T))

  def plain(h, w):
    lp = logprobs.token_logps(h, w, targets, chunk_size=chunk_size, final_logit_softcap=cap)
    return jnp.sum(weights * lp), lp

  def with_stats(h, w):
    lp, stats = logprobs.token_logps_and_stats(h, w, targets, chunk_size=chunk_size,
                                               final_logit_softcap=cap)
    return jnp.sum(weights * lp), (lp, stats)

  a = jax.jit(jax.value_and_grad(plain, argnums=(0, 1), has_aux=True))(hidden, head_w)
  (value, (lp, stats)), grads = jax.jit(
      jax.value_and_grad(with_stats, argnums=(0, 1), has_aux=True))(hidden, head_w)
  np.testing.assert_array_equal(value, a[0][0])
  np.testing.assert_array_equal(lp, a[0][1])
  for x, y in zip(a[1], grads):
    np.testing.assert_array_equal(y, x)
  metric_grads = jax.grad(lambda h: sum(
      v.sum() for v in logprobs.token_logps_and_stats(h, head_w, targets,
                                                      chunk_size=chunk_size)[1].values()))(hidden)
  assert not np.any(metric_grads)
