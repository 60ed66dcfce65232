"""HF interop of the mixture-of-experts families (Qwen3-MoE, Mixtral) against transformers.

Reference logits and router losses come from transformers' own PyTorch models
(float32, eager attention) built tiny and random here (4 experts, top-2, 2
layers) and saved with save_pretrained; nothing is downloaded.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.models import hf, lora, moe, transformer
from jaxalign.models.hf_config import config_from_hf, config_to_hf, infer_architecture
from jaxalign.sharding import DEFAULT_RULES
from jaxalign.train import state as state_lib
from tests.models.test_hf import _batch, _flat, _hf_logits, _load_exported, _max_diff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_COMMON = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
               rms_norm_eps=1e-6, rope_parameters=_ROPE)


def _families():
  """name -> (model class, config): E=4 experts, top-2. Mixtral's window of 4 < T
  exercises the sliding mask; Qwen3-MoE with and without norm_topk_prob."""
  t = transformers
  qwen = dict(_COMMON, intermediate_size=40, moe_intermediate_size=16, num_experts=4,
              num_experts_per_tok=2)
  return {
      "qwen3_moe": (t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(**qwen, norm_topk_prob=True)),
      "qwen3_moe_unnormalized": (t.Qwen3MoeForCausalLM,
                                 t.Qwen3MoeConfig(**qwen, norm_topk_prob=False)),
      "mixtral": (t.MixtralForCausalLM, t.MixtralConfig(
          **_COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
          sliding_window=4)),
  }


def _hf_model(name):
  cls, config = _families()[name]
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = cls(config).eval()
  # Random values in every tensor (HF inits norms to 1, the router to 0); the router
  # at scale 1 keeps the top-k choice far from ties, so float rounding never flips it.
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      if "norm" in pname:
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_((1.0 if pname.endswith("gate.weight") else 0.1) * noise)
  return model


# Experts over "data" (an axis no other weight uses), whatever DEFAULT_RULES says.
_EXPERT_RULES = tuple((n, t) for n, t in DEFAULT_RULES if n != "expert") + (("expert", "data"),)


def _hf_outputs(model, tokens, mask):
  """transformers' forward with router logits and its aux loss (padding excluded)."""
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 position_ids=torch.from_numpy(positions.astype(np.int64)),
                 output_router_logits=True)


def _saved(name, path):
  ref = _hf_model(name)
  ref.save_pretrained(path)
  return ref


@pytest.mark.parametrize("name", list(_families()))
def test_import_export_matches_transformers(name, tmp_path):
  ref = _saved(name, tmp_path / "hf")
  model, config = hf.from_pretrained(str(tmp_path / "hf"))
  assert (config.n_experts, config.experts_per_token) == (4, 2)
  assert config.moe_norm_topk == (name != "qwen3_moe_unnormalized")
  tokens, mask = _batch(config.vocab_size)
  stats = {}
  ours = np.asarray(model.logits(model(jnp.asarray(tokens), jnp.asarray(mask),
                                       router_stats=stats)))
  theirs = _hf_outputs(ref, tokens, mask)
  import_diff = _max_diff(ours, theirs.logits.numpy(), mask)
  # Router losses over the real tokens of every layer: the aux loss is transformers'
  # own (load_balancing_loss_func given the attention mask); the z-loss (neither
  # family has one) is ST-MoE's mean logsumexp^2 of transformers' router logits.
  aux, z = moe.router_losses(stats)
  real = torch.from_numpy(mask.reshape(-1).astype(bool))
  lse = torch.stack([torch.logsumexp(layer[real], -1) for layer in theirs.router_logits])
  print(f"\n{name}: aux loss {float(aux):.6f} (transformers {float(theirs.aux_loss):.6f})")
  np.testing.assert_allclose(float(aux), float(theirs.aux_loss), rtol=1e-5)
  np.testing.assert_allclose(float(z), float((lse ** 2).mean()), rtol=1e-5)

  out = hf.export(model, config, str(tmp_path / "out"), architecture=type(ref).__name__)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
    names = set(f.keys())
  with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
    assert names == set(f.keys())   # the hub's per-expert names, as save_pretrained writes
  export_diff = _max_diff(_hf_logits(_load_exported(out), tokens, mask), ours, mask)
  print(f"\n{name}: max |logit diff| import {import_diff:.2e}, export {export_diff:.2e}")
  assert import_diff <= TOL and export_diff <= TOL
  assert written["architectures"] == [type(ref).__name__]

  # Export -> import is bit-exact, in both layouts.
  again, config2 = hf.from_pretrained(out)
  assert config2 == config
  a, b = _flat(model), _flat(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_unrolled_and_expert_sharded_import(tmp_path):
  """The unrolled layout holds the scanned one's values; on a ("data", "fsdp",
  "tensor") mesh of 8 fake devices with the experts sharded (each device reads
  only its own experts' tensors) the values equal the single-device import."""
  _saved("mixtral", tmp_path / "hf")
  single, config = hf.from_pretrained(str(tmp_path / "hf"))
  unrolled, _ = hf.from_pretrained(str(tmp_path / "hf"), scan_layers=False)
  back = transformer.stack_layers(config, nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)))
  jax.tree.map(np.testing.assert_array_equal, back,
               nnx.to_pure_dict(nnx.state(single, nnx.Param)))

  model, _ = hf.from_pretrained(str(tmp_path / "hf"), mesh=sharding.make_mesh((2, 2, 2)),
                                rules=_EXPERT_RULES)
  got = {".".join(map(str, k)): v.get_value()
         for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert got["layers.0.mlp.gate"].sharding.spec == P(None, "data", "fsdp", "tensor")  # [G,E,D,F]
  assert got["layers.0.mlp.down"].sharding.spec == P(None, "data", "tensor", "fsdp")
  want_values = _flat(single)
  for name, arr in got.items():
    np.testing.assert_array_equal(np.asarray(arr), want_values[name], err_msg=name)


def test_fused_experts_import(tmp_path):
  """transformers 5's own fused layout (save_original_format=False: gate_up_proj
  [E, 2F, D], down_proj [E, D, F]) imports to the values of the hub layout, also
  expert-sharded."""
  for name in ("qwen3_moe", "mixtral"):
    ref = _saved(name, tmp_path / name)
    ref.save_pretrained(tmp_path / f"{name}_fused", save_original_format=False)
    from safetensors import safe_open
    with safe_open(str(tmp_path / f"{name}_fused" / "model.safetensors"), "numpy") as f:
      assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    hub, _ = hf.from_pretrained(str(tmp_path / name))
    a = _flat(hub)
    for kw in ({}, {"mesh": sharding.make_mesh((2, 2, 2)), "rules": _EXPERT_RULES}):
      fused, _ = hf.from_pretrained(str(tmp_path / f"{name}_fused"), **kw)
      b = _flat(fused)
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")


def test_lora_on_attention_trains_and_exports_merged(tmp_path):
  """LoRA on q/k/v/o over an imported Qwen3-MoE: one gradient step moves the
  adapters; the merged export loads in transformers with our LoRA forward's logits."""
  ref = _saved("qwen3_moe", tmp_path / "hf")
  model, config = hf.from_pretrained(str(tmp_path / "hf"))
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o"))
  model = lora.add_adapters(model, lcfg, seed=0)
  graphdef, params, frozen = state_lib.split_model(model)
  tokens, mask = _batch(config.vocab_size)

  def loss(params):   # next-token NLL of the real tokens
    m = nnx.merge(graphdef, params, frozen)
    logp = jax.nn.log_softmax(m.logits(m(jnp.asarray(tokens), jnp.asarray(mask))), -1)
    token_logp = jnp.take_along_axis(logp[:, :-1], jnp.asarray(tokens)[:, 1:, None], -1)[..., 0]
    return -(token_logp * mask[:, 1:]).sum() / mask[:, 1:].sum()

  @jax.jit
  def tuned_logits(params):   # after one SGD step on the adapters
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))
    m = nnx.merge(graphdef, params, frozen)
    return params, m.logits(m(jnp.asarray(tokens), jnp.asarray(mask)))

  params, ours = tuned_logits(params)
  ours = np.asarray(ours)

  merged = lora.merge(frozen, params, scale=lcfg.scale)
  out = hf.export(merged, config, str(tmp_path / "out"))
  exported = _load_exported(out)
  diff = _max_diff(_hf_logits(exported, tokens, mask), ours, mask)
  moved = _max_diff(_hf_logits(exported, tokens, mask), _hf_logits(ref, tokens, mask), mask)
  print(f"\nMoE LoRA export: max |logit diff| {diff:.2e}, adapters moved logits by {moved:.2e}")
  assert diff <= 1e-4 and moved > 1e-3


# ---------------------------------------------------------------------------
# config.json


def test_config_round_trip_and_hub_keys():
  for name, (cls, hf_config) in _families().items():
    ours = config_from_hf(hf_config.to_dict() | {"architectures": [cls.__name__]})
    assert infer_architecture(ours) == cls.__name__
    back = config_to_hf(ours, cls.__name__)
    assert config_from_hf(back) == ours, name
  # Qwen/Qwen3-30B-A3B's config.json (the hub spells num_experts).
  qwen = config_from_hf({
      "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
      "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
      "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
      "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
      "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
      "mlp_only_layers": [], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
      "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
      "output_router_logits": False, "tie_word_embeddings": False,
      "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48})
  assert (qwen.n_experts, qwen.experts_per_token, qwen.moe_d_ff, qwen.d_ff) == (
      128, 8, 768, 6144)
  assert qwen.moe_norm_topk and qwen.qk_norm
  assert qwen.router_aux_loss_coef == 0.0   # TRL: only with output_router_logits
  # The published sizes: 30.5B parameters, 3.3B active.
  assert (round(qwen.num_params() / 1e9, 2), round(qwen.num_active_params() / 1e9, 2)) == (
      30.53, 3.35)
  # mistralai/Mixtral-8x7B-v0.1's config.json: 46.7B parameters, 12.9B active.
  big = config_from_hf({
      "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
      "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
      "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
      "rope_theta": 1e6, "sliding_window": None, "router_aux_loss_coef": 0.02,
      "output_router_logits": False, "tie_word_embeddings": False})
  assert (big.n_experts, big.experts_per_token, big.d_ff, big.moe_d_ff) == (8, 2, 14336, None)
  assert big.sliding_window is None and big.router_aux_loss_coef == 0.0
  assert (round(big.num_params() / 1e9, 2), round(big.num_active_params() / 1e9, 2)) == (
      46.70, 12.88)
  _, hf_config = _families()["mixtral"]
  mixtral = config_from_hf(hf_config.to_dict() | {
      "architectures": ["MixtralForCausalLM"], "output_router_logits": True,
      "router_aux_loss_coef": 0.02})
  assert mixtral.router_aux_loss_coef == 0.02 and mixtral.sliding_window == 4
  assert mixtral.moe_norm_topk and mixtral.moe_d_ff is None and mixtral.d_ff == 16


@pytest.mark.parametrize("change,match", [
    ({"decoder_sparse_step": 2}, r"dense MLP layers \[0\]"),
    ({"mlp_only_layers": [1]}, r"dense MLP layers \[1\]"),
    ({"num_experts_per_tok": 5}, r"num_experts_per_tok=5"),
    ({"use_sliding_window": True}, "use_sliding_window"),
])
def test_qwen3_moe_refuses_what_the_transformer_lacks(change, match):
  cls, hf_config = _families()["qwen3_moe"]
  with pytest.raises(ValueError, match=f"Qwen3MoeForCausalLM: .*{match}"):
    config_from_hf(hf_config.to_dict() | {"architectures": [cls.__name__]} | change)


def test_export_refuses_what_the_family_cannot_express():
  cls, hf_config = _families()["mixtral"]
  mixtral = config_from_hf(hf_config.to_dict() | {"architectures": [cls.__name__]})
  with pytest.raises(ValueError, match="router_jitter_noise=0.1"):
    config_from_hf(hf_config.to_dict() | {"architectures": [cls.__name__],
                                          "router_jitter_noise": 0.1})
  with pytest.raises(ValueError, match="MixtralForCausalLM cannot express "
                                       "ModelConfig.moe_norm_topk=False"):
    config_to_hf(dataclasses.replace(mixtral, moe_norm_topk=False), "MixtralForCausalLM")
  with pytest.raises(ValueError, match=r"MistralForCausalLM cannot express "
                                       r"ModelConfig.n_experts=4.*try MixtralForCausalLM"):
    config_to_hf(mixtral, "MistralForCausalLM")
  # No family has both: the shapes still come (the closest MoE family's names).
  biased = dataclasses.replace(mixtral, qkv_bias=True, sliding_window=None)
  assert hf.param_shapes(biased)[("layers", 0, "mlp", "gate")] == (2, 4, 32, 16)
  with pytest.raises(ValueError, match="MixtralForCausalLM cannot express ModelConfig.qkv_bias"):
    config_to_hf(biased, "MixtralForCausalLM")
  dense = dataclasses.replace(mixtral, n_experts=0)
  assert infer_architecture(dense) == "MistralForCausalLM"   # the window stays
  with pytest.raises(ValueError, match="MixtralForCausalLM cannot express "
                                       "ModelConfig.n_experts=0"):
    config_to_hf(dense, "MixtralForCausalLM")
