"""Mixture of experts: routing rules, the routed MLP against a per-token loop, router
losses against a transcription of transformers' formula, the MoE model's layouts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import moe
from jaxalign.models.transformer import (FieldError, ModelConfig, MoeMLP, Transformer,
                                         convert_layout, init_model, stack_layers)

E, K, D, F = 4, 2, 32, 16
TINY = ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, d_ff=48, n_experts=E, experts_per_token=K, moe_d_ff=F)


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _numpy_route(logits, k, norm_topk):
  """Qwen3-MoE's router: softmax, the k largest, renormalized when norm_topk."""
  probs = _softmax(logits.astype(np.float64))
  experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  weights = np.take_along_axis(probs, experts, axis=-1)
  if norm_topk:
    weights = weights / weights.sum(axis=-1, keepdims=True)
  return weights, experts


def _numpy_mixtral_route(logits, k):
  """Mixtral's rule as its paper writes it: softmax over the top-k logits."""
  experts = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  return _softmax(np.take_along_axis(logits.astype(np.float64), experts, axis=-1)), experts


@pytest.mark.parametrize("d", [256, 48])
def test_take_rows_is_indexing_with_its_gradient(d):
  """moe.take_rows (a tile-shaped gather when d is a multiple of 128, plain indexing
  otherwise) equals x[index], and its gradient the autodiff of x[index] (a scatter-add:
  repeated rows sum)."""
  x = jax.random.normal(jax.random.key(0), (12, d))
  index = jnp.asarray([3, 0, 3, 11, 5, 3, 7, 0], jnp.int32)
  cot = jax.random.normal(jax.random.key(1), (8, d))
  out, pull = jax.vjp(lambda x: moe.take_rows(x, index), x)
  ref, ref_pull = jax.vjp(lambda x: x[index], x)
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_allclose(pull(cot)[0], ref_pull(cot)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.tpu
def test_take_rows_gathers_whole_tiles_on_a_tpu_chip():
  """Compiled for one v5p chip: XLA counts the gather of bf16 rows of 2048 as [.., 16,
  128] tiles, with the relayout back to [R, 2048], at about half the bytes of the
  plain row gather, which reads every (16, 128) tile a row touches (1.61 GB against
  3.02 GB with libtpu 0.0.42)."""
  from jaxalign import plan as plan_lib
  dev = plan_lib.tpu_devices("v5p:2x2x1")[0]
  sh = jax.sharding.SingleDeviceSharding(dev)
  args = (jax.ShapeDtypeStruct((32768, 2048), jnp.bfloat16, sharding=sh),
          jax.ShapeDtypeStruct((81920,), jnp.int32, sharding=sh))
  cost = lambda f: plan_lib._cost(jax.jit(f).lower(*args).compile())["bytes accessed"]
  rows = 81920 * 2048 * 2
  plain, tiled = cost(lambda x, i: x[i]), cost(moe.take_rows)
  assert plain > 8 * rows            # a (16, 128) tile read per 1/16 of it used
  assert tiled < 0.6 * plain


@pytest.mark.parametrize("norm_topk", [True, False])
def test_route_matches_numpy(norm_topk):
  logits = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
  weights, experts = moe.route(jnp.asarray(logits), 3, norm_topk)
  want_w, want_e = _numpy_route(logits, 3, norm_topk)
  np.testing.assert_array_equal(np.asarray(experts), want_e)
  np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-6, atol=1e-7)
  if norm_topk:   # Mixtral's softmax over the top-k logits is the same function
    mix_w, mix_e = _numpy_mixtral_route(logits, 3)
    np.testing.assert_array_equal(np.asarray(experts), mix_e)
    np.testing.assert_allclose(np.asarray(weights), mix_w, rtol=1e-6, atol=1e-7)


def test_sort_by_expert_groups_and_inverts():
  experts = jnp.asarray(np.random.default_rng(1).integers(0, E, size=(9, K)), jnp.int32)
  order, inverse, sizes = moe.sort_by_expert(experts, E)
  flat = np.asarray(experts).reshape(-1)
  np.testing.assert_array_equal(np.asarray(sizes), np.bincount(flat, minlength=E))
  assert (np.diff(flat[np.asarray(order)]) >= 0).all()        # sorted by expert
  np.testing.assert_array_equal(np.asarray(order)[np.asarray(inverse)], np.arange(flat.size))


def _dense_loop(x, gate, up, down, weights, experts):
  """The routed MLP written token by token: sum_j w_j * down_e(silu(x gate_e) * (x up_e))."""
  rows = []
  for n in range(x.shape[0]):
    y = jnp.zeros((x.shape[1],), x.dtype)
    for j in range(experts.shape[1]):
      e = int(experts[n, j])
      h = jax.nn.silu(x[n] @ gate[e]) * (x[n] @ up[e])
      y = y + weights[n, j] * (h @ down[e])
    rows.append(y)
  return jnp.stack(rows)


def test_routed_mlp_equals_per_token_loop_values_and_grads():
  rng = np.random.default_rng(2)
  n = 8
  x = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
  gate, up = (jnp.asarray(rng.normal(size=(E, D, F)) * 0.2, jnp.float32) for _ in range(2))
  down = jnp.asarray(rng.normal(size=(E, F, D)) * 0.2, jnp.float32)
  logits = jnp.asarray(rng.normal(size=(n, E)), jnp.float32)
  weights, experts = moe.route(logits, K, True)
  experts_np = np.asarray(experts)
  assert len(set(experts_np.reshape(-1))) == E   # every expert gets tokens

  def routed(x, gate, up, down, weights):
    return moe.routed_mlp(x, gate, up, down, weights, experts, jax.nn.silu)

  def looped(x, gate, up, down, weights):
    return _dense_loop(x, gate, up, down, weights, experts_np)

  args = (x, gate, up, down, weights)
  cot = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
  # Values and the gradient of <cotangent, output> w.r.t. every input, each jitted once.
  both = lambda f: jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b) * cot),
                                                       argnums=range(5))(*a)))
  got, want = both(routed)(*args), both(looped)(*args)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _hf_load_balancing_loss(gate_logits, num_experts, top_k, attention_mask):
  """transformers' load_balancing_loss_func (Qwen3-MoE / Mixtral, 5.x), in NumPy: per
  layer, top-k assignment counts and probability sums over the attention mask, pooled
  over the layers, then E * sum(tokens_per_expert * router_prob_per_expert)."""
  tokens_per_expert_sum = np.zeros(num_experts)
  router_prob_sum = np.zeros(num_experts)
  total_rows = 0.0
  flat_mask = attention_mask.reshape(-1).astype(np.float64)
  for layer_gate in gate_logits:
    routing_weights = _softmax(layer_gate.astype(np.float64))
    selected = np.argsort(-routing_weights, axis=-1, kind="stable")[:, :top_k]
    np.add.at(tokens_per_expert_sum, selected.reshape(-1), np.repeat(flat_mask, top_k))
    router_prob_sum += (routing_weights * flat_mask[:, None]).sum(axis=0)
    total_rows += flat_mask.sum()
  return num_experts * np.sum((tokens_per_expert_sum / total_rows)
                              * (router_prob_sum / total_rows))


def _numpy_z_loss(gate_logits, attention_mask):
  """ST-MoE's router z-loss: mean over real tokens and layers of logsumexp(logits)^2."""
  m = attention_mask.reshape(-1).astype(np.float64)
  total, count = 0.0, 0.0
  for z in gate_logits:
    z = z.astype(np.float64)
    lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    total += (m * lse ** 2).sum()
    count += m.sum()
  return total / count


def test_router_losses_match_transformers_formula():
  rng = np.random.default_rng(3)
  layers, b, t = 3, 2, 7
  mask = np.ones((b, t), np.int32)
  mask[0, 5:] = 0
  mask[1, :2] = 0   # left padding too
  gate_logits = [rng.normal(size=(b * t, E)).astype(np.float32) * 2 for _ in range(layers)]
  stats = {}
  for z in gate_logits:
    _, experts = moe.route(jnp.asarray(z), K, True)
    stats = moe.add_stats(stats, moe.router_stats(jnp.asarray(z), experts,
                                                  jnp.asarray(mask.reshape(-1))))
  aux, zloss = moe.router_losses(stats)
  np.testing.assert_allclose(float(aux), _hf_load_balancing_loss(gate_logits, E, K, mask),
                             rtol=1e-6)
  np.testing.assert_allclose(float(zloss), _numpy_z_loss(gate_logits, mask), rtol=1e-6)
  # Padding rows change nothing: the same losses from the real rows alone.
  real = mask.reshape(-1).astype(bool)
  stats_real = moe.add_stats(*[moe.router_stats(jnp.asarray(z[real]),
                                                moe.route(jnp.asarray(z[real]), K, True)[1])
                               for z in gate_logits])
  np.testing.assert_allclose(np.asarray(moe.router_losses(stats_real)),
                             np.asarray((aux, zloss)), rtol=1e-6)


def _abstract(config):
  """The model's parameters as shapes with their logical names (nothing allocated)."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def test_moe_mlp_params_and_logical_axes():
  model = _abstract(dataclasses.replace(TINY, scan_layers=False))
  mlp = model.layers[0].mlp
  assert isinstance(mlp, MoeMLP)
  assert mlp.router.shape == (D, E) and mlp.router.out_sharding == ("embed", None)
  assert mlp.gate.shape == mlp.up.shape == (E, D, F)
  assert mlp.gate.out_sharding == mlp.up.out_sharding == ("expert", "embed", "mlp")
  assert mlp.down.shape == (E, F, D) and mlp.down.out_sharding == ("expert", "mlp", "embed")
  scanned = _abstract(TINY).layers[0].mlp
  assert scanned.gate.shape == (2, E, D, F)
  assert scanned.gate.out_sharding == ("layers", "expert", "embed", "mlp")
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert TINY.num_params() == n
  per_expert = 3 * D * F
  assert TINY.num_active_params() == n - TINY.n_layers * (E - K) * per_expert
  dense = dataclasses.replace(TINY, n_experts=0)
  assert dense.num_active_params() == dense.num_params()


@pytest.mark.parametrize("field,value", [
    ("experts_per_token", 0), ("experts_per_token", E + 1), ("n_experts", -1),
    ("moe_d_ff", 0), ("router_aux_loss_coef", -0.1), ("router_z_loss_coef", float("nan")),
    ("router_aux_loss_coef", float("inf")), ("moe_capacity_factor", -1.0),
    ("moe_capacity_factor", float("nan")), ("moe_capacity_factor", True)])
def test_bad_moe_fields_name_the_field(field, value):
  with pytest.raises(FieldError) as e:
    dataclasses.replace(TINY, **{field: value})
  assert e.value.field == field


def _batch(seed=0, b=3, t=10):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, TINY.vocab_size, size=(b, t)), jnp.int32)
  mask = jnp.asarray(np.arange(t)[None] < np.array([t, 7, 4])[:, None], jnp.int32)
  return tokens, mask


def _value_stats_grads(model, tokens, mask):
  """(loss, router stats, grads) of sum(hidden^2) + aux + z, so the gradient runs
  through the experts and the router losses alike."""
  graphdef, state = nnx.split(model)

  def loss(state):
    stats = {}
    hidden = nnx.merge(graphdef, state)(tokens, mask, router_stats=stats)
    aux, z = moe.router_losses(stats)
    return jnp.sum(jnp.where(mask[..., None] > 0, hidden, 0.0) ** 2) * 1e-3 + aux + z, stats

  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return value, stats, grads


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_scanned_moe_equals_unrolled_with_router_stats_grads_and_remat():
  """The scanned layout under remat "dots" (which saves the grouped matmuls by name)
  == the same weights unrolled under "minimal" (router logits and projections by
  name): value, router statistics (real tokens of every layer) and gradients."""
  tokens, mask = _batch()
  scanned = init_model(dataclasses.replace(TINY, remat="dots"), 0)
  unrolled = convert_layout(scanned, scan_layers=False)
  # The remat policy is read from the config at trace time (one init: it is the slow part).
  unrolled.config = dataclasses.replace(unrolled.config, remat="minimal")
  v1, s1, g1 = _value_stats_grads(scanned, tokens, mask)
  v2, s2, g2 = _value_stats_grads(unrolled, tokens, mask)
  assert float(s1["tokens"]) == TINY.n_layers * int(mask.sum())   # real tokens, each layer
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  _assert_close(s1, s2)
  g2 = nnx.to_pure_dict(g2)
  _assert_close(nnx.to_pure_dict(g1), stack_layers(TINY, g2))
  assert np.abs(np.asarray(g2["layers"][1]["mlp"]["router"])).max() > 0
