"""The jitted train step: traced once, donated state, shardings as the rules say."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import config as config_lib
from jaxalign import losses, sharding
from jaxalign.train import optim, step as step_lib
from jaxalign.train import build as build_lib
from tests.train.helpers import random_batch, tiny_config


def _setup(shape=(2, 2, 2), devices=None):
  cfg = tiny_config(**{"mesh.shape": shape})
  mesh = sharding.make_mesh(cfg.mesh.shape, devices)
  rules = tuple(tuple(r) for r in cfg.sharding_rules)
  tx, sched = optim.make_optimizer(lr=1e-3, warmup_steps=1, total_steps=10)
  graphdef, abstract, shardings, init_fn = build_lib.build_model_and_state(
      config_lib.model_config(cfg), tx, mesh, rules, seed=0, keep_reference=True)
  with jax.set_mesh(mesh):
    state = jax.jit(init_fn, out_shardings=shardings)()
  return cfg, mesh, rules, tx, sched, graphdef, abstract, shardings, state


_batch = random_batch


def test_step_compiles_once_and_params_follow_the_rules():
  cfg, mesh, rules, tx, sched, graphdef, abstract, shardings, state = _setup()
  traces = []
  spec = losses.get("dpo")

  def counting_loss(inputs, loss_state):
    traces.append(1)  # runs at trace time only
    return spec.call(spec.fn, inputs, loss_state, beta=0.1)

  step_fn = step_lib.jit_train_step(
      graphdef=graphdef, tx=tx, schedule=sched, loss_call=counting_loss, chunk_size=16,
      accum_steps=1, skip_nonfinite=False, state_shardings=shardings,
      batch_sharding=sharding.batch_sharding(mesh, rules), replicated=sharding.replicated(mesh))
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    for _ in range(3):
      batch = sharding.host_to_global(_batch(rng), sharding.batch_sharding(mesh, rules))
      state, metrics = step_fn(state, batch)
  assert len(traces) == 1
  assert int(state.step) == 3
  # The embedding is ("vocab", "embed") -> ("tensor", "fsdp"); Adam moments follow.
  embed = state.params["embed"]["embedding"][...]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert np.isfinite(float(metrics["loss"]))


def test_chosen_and_rejected_share_one_forward():
  cfg, mesh, rules, tx, sched, graphdef, abstract, shardings, state = _setup((1, 8, 1))
  batch = _batch(np.random.default_rng(1))
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(functools.partial(step_lib.batch_logps, graphdef, chunk_size=16))(
        state.params, state.frozen, batch)
  # One embedding gather over all B*S = 16 rows, not two over 8.
  gathers = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "gather"]
  assert gathers and gathers[0].outvars[0].aval.shape[:2] == (16, 12)


def test_accumulated_step_equals_full_batch_step():
  cfg, mesh, rules, tx, sched, graphdef, abstract, shardings, state = _setup((1, 4, 2))
  call = step_lib.make_loss_call(losses.get("dpo"), {"beta": 0.1})
  outs = []
  for accum in (1, 2):
    fn = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                   schedule=sched, loss_call=call, chunk_size=16,
                                   accum_steps=accum))
    with jax.set_mesh(mesh):
      new_state, metrics = fn(jax.tree.map(jnp.copy, state), _batch(np.random.default_rng(2)))
    outs.append((jax.device_get(new_state.params), jax.device_get(metrics)))
  (p1, m1), (p2, m2) = outs
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_the_same_steps_on_one_device_and_on_8_device_meshes():
  """Mesh invariance at step level: 3 steps on 1 device and on three 8-device meshes
  give the same losses, metrics and parameters."""
  call = step_lib.make_loss_call(losses.get("dpo"), {"beta": 0.1})
  runs = {}
  for shape in [(1, 1, 1), (8, 1, 1), (1, 4, 2), (2, 2, 2)]:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else None
    cfg, mesh, rules, tx, sched, graphdef, abstract, shardings, state = _setup(shape, devices)
    step_fn = step_lib.jit_train_step(
        graphdef=graphdef, tx=tx, schedule=sched, loss_call=call, chunk_size=16,
        accum_steps=1, skip_nonfinite=False, state_shardings=shardings,
        batch_sharding=sharding.batch_sharding(mesh, rules),
        replicated=sharding.replicated(mesh))
    rng, metrics = np.random.default_rng(3), []
    with jax.set_mesh(mesh):
      for _ in range(3):
        batch = sharding.host_to_global(_batch(rng), sharding.batch_sharding(mesh, rules))
        state, m = step_fn(state, batch)
        metrics.append(jax.device_get(m))
    runs[shape] = (metrics, jax.device_get(state.params))
  ref_metrics, ref_params = runs.pop((1, 1, 1))
  for shape, (metrics, params) in runs.items():
    for a, b in zip(ref_metrics, metrics):
      for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6,
                                   err_msg=f"mesh {shape}: {key}")
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"mesh {shape}")
