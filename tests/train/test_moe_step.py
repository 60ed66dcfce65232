"""A mixture-of-experts policy in the train step: the router losses added with their
coefficients and logged, padded == packed (routing is per token), an in-process
resume that is bit-identical, LoRA on the attention of an MoE model."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxalign import config as config_lib
from jaxalign import losses, sharding
from jaxalign.train import rundir, step as step_lib
from jaxalign.data import packing
from tests.data.test_packing import T, _pack, _shared_prompt_batch, _wild_batch
from tests.train.helpers import (built_state, random_batch, read_metrics, tiny_config,
                                 train_loop)

AUX, Z = 0.05, 0.01
MOE = dict(n_experts=4, experts_per_token=2, moe_d_ff=16, router_aux_loss_coef=AUX,
           router_z_loss_coef=Z)


def moe_config(**overrides) -> ml_collections.ConfigDict:
  """tests.train.helpers.tiny_config with a 4-expert, top-2 MoE MLP."""
  c = tiny_config(**overrides)
  for key, value in MOE.items():
    c.model.overrides[key] = value
  return c


@functools.lru_cache(maxsize=None)
def _setup():
  """(mesh, rules, graphdef, step-0 state) of the MoE recipe on 1 device, its frozen
  reference equal to the policy (so step 1's DPO loss is exactly log 2)."""
  built, state = built_state(moe_config(**{
      "mesh.shape": (1, 1, 1), "reference.mode": "frozen", "optim.warmup_steps": 1,
      "total_steps": 10, "logprob_chunk_size": 16}), jax.devices()[:1])
  return built.mesh, built.run_spec.rules, built.graphdef, state


@functools.lru_cache(maxsize=None)
def _step(layout: str, source: str = "wild"):
  """(old params, new params, metrics) of one jitted DPO step with SGD(1): 16 pairs of
  2..12 tokens (source "wild"; "shared": one prompt per pair), padded, packed in 8
  groups, or "shared" (each prompt once in a KV cache)."""
  mesh, rules, graphdef, state = _setup()
  rng = np.random.default_rng(5)
  padded = _wild_batch(rng, 16, 2) if source == "wild" else _shared_prompt_batch(rng, 16, 2)
  host = {"padded": lambda: padded, "packed": lambda: _pack(padded, 8),
          "shared": lambda: packing.make_sharer(prompt_length=8, max_length=T)(padded)
          }[layout]()
  tx = optax.sgd(1.0)
  state = state.replace(opt_state=tx.init(state.params))
  fn = step_lib.jit_train_step(
      graphdef=graphdef, tx=tx, schedule=optax.constant_schedule(1.0),
      loss_call=step_lib.make_loss_call(losses.get("dpo"), {"beta": 0.1}),
      chunk_size=16, accum_steps=1, skip_nonfinite=False,
      state_shardings=jax.tree.map(lambda x: x.sharding, state),
      batch_sharding=sharding.batch_sharding(mesh, rules),
      replicated=sharding.replicated(mesh))
  with jax.set_mesh(mesh):
    new, metrics = fn(jax.tree.map(jnp.copy, state),
                      sharding.host_to_global(host, sharding.batch_sharding(mesh, rules)))
  return jax.device_get((state.params, new.params, metrics))


def test_router_losses_are_added_with_their_coefficients_and_logged():
  old, new, m = _step("padded")
  assert m["aux_loss"] > 0 and m["router_z_loss"] > 0
  # Policy == reference: DPO is log 2, the rest is the weighted router losses.
  np.testing.assert_allclose(m["loss"], np.log(2.0) + AUX * m["aux_loss"] + Z * m["router_z_loss"],
                             rtol=1e-6)
  # The router learns (its only gradients at policy == reference beyond DPO's).
  router_old = old["layers"][0]["mlp"]["router"]
  router_new = new["layers"][0]["mlp"]["router"]
  assert np.abs(np.asarray(router_new) - np.asarray(router_old)).max() > 0


def test_packed_moe_step_equals_padded_step():
  """Routing is per token and the router losses count real tokens only: the packed
  rows (unused tails excluded) give the padded step's loss, router losses, metrics and
  update."""
  _, p1, m1 = _step("padded")
  _, p2, m2 = _step("packed")
  assert set(m1) == set(m2) and {"aux_loss", "router_z_loss"} <= set(m1)
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_shared_prompt_moe_step_has_the_padded_logps():
  """A prompt run once into the KV cache routes its tokens as in each padded row:
  the same sequence log-probs (the router losses count those prompt tokens once)."""
  _, _, m1 = _step("padded", "shared")
  _, _, m2 = _step("shared", "shared")
  for k in ("logps/chosen", "logps/rejected", "tokens/real"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert np.isfinite(m2["aux_loss"]) and m2["aux_loss"] > 0
  np.testing.assert_allclose(m2["loss"], np.log(2.0) + AUX * m2["aux_loss"]
                             + Z * m2["router_z_loss"], rtol=1e-6)


def test_moe_dpo_run_with_packing_resumes_bit_identically(tmp_path):
  """Stopped after step 2 of 3 and resumed in-process == straight: metrics (the router
  losses among them) and every parameter, bit for bit."""
  cfg = lambda: moe_config(**{"total_steps": 3, "checkpoint.every": 1, "data.packing": True,
                              "data.pack_length": 16, "data.pack_buckets": 1,
                              "mesh.shape": (1, 1, 1), "optim.warmup_steps": 0})
  one = jax.devices()[:1]
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_loop(cfg(), straight, progress=False, devices=one)
  train_loop(cfg(), resumed, progress=False, devices=one, stop_after=2)
  train_loop(cfg(), resumed, progress=False, devices=one)
  a, b = read_metrics(straight), read_metrics(resumed)
  assert [m["step"] for m in b] == [1, 2, 3]
  for x, y in zip(a, b):
    assert x["aux_loss"] > 0 and x["router_z_loss"] > 0
    for key in ("loss", "aux_loss", "router_z_loss", "grad_norm", "rewards/margins"):
      assert x[key] == y[key], (key, x, y)
  mesh = sharding.make_mesh((1, 1, 1), one)
  pa = jax.tree.leaves(jax.device_get(rundir.load_run_params(straight, cfg(), mesh)[1]))
  pb = jax.tree.leaves(jax.device_get(rundir.load_run_params(resumed, cfg(), mesh)[1]))
  assert len(pa) == len(pb) > 0
  for x, y in zip(pa, pb):
    np.testing.assert_array_equal(x, y)


def test_lora_on_moe_attention_trains_and_evaluates_with_router_losses():
  """LoRA on q, k, v, o of an MoE model, bf16 compute: the step trains the adapters
  with the router losses added (the reference, the base with adapters off, adds none);
  eval reports them too. Adapters on the experts are refused before anything is built."""
  cfg = moe_config(**{"lora.rank": 4, "reference.mode": "frozen", "optim.warmup_steps": 0,
                      "mesh.shape": (1, 1, 1)})
  cfg.model.overrides.dtype = "bfloat16"
  built, state = built_state(cfg, jax.devices()[:1])
  batch = sharding.host_to_global(random_batch(np.random.default_rng(0)),
                                  built.batch_sharding)
  with jax.set_mesh(built.mesh):
    evaluated = jax.device_get(built.eval_fn(state, batch))
    new, m = built.step_fn(state, batch)
    m, new = jax.device_get((m, new.params))
  # Adapters start at B = 0: policy == reference, DPO is log 2, the rest router losses.
  for metrics in (m, evaluated):
    np.testing.assert_allclose(
        metrics["loss"], np.log(2.0) + AUX * metrics["aux_loss"] + Z * metrics["router_z_loss"],
        rtol=1e-6)
  np.testing.assert_allclose(evaluated["aux_loss"], m["aux_loss"], rtol=1e-6)
  assert set(new["layers"][0]["attn"]) == {"q_lora", "k_lora", "v_lora", "o_lora"}
  assert m["grad_norm"] > 0 and np.isfinite(m["aux_loss"])
  with pytest.raises(config_lib.ConfigError, match=r"config\.lora\.targets: .*experts"):
    config_lib.validate(moe_config(**{"lora.rank": 4, "lora.targets": ("q", "gate")}), 8)


@pytest.mark.parametrize("key,value,match", [
    ("experts_per_token", 5, "model.overrides.experts_per_token"),
    ("router_aux_loss_coef", -1.0, "model.overrides.router_aux_loss_coef"),
    ("router_z_loss_coef", float("nan"), "model.overrides.router_z_loss_coef"),
    ("n_experts", 3, "mesh.shape: model.n_experts=3"),   # experts split over data=2
])
def test_bad_moe_config_fails_validation_naming_the_key(key, value, match):
  c = moe_config(**{"mesh.shape": (2, 4, 1)})
  c.sharding_rules = tuple(r for r in c.sharding_rules if r[0] != "expert") + (
      ("expert", "data"),)
  c.model.overrides[key] = value
  if key == "n_experts":
    c.model.overrides.experts_per_token = 1
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, 8)
