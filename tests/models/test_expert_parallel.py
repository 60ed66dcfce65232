"""Expert parallelism: the experts split over "data" give what one device gives.

The reference is the unsharded path: moe.routed_mlp with no mesh, and the
train step of the same tiny MoE recipe on one device.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign import sharding
from jaxalign.models import expert_parallel, moe
from tests.train.helpers import built_state, random_batch, tiny_config


def _routed_inputs(n=32, d=16, e=8, f=12, k=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (n, d))
  gate, up = (jax.random.normal(kk, (e, d, f)) / 4 for kk in keys[1:3])
  down = jax.random.normal(keys[3], (e, f, d)) / 4
  weights, experts = moe.route(jax.random.normal(keys[4], (n, e)), k, True)
  return x, gate, up, down, weights, experts


def _loss(x, gate, up, down, weights, fn):
  y = fn(x, gate, up, down, weights)
  return jnp.sum(y * jnp.cos(y)), y


def _on_mesh(shape, capacity_factor, x, gate, up, down, weights, experts,
             implementation="ragged_dot"):
  """(output, grads of x, gate, up, down, weights) of the expert-parallel MLP on `shape`."""
  mesh = sharding.make_mesh(shape)
  rules = dict(sharding.DEFAULT_RULES)
  put = lambda a, *names: jax.device_put(a, NamedSharding(mesh, P(*(rules.get(n) for n in names))))
  fn = lambda x, g, u, d, w: expert_parallel.routed_mlp(
      x, g, u, d, w, put(experts, "batch", None), jax.nn.silu,
      capacity_factor=capacity_factor, implementation=implementation)
  with jax.set_mesh(mesh):
    args = (put(x, "batch", "norm"), put(gate, "expert", "embed", "mlp"),
            put(up, "expert", "embed", "mlp"), put(down, "expert", "mlp", "embed"),
            put(weights, "batch", None))
    (_, out), grads = jax.jit(jax.value_and_grad(
        lambda *a: _loss(*a, fn), argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)
  return out, grads


def _reference(x, gate, up, down, weights, experts):
  fn = lambda *a: moe.routed_mlp(*a, experts, jax.nn.silu)
  (_, ref), grads = jax.value_and_grad(lambda *a: _loss(*a, fn), argnums=(0, 1, 2, 3, 4),
                                       has_aux=True)(x, gate, up, down, weights)
  return ref, grads


# (2, 2, 2), with F over "tensor" too, is the train-step test below. Capacity factor
# 1 on (8, 1, 1): a buffer of n k = 8 rows per device, which some devices' experts
# overflow (the exact branch) and others fit (the bounded one); 0: the exact buffer alone.
# d = 128: rows of whole 128-lane tiles, which moe.take_rows gathers three-dimensionally.
@pytest.mark.parametrize("shape,capacity_factor,d", [((8, 1, 1), 1.0, 16), ((8, 1, 1), 0.0, 16),
                                                     ((1, 8, 1), 1.25, 16), ((8, 1, 1), 1.0, 128)])
def test_routed_mlp_on_a_mesh_equals_one_device(shape, capacity_factor, d):
  inputs = _routed_inputs(d=d)
  with jax.default_matmul_precision("highest"):
    ref, ref_grads = _reference(*inputs)
    out, grads = _on_mesh(shape, capacity_factor, *inputs)
  # At d = 128 the values reach ~1e3: float32 rounding of sums in another order,
  # relative to each array's largest entry.
  tol = lambda r: 1e-6 if d == 16 else 2e-5 * float(np.abs(r).max())
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=tol(ref))
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=tol(r))


def test_megablox_rows_past_the_groups_reach_nothing():
  """The megablox kernel (Pallas interpret mode: rows it does not write are NaN) on
  (8, 1, 1) with the bounded buffer, whose rows past a device's groups the kernel
  leaves unwritten (zero_tail=False): no NaN reaches the output or any gradient,
  which equal one device's ragged_dot path."""
  inputs = _routed_inputs(n=16, d=128, f=128)
  with jax.default_matmul_precision("highest"):
    ref, ref_grads = _reference(*inputs)
    out, grads = _on_mesh((8, 1, 1), 1.0, *inputs, implementation="megablox")
  tol = lambda r: 2e-5 * float(np.abs(r).max())
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=tol(ref))
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=tol(r))


def test_bounded_buffer_overflows_on_some_devices_and_the_exact_branch_keeps_it_dropless():
  """On (8, 1, 1) with capacity factor 1, a device holds one of the 8 experts and a
  buffer of 8 rows; this routing sends more than 8 assignments to some expert (so the
  bounded buffer alone, `within_capacity`, loses them) and fewer to others, and the
  step still equals one device's (the test above)."""
  inputs = _routed_inputs()
  counts = np.bincount(np.asarray(inputs[-1]).reshape(-1), minlength=8)
  assert counts.max() > 8 and counts.min() <= 8          # both branches taken
  ref, _ = _reference(*inputs)
  with expert_parallel.within_capacity():
    dropped, _ = _on_mesh((8, 1, 1), 1.0, *inputs)
  assert not np.allclose(dropped, ref, rtol=1e-3, atol=1e-3)


def _float_rows(jaxpr, inside: bool = False) -> list[int]:
  """Leading sizes of every float array of rank >= 2 made inside a shard_map (one
  device's arrays) in the jaxpr and its sub-jaxprs."""
  rows = []
  for eqn in jaxpr.eqns:
    for v in eqn.outvars if inside else ():
      aval = v.aval
      if getattr(aval, "ndim", 0) >= 2 and jnp.issubdtype(aval.dtype, jnp.floating):
        rows.append(aval.shape[0])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)            # a ClosedJaxpr's jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):  # a call, a cond's branches, a scan body
          rows += _float_rows(sub, inside or eqn.primitive.name == "shard_map")
  return rows


def test_bounded_dispatch_buffer_is_the_local_rows_only():
  """The step's dispatch, as a step within capacity runs it (the branch
  `within_capacity` traces alone), makes no float array larger than the gathered
  tokens (S n = 32 rows) or the bounded buffer (capacity 1.25 x n k = 10 -> 16 rows);
  the exact buffer has S n k = 64. The traced step holds both, under a cond."""
  inputs = _routed_inputs()
  experts = inputs[-1]

  def grad():   # a fresh function per trace: jax caches a function's trace
    fn = lambda x, g, u, d, w: expert_parallel.routed_mlp(x, g, u, d, w, experts, jax.nn.silu,
                                                          capacity_factor=1.25)
    return jax.grad(lambda *a: _loss(*a, fn)[0], argnums=(0, 1, 2, 3, 4))

  assert expert_parallel.dispatch_rows(shards=8, tokens=4, k=2, capacity_factor=1.25) == (64, 16)
  with jax.set_mesh(sharding.make_mesh((8, 1, 1))):
    with expert_parallel.within_capacity():
      bounded = _float_rows(jax.make_jaxpr(grad())(*inputs[:5]).jaxpr)
    both = _float_rows(jax.make_jaxpr(grad())(*inputs[:5]).jaxpr)
  assert 16 in bounded and max(bounded) == 32
  assert 64 in both and 16 in both


def test_layout_splits_experts_over_data_and_gathers_tokens_there():
  mesh = sharding.make_mesh((2, 2, 2))
  assert expert_parallel.layout(mesh, tokens=32, experts=8, hidden=12) == {
      "tokens": ("data", "fsdp"), "experts": "data", "hidden": "tensor", "gather": True}
  # Experts that do not divide the data axis stay whole: FSDP over fsdp only.
  assert expert_parallel.layout(mesh, tokens=32, experts=3, hidden=12)["experts"] is None


def test_moe_train_step_expert_sharded_on_8_devices_equals_one_device():
  """The default capacity factor (1.25 < S = 2: the bounded buffer and its exact
  fallback, under remat as the recipes run) on (2, 2, 2)."""
  runs = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else None
    cfg = tiny_config(**{"mesh.shape": shape, "reference.mode": "frozen",
                         "optim.warmup_steps": 1, "total_steps": 10,
                         "logprob_chunk_size": 16, "model.overrides.n_experts": 8,
                         "model.overrides.experts_per_token": 2,
                         "model.overrides.moe_d_ff": 16,
                         "model.overrides.router_aux_loss_coef": 0.01,
                         "model.overrides.remat": "full"})
    built, state = built_state(cfg, devices)
    if shape == (2, 2, 2):   # experts over data, their embed over fsdp, F over tensor
      gate = state.params["layers"][0]["mlp"]["gate"][...]
      assert tuple(gate.sharding.spec)[-3:] == ("data", "fsdp", "tensor")
    with jax.set_mesh(built.mesh):
      batch = sharding.host_to_global(random_batch(np.random.default_rng(5)),
                                      built.batch_sharding)
      state, metrics = built.step_fn(state, batch)
    runs[shape] = (jax.device_get(metrics), jax.device_get(state.params))
  ref_metrics, ref_params = runs.pop((1, 1, 1))
  for shape, (metrics, params) in runs.items():
    for key in ("loss", "grad_norm", "rewards/margins"):
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"mesh {shape}: {key}")
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"mesh {shape}")


def test_combine_sums_rows_onto_tokens_with_its_gradient():
  """expert_parallel._combine (its own VJP) against the plain scatter-add's autodiff:
  values and the rows' gradient, float32, rows not marked valid (NaN here, as the
  kernel's unwritten rows may be) left out; in bf16 it sums in bf16 (as transformers'
  index_add_) and stays within bf16 rounding of the float32 sum."""
  keys = jax.random.split(jax.random.key(3), 3)
  r, m, d = 24, 10, 128
  ys = jax.random.normal(keys[0], (r, d))
  token = jax.random.randint(keys[1], (r,), 0, m)
  cot = jax.random.normal(keys[2], (m, d))
  valid = jnp.arange(r) < 20                  # the last 4 rows: NaN, and dropped
  ys_tail = ys.at[20:].set(jnp.nan)
  out, pull = jax.vjp(lambda ys: expert_parallel._combine(ys, token, valid, m), ys_tail)
  ref, ref_pull = jax.vjp(lambda ys: jnp.zeros((m, d)).at[token[:20]].add(ys[:20]), ys)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(pull(cot)[0][:20], ref_pull(cot)[0][:20])
  half = expert_parallel._combine(ys.astype(jnp.bfloat16), token, jnp.ones(r, bool), m)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32),
                             jnp.zeros((m, d)).at[token].add(ys), rtol=3e-2, atol=3e-2)
