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


# (2, 2, 2), with F over "tensor" too, is the train-step test below.
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1)])
def test_routed_mlp_on_a_mesh_equals_one_device(shape):
  x, gate, up, down, weights, experts = _routed_inputs()

  def loss(x, gate, up, down, fn):
    y = fn(x, gate, up, down, weights, experts, jax.nn.silu)
    return jnp.sum(y * jnp.cos(y)), y

  with jax.default_matmul_precision("highest"):
    (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        x, gate, up, down, moe.routed_mlp)
    mesh = sharding.make_mesh(shape)
    rules = dict(sharding.DEFAULT_RULES)
    put = lambda a, *names: jax.device_put(a, NamedSharding(mesh, P(*(rules[n] for n in names))))
    with jax.set_mesh(mesh):
      args = (put(x, "batch", "norm"), put(gate, "expert", "embed", "mlp"),
              put(up, "expert", "embed", "mlp"), put(down, "expert", "mlp", "embed"))
      (_, out), grads = jax.jit(jax.value_and_grad(
          lambda *a: loss(*a, expert_parallel.routed_mlp), argnums=(0, 1, 2, 3),
          has_aux=True))(*args)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_layout_splits_experts_over_data_and_gathers_tokens_there():
  mesh = sharding.make_mesh((2, 2, 2))
  assert expert_parallel.layout(mesh, tokens=32, experts=8, hidden=12) == {
      "tokens": ("data", "fsdp"), "experts": "data", "hidden": "tensor", "gather": True}
  # Experts that do not divide the data axis stay whole: FSDP over fsdp only.
  assert expert_parallel.layout(mesh, tokens=32, experts=3, hidden=12)["experts"] is None


def test_moe_train_step_expert_sharded_on_8_devices_equals_one_device():
  runs = {}
  for shape in [(1, 1, 1), (2, 2, 2)]:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else None
    cfg = tiny_config(**{"mesh.shape": shape, "reference.mode": "frozen",
                         "optim.warmup_steps": 1, "total_steps": 10,
                         "logprob_chunk_size": 16, "model.overrides.n_experts": 8,
                         "model.overrides.experts_per_token": 2,
                         "model.overrides.moe_d_ff": 16,
                         "model.overrides.router_aux_loss_coef": 0.01})
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
