"""The jitted train step: traced once, donated state, shardings as the rules say."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import sharding
from jaxalign.train import step as step_lib
from tests.train.helpers import built_state, random_batch, tiny_config


def _setup(shape=(2, 2, 2), devices=None, **overrides):
  """(Built, step-0 state) of the tiny DPO recipe with a frozen reference on `shape`."""
  cfg = tiny_config(**{"mesh.shape": shape, "reference.mode": "frozen",
                       "optim.warmup_steps": 1, "total_steps": 10, "logprob_chunk_size": 16,
                       **overrides})
  return built_state(cfg, devices)


_batch = random_batch


def test_step_compiles_once_and_params_follow_the_rules(monkeypatch):
  traces = []
  original = step_lib.train_step

  def counting_step(state, batch, **kwargs):
    traces.append(1)  # runs at trace time only
    return original(state, batch, **kwargs)

  # jit_train_step binds `train_step` when the builder calls it.
  monkeypatch.setattr(step_lib, "train_step", counting_step)
  built, state = _setup()
  rng = np.random.default_rng(0)
  with jax.set_mesh(built.mesh):
    for _ in range(3):
      batch = sharding.host_to_global(_batch(rng), built.batch_sharding)
      state, metrics = built.step_fn(state, batch)
  assert len(traces) == 1
  assert int(state.step) == 3
  # The embedding is ("vocab", "embed") -> ("tensor", "fsdp"); Adam moments follow.
  embed = state.params["embed"]["embedding"][...]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert np.isfinite(float(metrics["loss"]))


def test_chosen_and_rejected_share_one_forward():
  built, state = _setup((1, 8, 1))
  batch = _batch(np.random.default_rng(1))
  with jax.set_mesh(built.mesh):
    jaxpr = jax.make_jaxpr(functools.partial(step_lib.batch_logps, built.graphdef,
                                             chunk_size=16))(
        state.params, state.frozen, batch)
  # One embedding gather over all B*S = 16 rows, not two over 8.
  gathers = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "gather"]
  assert gathers and gathers[0].outvars[0].aval.shape[:2] == (16, 12)


def test_accumulated_step_equals_full_batch_step():
  outs = []
  for accum in (1, 2):
    built, state = _setup((1, 4, 2), **{"optim.grad_accum_steps": accum})
    with jax.set_mesh(built.mesh):
      batch = sharding.host_to_global(_batch(np.random.default_rng(2)), built.batch_sharding)
      new_state, metrics = built.step_fn(jax.tree.map(jnp.copy, state), batch)
    outs.append((jax.device_get(new_state.params), jax.device_get(metrics)))
  (p1, m1), (p2, m2) = outs
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_the_same_steps_on_one_device_and_on_8_device_meshes():
  """Mesh invariance at step level: 3 steps on 1 device and on three 8-device meshes
  give the same losses, metrics and parameters."""
  runs = {}
  for shape in [(1, 1, 1), (8, 1, 1), (1, 4, 2), (2, 2, 2)]:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else None
    built, state = _setup(shape, devices)
    rng, metrics = np.random.default_rng(3), []
    with jax.set_mesh(built.mesh):
      for _ in range(3):
        batch = sharding.host_to_global(_batch(rng), built.batch_sharding)
        state, m = built.step_fn(state, batch)
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
