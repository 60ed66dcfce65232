"""LoRA adapters: frozen base, adapter-only gradients and checkpoints, the reference
is the base with adapters off (no copy of it), merge == unmerged forward, export."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import sharding
from jaxalign.models import lora, transformer
from jaxalign.train import build as build_lib, rundir
from tests.train.helpers import built_state, random_batch, read_metrics, tiny_config, train_loop

LOG2 = np.float32(np.log(2.0))


_batch = random_batch


def _setup(*, rank=4, frozen_ref=True, dropout=0.0, targets=("q", "k", "v", "o", "gate",
                                                              "up", "down"), shape=(1, 4, 2)):
  """A jitted DPO step on the tiny model, with (rank > 0) or without LoRA."""
  cfg = tiny_config(**{
      "mesh.shape": shape, "lora.rank": rank, "lora.alpha": 8.0, "lora.dropout": dropout,
      "lora.targets": targets, "reference.mode": "frozen" if frozen_ref else "precompute",
      "optim.lr": 1e-2, "optim.warmup_steps": 0, "optim.clip_norm": 0.0, "total_steps": 10,
      "logprob_chunk_size": 16})
  built, state = built_state(cfg, jax.devices()[:int(np.prod(shape))])
  return dict(mesh=built.mesh, rules=built.run_spec.rules, model_cfg=built.run_spec.model_cfg,
              lcfg=built.run_spec.lora_cfg, graphdef=built.graphdef,
              abstract=built.abstract_state, state=state, step_fn=built.step_fn)


def saved_state_tree(state_dir: str):
  """The tree of a checkpoint's saved train state, read from Orbax's metadata."""
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_frozen_base_adapter_only_grads_reference_is_base_and_no_second_copy():
  # One device: whole-array memory accounting. Dropout on: none of the below may
  # depend on it, and its masks come from (rng, step).
  s = _setup(shape=(1, 1, 1), dropout=0.5)
  state, mesh = s["state"], s["mesh"]
  # Only adapters are trainable (and in the optimizer state); all of the base is frozen.
  flat_params = nnx.to_flat_state(state.params)
  assert flat_params and all(isinstance(v, nnx.LoRAParam) for _, v in flat_params)
  assert {p[-1] for p, _ in flat_params} == {"lora_a", "lora_b"}
  assert len(flat_params) == 2 * 7 * s["model_cfg"].n_layers
  assert all(type(v) is nnx.Param for _, v in nnx.to_flat_state(state.frozen))
  base_before = jax.device_get(state.frozen)
  rng = np.random.default_rng(0)
  batches = [_batch(rng) for _ in range(3)]
  with jax.set_mesh(mesh):
    bs = sharding.batch_sharding(mesh, s["rules"])
    compiled = s["step_fn"].lower(state, sharding.host_to_global(batches[0], bs)).compile()
    state, m0 = compiled(state, sharding.host_to_global(batches[0], bs))
    for b in batches[1:]:
      state, m = compiled(state, sharding.host_to_global(b, bs))

  # XLA's memory analysis of the compiled step: the arguments are the base, the
  # adapters, their two Adam moments and the batch -- no reference copy of the
  # base (full DPO with a frozen reference holds it twice, plus two moments).
  mem = compiled.memory_analysis()
  base, adapters = _nbytes(state.frozen), _nbytes(state.params)
  print(f"\nLoRA step: base {base} B, adapters {adapters} B, arguments "
        f"{mem.argument_size_in_bytes} B, temp {mem.temp_size_in_bytes} B")
  extra = 3 * adapters + _nbytes(batches[0]) + 1024        # + step, rng, counters
  assert extra < base       # so the bound below leaves no room for a second base
  assert base <= mem.argument_size_in_bytes <= base + extra

  # B = 0: policy == base == reference, so step 0's DPO loss is log 2 exactly.
  # The policy (B = 0) and the base-only reference are two compiled forwards:
  # equal up to float32 rounding of the attention kernel's fusion.
  assert np.float32(m0["loss"]) == LOG2 and abs(float(m0["rewards/margins"])) < 1e-6
  assert float(m["grad_norm"]) > 0 and float(m["loss"]) != float(LOG2)
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(jax.device_get(state.frozen))):
    np.testing.assert_array_equal(a, b)   # bit-identical base after training
  b_norm = sum(float(jnp.abs(v.get_value()).sum()) for p, v in nnx.to_flat_state(state.params)
               if p[-1] == "lora_b")
  assert b_norm > 0

  # Dropout: the same rng and step give the same masks, another step other masks.
  copy = lambda st: jax.tree.map(jnp.copy, st)  # the step donates its input
  with jax.set_mesh(mesh):
    batch = sharding.host_to_global(batches[0], bs)
    again = [float(compiled(copy(state), batch)[1]["loss"]) for _ in range(2)]
    other = float(compiled(copy(state).replace(step=state.step + 1), batch)[1]["loss"])
  assert again[0] == again[1] and other != again[0]


def test_adapters_follow_the_sharding_rules():
  cfg = tiny_config(**{"mesh.shape": (1, 4, 2), "lora.rank": 4, "lora.targets": lora.TARGETS,
                       "model.scan_layers": True})
  shardings = build_lib.build_config(cfg).state_shardings
  attn, mlp = shardings.params["layers"][0]["attn"], shardings.params["layers"][0]["mlp"]
  P = jax.sharding.PartitionSpec
  # Scanned layers: adapters are stacked like the base, the layers axis unsplit.
  assert attn["q_lora"]["lora_a"].get_value().spec == P(None, "fsdp", None)
  assert attn["q_lora"]["lora_b"].get_value().spec == P(None, None, "tensor")
  assert attn["o_lora"]["lora_a"].get_value().spec == P(None, "tensor", None)
  assert mlp["down_lora"]["lora_b"].get_value().spec == P(None, None, "fsdp")
  # The base keeps its own sharding; the Adam moments follow the adapters'.
  assert (shardings.frozen["layers"][0]["attn"]["q"].get_value().spec
          == P(None, "fsdp", "tensor", None))


def test_merge_equals_unmerged_forward_and_zero_b_equals_base():
  cfg = transformer.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4,
                                n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.TARGETS)
  model = lora.add_adapters(transformer.Transformer(cfg, rngs=nnx.Rngs(0)), lcfg, seed=0)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (3, 10)), jnp.int32)
  mask = jnp.ones((3, 10), jnp.int32).at[1, 7:].set(0)
  base_graph = lora.base_graphdef(cfg)

  @jax.jit
  def logits(adapters, base):
    m = nnx.merge(base_graph, base) if adapters is None else nnx.merge(graphdef, adapters, base)
    return m.logits(m(tokens, mask))

  want_base = np.asarray(logits(None, base))
  # Zero B: the adapted model is the base.
  np.testing.assert_array_equal(np.asarray(logits(adapters, base)), want_base)
  # Random B on every target, then merged weights vs the two-path forward.
  key = jax.random.PRNGKey(1)
  leaves, treedef = jax.tree.flatten(adapters)
  adapters = jax.tree.unflatten(treedef, [
      0.05 * jax.random.normal(jax.random.fold_in(key, i), x.shape) for i, x in enumerate(leaves)])
  unmerged = np.asarray(logits(adapters, base))
  merged_params = jax.jit(functools.partial(lora.merge, scale=lcfg.scale))(base, adapters)
  got = np.asarray(logits(None, merged_params))
  assert np.abs(unmerged - want_base).max() > 1e-2   # the adapters matter
  np.testing.assert_allclose(got, unmerged, atol=2e-5, rtol=0)
  # Merging never touches a weight without an adapter.
  for (p, a), (_, b) in zip(nnx.to_flat_state(base), nnx.to_flat_state(merged_params)):
    if p[-1] in ("scale", "embedding", "lm_head"):
      np.testing.assert_array_equal(a.get_value(), b.get_value())


def test_lora_run_resumes_checkpoints_adapters_only_and_exports(tmp_path):
  """A LoRA run from an SFT base (init_from): 2 steps straight equal 1 + resume 1;
  the checkpoint holds no base; export writes the merged model for transformers."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  sft = str(tmp_path / "sft")
  train_loop(tiny_config("sft", total_steps=1), sft, progress=False)
  # Warm-up makes step 1's LR 0; step 2 moves the adapters.
  over = {"lora.rank": 4, "lora.targets": ("q", "v", "o", "up", "down"), "lora.alpha": 8.0,
          "init_from": sft, "reference.mode": "frozen", "total_steps": 2,
          "checkpoint.every": 1, "optim.warmup_steps": 1, "optim.lr": 1e-2}
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train_loop(tiny_config(**over), straight, progress=False)
  train_loop(tiny_config(**over), resumed, progress=False, stop_after=1)
  train_loop(tiny_config(**over), resumed, progress=False)
  a, b = read_metrics(straight), read_metrics(resumed)
  assert [m["step"] for m in b] == [1, 2]
  assert a[0]["loss"] == float(LOG2)
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"], (x, y)

  # Adapter-only: the saved state holds the adapters and their optimizer state, no base.
  saved = saved_state_tree(os.path.join(straight, "checkpoints", "2", "state"))
  assert saved["frozen"] is None and saved["ref_params"] is None
  adapter_leaves = jax.tree.leaves(saved["params"])
  assert len(adapter_leaves) == 2 * 5   # (A, B) per target, one layer
  assert {p[-2].key for p, _ in jax.tree_util.tree_flatten_with_path(saved["params"])[0]} == {
      "lora_a", "lora_b"}
  config = tiny_config(**over)

  # The LoRA forward (base + adapters, unmerged) vs transformers on the merged export.
  out = rundir.export_checkpoint(straight, str(tmp_path / "hf"))
  built = build_lib.build_config(config)
  lgraph, abstract = built.graphdef, built.abstract_state
  with jax.set_mesh(built.mesh):
    adapters = ckpt.restore_params(os.path.join(straight, "checkpoints"), abstract.params)
    base = ckpt.restore_params(os.path.join(sft, "checkpoints"), abstract.frozen)
  model = nnx.merge(lgraph, adapters, base)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 25, size=(3, 10)).astype(np.int32)
  mask = np.ones((3, 10), np.int32)
  mask[1, 7:] = 0
  ours = np.asarray(model.logits(model(jnp.asarray(tokens), jnp.asarray(mask))))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask.astype(np.int64)),
                      position_ids=torch.from_numpy(
                          np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int64))).logits.numpy()
  real = mask.astype(bool)
  diff = float(np.abs(ours[real] - theirs[real]).max())
  # The adapters moved the model away from the SFT base.
  base_model = nnx.merge(lora.base_graphdef(built.run_spec.model_cfg), base)
  moved = float(np.abs(ours - np.asarray(base_model.logits(base_model(
      jnp.asarray(tokens), jnp.asarray(mask))))).max())
  print(f"\nLoRA export: max |logit diff| vs transformers {diff:.2e} (adapters moved "
        f"logits by {moved:.2e})")
  assert diff <= 1e-4 and moved > 1e-4


@pytest.mark.parametrize("key,value,match", [
    ("lora.rank", -1, "config.lora.rank"),
    ("lora.targets", ("q", "ffn"), "config.lora.targets"),
    ("lora.targets", (), "config.lora.targets"),
    ("lora.dropout", 1.0, "config.lora.dropout"),
    ("lora.alpha", 0.0, "config.lora.alpha"),
])
def test_bad_lora_config_is_named(key, value, match):
  c = tiny_config(**{"lora.rank": 4, key: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, 8)


def test_stacked_adapters_equal_unrolled_adapters():
  """Scanned layers carry [G, ...] adapters; with the same values (stacked) the
  forward equals the unrolled model's with per-layer adapters."""
  import dataclasses
  cfg = transformer.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4,
                                n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.TARGETS)
  unrolled = lora.add_adapters(transformer.Transformer(
      dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0)), lcfg, seed=0)
  scanned = lora.add_adapters(transformer.Transformer(cfg, rngs=nnx.Rngs(0)), lcfg, seed=0)
  assert scanned.layers[0].attn.q_lora.lora_a.shape == (2, 32, 4)
  tree = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  # B = 0 at init: give every adapter a nonzero B so the adapters matter.
  rng = np.random.default_rng(0)
  tree = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(rng.normal(size=x.shape), x.dtype) * 0.1
      if "lora_b" in jax.tree_util.keystr(p) else x, tree)
  unrolled_state = nnx.state(unrolled, nnx.Param)
  nnx.replace_by_pure_dict(unrolled_state, tree)
  nnx.update(unrolled, unrolled_state)
  scanned_state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(scanned_state, transformer.stack_layers(cfg, tree))
  nnx.update(scanned, scanned_state)
  tokens = jnp.asarray(rng.integers(0, 32, (3, 10)), jnp.int32)
  mask = jnp.ones((3, 10), jnp.int32)
  base = transformer.convert_layout(unrolled, scan_layers=False)   # adapters dropped
  want = np.asarray(unrolled(tokens, mask))
  assert np.abs(want - np.asarray(base(tokens, mask))).max() > 1e-3
  np.testing.assert_allclose(np.asarray(scanned(tokens, mask)), want, rtol=1e-5, atol=1e-5)
