"""The jitted train step: traced once, donated state, shardings as the rules say."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalign import config as config_lib
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


def test_micro_batches_of_fewer_pairs_than_devices_run_one_sequence_per_device():
  """8 pairs, 2 micro-batches of 4 on an 8-device fsdp mesh (4 x 2 = 8 sequences: one
  per device, what the 70B QLoRA recipe runs at T=4096): validation accepts it and the
  step equals the step on one device. Before, validation refused any micro-batch of
  fewer examples than batch shards."""
  config_lib.validate(tiny_config(**{"optim.grad_accum_steps": 2, "mesh.shape": (1, 8, 1)}), 8)
  with pytest.raises(config_lib.ConfigError, match="data.batch_size: 8 must be"):   # 2 x 2 rows
    config_lib.validate(tiny_config(**{"optim.grad_accum_steps": 4,
                                       "mesh.shape": (1, 8, 1)}), 8)
  runs = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((1, 8, 1), None)):
    built, state = _setup(shape, devices, **{"optim.grad_accum_steps": 2})
    with jax.set_mesh(built.mesh):
      batch = sharding.host_to_global(_batch(np.random.default_rng(4)), built.batch_sharding)
      state, m = built.step_fn(state, batch)
    runs.append((jax.device_get(m), jax.device_get(state.params)))
  (m1, p1), (m8, p8) = runs
  for key in ("loss", "grad_norm", "rewards/margins"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _ragged_batch(rng, s):
  """random_batch with [8, s] sequences of 6..8 real tokens (prompt 4) in the first
  half, 11..12 in the second: the two micro-batches score very different numbers of
  tokens, so a mean of their means is not the token mean."""
  batch = random_batch(rng, s=s)
  lengths = np.concatenate([rng.integers(6, 9, size=(4, s)), rng.integers(11, 13, size=(4, s))])
  batch["attention_mask"] = (np.arange(12) < lengths[..., None]).astype(np.int32)
  batch["loss_mask"] = batch["attention_mask"] * (np.arange(12) >= 4)
  return batch


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_token_metrics_equal_full_logits_and_change_no_bit(loss):
  """TRL's per-token metrics of the jitted step (2 micro-batches, chunk 12 of a 32-token
  vocabulary, a final softcap) == a direct computation on the model's full logits,
  token-weighted over the whole batch: DPO's logits/chosen and logits/rejected (the
  logits' mean over the sequence's scored tokens and the vocabulary), SFT's
  mean_token_accuracy and entropy. With them off the loss, gradients and updated
  parameters are the same to the bit."""
  s = 2 if loss == "dpo" else 1
  cfg = tiny_config(loss, **{"mesh.shape": (1, 1, 1), "optim.grad_accum_steps": 2,
                             "logprob_chunk_size": 12,
                             **({"reference.mode": "frozen"} if loss == "dpo" else {})})
  cfg.model.overrides.final_logit_softcap = 2.0
  built, state = built_state(cfg, jax.devices()[:1])
  batch = _ragged_batch(np.random.default_rng(4), s)
  spec = built.run_spec
  flat = lambda x: x.reshape(8 * s, 12)

  def full_logits(tokens):
    with jax.set_mesh(built.mesh):
      model = nnx.merge(built.graphdef, state.params, state.frozen)
      logits = model.logits(model(flat(tokens), flat(batch["attention_mask"])))
    return np.asarray(logits, np.float64).reshape(8, s, 12, -1)

  # Some tokens are the model's own argmax (greedy from the token before): hits.
  for t in (4, 6, 8):
    batch["tokens"][:, :, t + 1] = full_logits(batch["tokens"])[:, :, t].argmax(-1)

  def run(token_metrics):
    call = step_lib.make_loss_call(spec.loss, dict(spec.hparams), token_metrics=token_metrics)
    assert bool(call.token_metrics) == token_metrics   # config.token_metrics turns them off
    fn = jax.jit(functools.partial(
        step_lib.train_step, graphdef=built.graphdef, tx=built.tx,
        schedule=optax.constant_schedule(1e-3), loss_call=call, chunk_size=12, accum_steps=2))
    with jax.set_mesh(built.mesh):
      new, metrics = fn(jax.tree.map(jnp.copy, state), batch)
    return jax.device_get((new.params, metrics))

  (p_on, m_on), (p_off, m_off) = run(True), run(False)
  names = {"dpo": ("logits/chosen", "logits/rejected"),
           "sft": ("mean_token_accuracy", "entropy")}[loss]
  assert set(m_on) - set(m_off) == set(names)
  for k in m_off:
    np.testing.assert_array_equal(m_on[k], m_off[k], err_msg=k)
  for x, y in zip(jax.tree.leaves(p_off), jax.tree.leaves(p_on)):
    np.testing.assert_array_equal(y, x)

  logits = full_logits(batch["tokens"])[:, :, :-1]   # position t predicts token t + 1
  scored = (batch["loss_mask"] & batch["attention_mask"])[..., 1:].astype(bool)
  if loss == "dpo":
    want = {"logits/chosen": logits[:, 0][scored[:, 0]].mean(),
            "logits/rejected": logits[:, 1][scored[:, 1]].mean()}
  else:
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = {"mean_token_accuracy":
                (logits.argmax(-1) == batch["tokens"][..., 1:])[scored].mean(),
            "entropy": -(np.exp(logp) * logp).sum(-1)[scored].mean()}
    assert 0 < want["mean_token_accuracy"] < 1
  for k, v in want.items():
    np.testing.assert_allclose(m_on[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
