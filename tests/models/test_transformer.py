"""Transformer: equivalence with HF PyTorch models, causality, padding, sharding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign.models.transformer import (REMAT_POLICIES, ModelConfig, PRESETS, Transformer,
                                         convert_layout, init_model, preset,
                                         stack_layers, unstack_layers)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T = 3, 10
LENGTHS = (10, 7, 4)  # right padding


def _batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(B, T)).astype(np.int32)
  mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
  tokens = tokens * mask  # pad id 0
  return tokens, mask


def _randomize_torch(model, seed):
  """HF inits norms to 1/0 and biases to 0; random values test every tensor."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      if "norm" in name:
        p.copy_((0.0 if "gemma" in type(model).__name__.lower() else 1.0) + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)


def _load_hf(model: Transformer, hf) -> None:
  """Test-local HF state_dict -> unrolled Transformer copy (hf.py does the same)."""
  assert not model.config.scan_layers
  c = model.config
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  D, H, KV, Dh = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim

  def put(param, value):
    assert param.shape == value.shape, (param.shape, value.shape)
    param[...] = jnp.asarray(value)

  put(model.embed.embedding, sd["model.embed_tokens.weight"])
  put(model.final_norm.scale, sd["model.norm.weight"])
  if not c.tie_embeddings:
    put(model.lm_head, sd["lm_head.weight"].T)
  for i, blk in enumerate(model.layers):
    p = f"model.layers.{i}."
    a = blk.attn
    put(a.q, sd[p + "self_attn.q_proj.weight"].T.reshape(D, H, Dh))
    put(a.k, sd[p + "self_attn.k_proj.weight"].T.reshape(D, KV, Dh))
    put(a.v, sd[p + "self_attn.v_proj.weight"].T.reshape(D, KV, Dh))
    put(a.o, sd[p + "self_attn.o_proj.weight"].T.reshape(H, Dh, D))
    if c.qkv_bias:
      put(a.q_bias, sd[p + "self_attn.q_proj.bias"].reshape(H, Dh))
      put(a.k_bias, sd[p + "self_attn.k_proj.bias"].reshape(KV, Dh))
      put(a.v_bias, sd[p + "self_attn.v_proj.bias"].reshape(KV, Dh))
    if c.qk_norm:
      put(a.q_norm.scale, sd[p + "self_attn.q_norm.weight"])
      put(a.k_norm.scale, sd[p + "self_attn.k_norm.weight"])
    put(blk.attn_norm.scale, sd[p + "input_layernorm.weight"])
    if c.post_norms:  # Gemma2 names
      put(blk.post_attn_norm.scale, sd[p + "post_attention_layernorm.weight"])
      put(blk.mlp_norm.scale, sd[p + "pre_feedforward_layernorm.weight"])
      put(blk.post_mlp_norm.scale, sd[p + "post_feedforward_layernorm.weight"])
    else:
      put(blk.mlp_norm.scale, sd[p + "post_attention_layernorm.weight"])
    put(blk.mlp.gate, sd[p + "mlp.gate_proj.weight"].T)
    put(blk.mlp.up, sd[p + "mlp.up_proj.weight"].T)
    put(blk.mlp.down, sd[p + "mlp.down_proj.weight"].T)


_COMMON = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="eager")


def _cases():
  rope = {"rope_type": "default", "rope_theta": 10000.0}
  llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}
  mine = dict(vocab_size=48, d_model=32, d_ff=64, n_layers=2, n_heads=4, n_kv_heads=2,
              head_dim=8, max_seq_len=64, norm_eps=1e-6)
  return {
      "llama_gqa": (lambda: transformers.LlamaForCausalLM(
          transformers.LlamaConfig(**_COMMON, rope_parameters=rope)),
                    ModelConfig(**mine)),
      "llama3_rope_scaling": (lambda: transformers.LlamaForCausalLM(
          transformers.LlamaConfig(**_COMMON, rope_parameters=llama3)),
                              ModelConfig(**mine, rope_theta=500000.0, rope_scaling=dict(
                                  factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8))),
      "qwen2_bias": (lambda: transformers.Qwen2ForCausalLM(
          transformers.Qwen2Config(**_COMMON, rope_parameters=rope)),
                     ModelConfig(**mine, qkv_bias=True)),
      "qwen3_qk_norm": (lambda: transformers.Qwen3ForCausalLM(
          transformers.Qwen3Config(**_COMMON, rope_parameters=rope)),
                        ModelConfig(**mine, qk_norm=True)),
      # Sliding window 4 < T=10 on layer 0, so the window mask is exercised.
      "gemma2": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
          **_COMMON, rope_parameters=rope, hidden_activation="gelu_pytorch_tanh",
          query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
          final_logit_softcapping=3.0, sliding_window=4, tie_word_embeddings=True,
          pad_token_id=0)),
                 ModelConfig(**mine, tie_embeddings=True, norm_offset=True, embed_scale=True,
                             post_norms=True, activation="gelu_tanh",
                             query_pre_attn_scalar=12.0, attn_logit_softcap=2.0,
                             final_logit_softcap=3.0, sliding_window=4,
                             layer_types=("sliding", "full"))),
  }


@pytest.mark.parametrize("name", list(_cases()))
def test_matches_hf_reference(name):
  make_hf, config = _cases()[name]
  torch.manual_seed(0)
  hf = make_hf().eval()
  _randomize_torch(hf, seed=1)
  unrolled = init_model(dataclasses.replace(config, scan_layers=False), seed=0)
  _load_hf(unrolled, hf)
  tokens, mask = _batch(config.vocab_size)
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(tokens.astype(np.int64)),
              attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
  real = mask.astype(bool)
  # The unrolled blocks, and the same weights stacked and run by the layer scan.
  for model in (unrolled, convert_layout(unrolled, scan_layers=True)):
    got = np.asarray(model.logits(model(jnp.asarray(tokens), jnp.asarray(mask))))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_causal():
  model = init_model(preset("tiny"), seed=0)
  tokens, _ = _batch(32)
  mask = np.ones_like(tokens)
  h1 = model(jnp.asarray(tokens), jnp.asarray(mask))
  tokens2 = tokens.copy()
  tokens2[:, 6] = (tokens2[:, 6] + 1) % 32
  h2 = model(jnp.asarray(tokens2), jnp.asarray(mask))
  np.testing.assert_allclose(h1[:, :6], h2[:, :6], atol=1e-6)
  assert np.abs(np.asarray(h1[:, 6:] - h2[:, 6:])).max() > 1e-3


def test_padding_invariance_right_and_left():
  model = init_model(preset("tiny"), seed=0)
  seq = jnp.arange(1, 6, dtype=jnp.int32)[None]                      # [1, 5]
  ref = model(seq, jnp.ones_like(seq))
  for pad in (1, 4):
    zeros = jnp.zeros((1, pad), jnp.int32)
    right = model(jnp.concatenate([seq, zeros], 1),
                  jnp.concatenate([jnp.ones_like(seq), zeros], 1))
    np.testing.assert_allclose(right[:, :5], ref, atol=1e-5)
    left = model(jnp.concatenate([zeros, seq], 1),
                 jnp.concatenate([zeros, jnp.ones_like(seq)], 1))
    np.testing.assert_allclose(left[:, pad:], ref, atol=1e-5)
    assert np.isfinite(np.asarray(left)).all()  # fully padded query rows


def _value_and_grads(model, tokens, mask):
  """Loss sum(h^2) and its gradients (one jitted program; eager op-by-op float32
  differs from any compiled program by ~1e-4), in the unrolled layout."""
  graphdef, state = nnx.split(model)
  loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens, mask) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  grads = nnx.to_pure_dict(grads)
  if model.config.scan_layers:
    grads = unstack_layers(model.config, grads)
  return value, grads


def _assert_same(a, b, tol=1e-4):
  """Same loss and gradients, up to float32 rounding relative to each gradient's scale
  (a recomputed forward fuses differently: ~3e-5 here; a wrong gradient is O(1))."""
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=0, atol=tol * float(np.abs(y).max()) + 1e-7), a[1], b[1])


# Llama-shaped (period 1), Gemma2-shaped (local/global: period 2), and
# 3 layers of period 2 (one scanned group + an unrolled tail), Gemma3's rope.
LAYOUT_CASES = {
    "llama": ModelConfig(),
    "gemma2": ModelConfig(sliding_window=4, layer_types=("sliding", "full"), post_norms=True,
                          norm_offset=True, attn_logit_softcap=5.0),
    "tail": ModelConfig(n_layers=3, sliding_window=4, layer_types=("sliding", "full", "sliding"),
                        local_rope_theta=100.0, qk_norm=True),
}


@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_scanned_equals_unrolled_logits_and_grads(name):
  config = LAYOUT_CASES[name]
  tokens, mask = map(jnp.asarray, _batch(32))
  scanned = init_model(config, seed=0)
  period, groups, tail = config.scan_groups()
  assert (period, groups, tail) == {"llama": (1, 2, 0), "gemma2": (2, 1, 0),
                                    "tail": (2, 1, 1)}[name]
  assert scanned.layers[0].attn.q.shape[0] == groups      # stacked: a leading layers axis
  unrolled = convert_layout(scanned, scan_layers=False)
  assert len(unrolled.layers) == config.n_layers
  np.testing.assert_allclose(np.asarray(scanned.logits(scanned(tokens, mask))),
                             np.asarray(unrolled.logits(unrolled(tokens, mask))),
                             rtol=1e-5, atol=1e-5)
  _assert_same(_value_and_grads(scanned, tokens, mask), _value_and_grads(unrolled, tokens, mask))


@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_a_seed_gives_the_same_model_in_both_layouts(name):
  """Stacked entry g of slot j is drawn with unrolled layer g*P + j's keys, so
  `scan_layers` never changes a seeded run (its init, hence its training)."""
  config = LAYOUT_CASES[name]
  scanned = nnx.to_pure_dict(nnx.state(init_model(config, seed=5), nnx.Param))
  unrolled = init_model(dataclasses.replace(config, scan_layers=False), seed=5)
  want = stack_layers(config, nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)))
  assert jax.tree.structure(scanned) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               scanned, want)
  other = nnx.to_pure_dict(nnx.state(init_model(config, seed=6), nnx.Param))
  assert not np.array_equal(np.asarray(other["layers"][0]["attn"]["q"]),
                            np.asarray(scanned["layers"][0]["attn"]["q"]))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_every_remat_policy_gives_the_same_value_and_grad(scan):
  tokens, mask = map(jnp.asarray, _batch(32))
  config = ModelConfig(scan_layers=scan)
  want = _value_and_grads(init_model(config, seed=0), tokens, mask)
  # Unrolled: each block is checkpointed alone; two policies suffice there.
  policies = REMAT_POLICIES[1:] + (True,) if scan else ("full", "minimal")
  for policy in policies:     # True: the old boolean, read as "full"
    model = init_model(dataclasses.replace(config, remat=policy), seed=0)
    _assert_same(_value_and_grads(model, tokens, mask), want)


def test_remat_policies_are_applied():
  """Each policy changes what the backward recomputes (the jaxpr differs from none)."""
  tokens, mask = map(jnp.asarray, _batch(32))
  texts = {}
  for policy in REMAT_POLICIES:
    model = init_model(ModelConfig(remat=policy), seed=0)
    graphdef, state = nnx.split(model)
    loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens, mask) ** 2)
    texts[policy] = str(jax.make_jaxpr(jax.grad(loss))(state))
  assert "checkpoint" not in texts["none"] and "remat" not in texts["none"]
  assert len(set(texts.values())) == len(REMAT_POLICIES)
  assert "q_proj" in texts["minimal"]        # the checkpoint_name tags reach the program


def test_bad_remat_value_is_refused():
  with pytest.raises(ValueError, match="remat"):
    ModelConfig(remat="everything")


def test_config_round_trip_and_presets():
  for name, config in PRESETS.items():
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert hash(ModelConfig.from_dict(config.to_dict())) == hash(config)
  assert 95e6 < preset("100m").num_params() < 105e6
  assert 8.0e9 < preset("llama3-8b").num_params() < 8.1e9
  with pytest.raises(ValueError):
    ModelConfig.from_dict({"d_modle": 3})


RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
         ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"),
         ("head_dim", None), ("norm", None), ("layers", None))
EXPECTED = {   # scanned: every layer parameter has a leading, unsplit layers axis
    "embed.embedding": P("tensor", "fsdp"),
    "layers.0.attn.q": P(None, "fsdp", "tensor", None),
    "layers.0.attn.k": P(None, "fsdp", "tensor", None),
    "layers.0.attn.o": P(None, "tensor", None, "fsdp"),
    "layers.0.attn.q_bias": P(None, "tensor", None),
    "layers.0.mlp.gate": P(None, "fsdp", "tensor"),
    "layers.0.mlp.down": P(None, "tensor", "fsdp"),
    "layers.0.attn_norm.scale": P(None, None),
    "lm_head": P("fsdp", "tensor"),
}


def test_sharded_construction_and_forward():
  config = ModelConfig(qkv_bias=True)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 32, (4, 8)), jnp.int32)
  mask = jnp.asarray(np.arange(8)[None] < np.array([8, 5, 3, 8])[:, None])
  want = init_model(config, seed=0)(tokens, mask)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    model = init_model(config, seed=0)
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)
  flat_state = dict(nnx.to_flat_state(state))
  flat_specs = dict(nnx.to_flat_state(specs))
  for path, var in flat_state.items():
    spec = flat_specs[path].get_value()
    assert var[...].sharding.spec == spec, (path, var[...].sharding.spec, spec)
  by_name = {".".join(map(str, k)): v for k, v in flat_state.items()}
  for name, spec in EXPECTED.items():
    assert by_name[name][...].sharding.spec == spec, name

  graphdef = nnx.graphdef(model)
  batch_sharding = jax.NamedSharding(mesh, P(("data", "fsdp")))

  @jax.jit
  def forward(state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, mask)

  with jax.set_mesh(mesh):
    got = forward(state, jax.device_put(tokens, batch_sharding),
                  jax.device_put(mask, batch_sharding))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_cpu_projections_are_plain_matmuls_with_the_einsum_values():
  """On CPU every projection runs as one 2-D matmul (transformer._matmul_2d): the
  same values as its einsum, and the gated MLP's gradient has no transposed copy
  of an activation (the einsum's weight gradient had one per projection, issue 29)."""
  from jaxalign.models import transformer as tr

  rng = np.random.default_rng(0)
  x4 = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
  x3 = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  for eq, x, w_shape in (("btd,dhk->bthk", x3, (32, 4, 8)), ("btd,dgk->btgk", x3, (32, 2, 8)),
                         ("bthk,hkd->btd", x4, (4, 8, 32)), ("...d,df->...f", x3, (32, 48)),
                         ("...f,fd->...d", x3, (32, 16))):
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    np.testing.assert_allclose(tr._matmul_2d(eq, x, w), jnp.einsum(eq, x, w),
                               rtol=1e-5, atol=1e-5)
  assert tr._matmul_2d("btd,bsd->bts", x3, x3) is None    # not a projection: einsum

  mlp = tr.MLP(ModelConfig(d_model=32, d_ff=48), rngs=nnx.Rngs(0))
  graph, params = nnx.split(mlp)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graph, params)(x)))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x3).compile().as_text()
  assert " transpose(" not in hlo and " copy(" not in hlo, "a transposed activation copy"


def test_nested_remat_stages_give_the_scan_s_loss_and_gradients():
  """model.remat_stages (nested remat of the layer scan) changes what the backward keeps,
  not the numbers: 2 scanned layers as 2 checkpointed stages == one scan (float32)."""
  config = ModelConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                       head_dim=8, d_ff=32, remat="full", scan_layers=True)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 8)), jnp.int32)
  mask = jnp.ones((2, 8), jnp.int32)
  out = []
  for stages in (1, 2):
    cfg = dataclasses.replace(config, remat_stages=stages)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    def loss(p, graphdef=graphdef):
      model = nnx.merge(graphdef, p)
      return jnp.mean(model.logits(model(tokens, mask)) ** 2)
    out.append(jax.jit(jax.value_and_grad(loss))(params))
    jaxpr = str(jax.make_jaxpr(loss)(params))
    assert jaxpr.count("length=1" if stages == 2 else "length=2") == 1   # the inner scans
  (l1, g1), (l2, g2) = out
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="remat_stages"):
    ModelConfig(remat_stages=0)


def test_nested_remat_stages_trace_with_the_splash_kernel():
  """A bf16 splash step with model.remat_stages (the 70B QLoRA recipe's) traces: the
  kernel's precision wrapper, not needed at the process default precision, leaked
  tracers under the nested remat ("No constant handler for ... DynamicJaxprTracer")."""
  config = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                       head_dim=16, d_ff=32, max_seq_len=128, remat="full", scan_layers=True,
                       remat_stages=2, attention="splash", dtype="bfloat16")
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  tokens, mask = jnp.zeros((1, 128), jnp.int32), jnp.ones((1, 128), jnp.int32)

  def loss(p):
    model = nnx.merge(graphdef, p)
    return jnp.mean(model(tokens, mask).astype(jnp.float32) ** 2)

  with jax.default_matmul_precision("default"):   # what `jaxalign plan` / `train` run at
    jax.jit(jax.grad(loss)).lower(params)
