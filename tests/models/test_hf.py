"""HF interop: import/export logits against transformers, sharded import, round trips, errors.

Reference logits come from transformers' own PyTorch models (float32, eager
attention) built tiny and random here; nothing is downloaded.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import sharding
from jaxalign.sharding import DEFAULT_RULES
from jaxalign.models import hf
from jaxalign.models.hf_config import config_from_hf, config_to_hf, infer_architecture
from jaxalign.train import rundir
from jaxalign.data import reading
from tests.data.reference import list_examples
from tests.train.helpers import train_loop

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T = 3, 10
TOL = 1e-4
_COMMON = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               max_position_embeddings=64, rms_norm_eps=1e-6)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_GEMMA = dict(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=12,
              attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"], pad_token_id=0)


def _families():
  """name -> (model class, config). Sliding windows of 4 < T exercise the window mask."""
  t = transformers
  llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}
  return {
      "llama": (t.LlamaForCausalLM, t.LlamaConfig(**_COMMON, rope_parameters=_ROPE)),
      "llama3_rope_scaling": (t.LlamaForCausalLM,
                              t.LlamaConfig(**_COMMON, rope_parameters=llama3)),
      "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(**_COMMON, rope_parameters=_ROPE)),
      "qwen3": (t.Qwen3ForCausalLM, t.Qwen3Config(**_COMMON, rope_parameters=_ROPE)),
      "mistral": (t.MistralForCausalLM,
                  t.MistralConfig(**_COMMON, rope_parameters=_ROPE, sliding_window=4)),
      "gemma2": (t.Gemma2ForCausalLM,
                 t.Gemma2Config(**_COMMON, **_GEMMA, rope_parameters=_ROPE)),
      "gemma3": (t.Gemma3ForCausalLM, t.Gemma3TextConfig(
          **_COMMON, **_GEMMA, rope_parameters={"sliding_attention": _ROPE,
                                                "full_attention": _ROPE})),
      # As released Gemma3 (4B+): local layers 10k unscaled, global 1M scaled linearly.
      "gemma3_local_rope": (t.Gemma3ForCausalLM, t.Gemma3TextConfig(
          **_COMMON, **_GEMMA, rope_parameters={
              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "linear", "factor": 8.0,
                                 "rope_theta": 1000000.0}})),
  }


def _hf_model(name):
  cls, config = _families()[name]
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = cls(config).eval()
  # HF inits norms to 1 (Gemma: 0) and biases to 0; random values test every tensor.
  g = torch.Generator().manual_seed(1)
  is_gemma = "gemma" in name
  with torch.no_grad():
    for pname, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      base = (0.0 if is_gemma else 1.0) if "norm" in pname else 0.0
      p.copy_(base + 0.1 * noise)
  return model


def _batch(vocab):
  """Row 0 full, row 1 right-padded, row 2 left-padded; pad id 0."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, size=(B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, 7:] = 0
  mask[2, :6] = 0
  return tokens * mask, mask


def _hf_logits(model, tokens, mask):
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()


def _our_logits(model, tokens, mask):
  return np.asarray(model.logits(model(jnp.asarray(tokens), jnp.asarray(mask))))


def _max_diff(a, b, mask):
  real = mask.astype(bool)
  assert np.isfinite(a[real]).all() and np.isfinite(b[real]).all()
  return float(np.abs(a[real] - b[real]).max())


def _load_exported(path):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      path, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
  assert not any(info.values()), info  # missing / unexpected / mismatched / errors
  return model.eval()


def _flat(model):
  return {".".join(map(str, k)): np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", list(_families()))
def test_import_export_matches_transformers(name, tmp_path):
  ref = _hf_model(name)
  # llama also goes through sharded files (index.json) on both sides.
  sharded = name == "llama"
  ref.save_pretrained(tmp_path / "hf", max_shard_size="8KB" if sharded else "1GB")
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json") == sharded

  model, config = hf.from_pretrained(str(tmp_path / "hf"))
  tokens, mask = _batch(config.vocab_size)
  ours = _our_logits(model, tokens, mask)
  import_diff = _max_diff(ours, _hf_logits(ref, tokens, mask), mask)

  out = hf.export(model, config, str(tmp_path / "out"),
                  architecture=type(ref).__name__,
                  max_shard_bytes=10_000 if sharded else hf.DEFAULT_MAX_SHARD_BYTES)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json")) == sharded
  export_diff = _max_diff(_hf_logits(_load_exported(out), tokens, mask), ours, mask)
  print(f"\n{name}: max |logit diff| import {import_diff:.2e}, export {export_diff:.2e}")
  assert import_diff <= TOL and export_diff <= TOL

  # Export -> import is bit-exact.
  again, config2 = hf.from_pretrained(out)
  assert config2 == config
  a, b = _flat(model), _flat(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


EXPECTED_SPECS = {  # DEFAULT_RULES on a ("data", "fsdp", "tensor") mesh; layers scanned
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
# Splits head_dim instead of heads: each device then needs part of every HF row group.
HEAD_DIM_RULES = tuple((n, "tensor" if n == "head_dim" else None if n in ("heads", "kv_heads")
                        else t) for n, t in DEFAULT_RULES)


@pytest.mark.parametrize("rules", [DEFAULT_RULES, HEAD_DIM_RULES], ids=["default", "head_dim"])
def test_sharded_import(rules, tmp_path):
  _hf_model("qwen2").save_pretrained(tmp_path / "hf")
  single, config = hf.from_pretrained(str(tmp_path / "hf"))
  mesh = sharding.make_mesh((2, 2, 2))
  model, _ = hf.from_pretrained(str(tmp_path / "hf"), mesh=mesh, rules=rules)
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  want = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(specs)}
  got = {".".join(map(str, k)): v.get_value()
         for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for name, arr in got.items():
    assert arr.sharding.mesh == mesh and arr.sharding.spec == want[name], name
  if rules is DEFAULT_RULES:
    for name, spec in EXPECTED_SPECS.items():
      assert got[name].sharding.spec == spec, name
  else:
    assert got["layers.0.attn.q"].sharding.spec == P(None, "fsdp", None, "tensor")
  want_values = _flat(single)
  for name, arr in got.items():
    np.testing.assert_array_equal(np.asarray(arr), want_values[name], err_msg=name)
  tokens, mask = _batch(config.vocab_size)
  np.testing.assert_allclose(_our_logits(model, tokens, mask),
                             _our_logits(single, tokens, mask), atol=1e-5)


def test_config_round_trip():
  for name, (cls, hf_config) in _families().items():
    ours = config_from_hf(hf_config.to_dict() | {"architectures": [cls.__name__]})
    assert infer_architecture(ours) == cls.__name__
    back = config_to_hf(ours, cls.__name__)
    assert config_from_hf(back) == ours, name


def test_legacy_config_keys():
  """Released config.json files carry rope_theta / rope_scaling, not rope_parameters."""
  cfg = config_from_hf({
      "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
      "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
      "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
      "rope_theta": 500000.0, "rope_scaling": {
          "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_type": "llama3"}})
  from jaxalign.models.transformer import preset
  assert cfg == preset("llama3-8b")
  gemma3 = config_from_hf(  # google/gemma-3-4b-it's text config keys
      transformers.Gemma3TextConfig(**_COMMON, **_GEMMA).to_dict()
      | {"architectures": ["Gemma3ForCausalLM"], "rope_parameters": None,
         "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
         "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
  assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.rope_scaling) == (
      1000000.0, 10000.0, {"rope_type": "linear", "factor": 8.0})


def test_unsupported_architecture_and_features(tmp_path):
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
  gemma3 = transformers.Gemma3TextConfig(**_COMMON).to_dict()
  gemma3["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0,
                                                    "rope_theta": 1e4}
  with pytest.raises(ValueError, match="Gemma3ForCausalLM: unsupported: a scaled rope"):
    config_from_hf(gemma3 | {"architectures": ["Gemma3ForCausalLM"]})
  with pytest.raises(ValueError, match="unsupported: rope_type='yarn'"):
    config_from_hf(transformers.Qwen2Config(**_COMMON).to_dict() | {
        "architectures": ["Qwen2ForCausalLM"],
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
  config = config_from_hf(transformers.Qwen2Config(**_COMMON).to_dict()
                          | {"architectures": ["Qwen2ForCausalLM"]})
  with pytest.raises(ValueError, match="LlamaForCausalLM cannot express ModelConfig.qkv_bias"):
    config_to_hf(config, "LlamaForCausalLM")


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  _hf_model("llama").save_pretrained(tmp_path / "hf")
  weights = load_file(tmp_path / "hf" / "model.safetensors")
  name = "model.layers.1.self_attn.k_proj.weight"

  bad = dict(weights, **{name: np.zeros((8, 32), np.float32)})
  save_file(bad, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=rf"{name}.*shape \(8, 32\).*\(16, 32\)"):
    hf.from_pretrained(str(tmp_path / "hf"))

  save_file({k: v for k, v in weights.items() if k != name},
            tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
    hf.from_pretrained(str(tmp_path / "hf"))

  save_file(dict(weights, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}),
            tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match="o_proj.bias"):
    hf.from_pretrained(str(tmp_path / "hf"))


def test_export_trained_checkpoint(tmp_path):
  """A briefly trained run exports to transformers with matching logits and
  re-imports bit-exactly (bf16 export also loads)."""
  from tests.train.helpers import tiny_config, train_loop

  run = str(tmp_path / "run")
  config = tiny_config("sft", total_steps=2, log_every=1, **{"checkpoint.every": 2})
  train_loop(config, run, progress=False)
  out = rundir.export_checkpoint(run, str(tmp_path / "out"))
  assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
  assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [
      "LlamaForCausalLM"]

  graphdef, params, frozen = rundir.load_run_params(run, config)
  trained = nnx.merge(graphdef, params, frozen)
  tokens, mask = _batch(trained.config.vocab_size)
  ours = _our_logits(trained, tokens, mask)
  diff = _max_diff(_hf_logits(_load_exported(out), tokens, mask), ours, mask)
  print(f"\ntrained llama: max |logit diff| export {diff:.2e}")
  assert diff <= TOL

  again, _ = hf.from_pretrained(out, scan_layers=trained.config.scan_layers)   # the run's layout
  want = {".".join(map(str, k)): np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(params)}
  got = _flat(again)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert hf.load_tokenizer(out).get_vocab() == hf.load_tokenizer(
      os.path.join(run, "tokenizer")).get_vocab()

  bf16 = hf.export(again, again.config, str(tmp_path / "bf16"), dtype="bfloat16")
  model = _load_exported(bf16)
  assert model.lm_head.weight.dtype == torch.float32  # loaded as asked, from bf16 files
  reloaded, _ = hf.from_pretrained(bf16)
  np.testing.assert_array_equal(
      _flat(reloaded)["lm_head"],
      np.asarray(jnp.asarray(got["lm_head"]).astype(jnp.bfloat16).astype(jnp.float32)))


def test_train_from_hf_path(tmp_path):
  """`model.hf_path` gives the run its architecture, weights and tokenizer: the
  reference log-probs the run precomputes from its starting weights equal
  transformers' log-probs of the same sequences; a bad path is a config error."""
  import ml_collections

  from jaxalign import config as config_lib
  from jaxalign.data import toy
  from tests.train.helpers import tiny_config

  src = str(tmp_path / "hf")
  model = _hf_model("qwen2")
  model.save_pretrained(src)
  toy.build_tokenizer().save_pretrained(src)
  config = tiny_config("dpo", total_steps=2, **{"checkpoint.every": 2})
  config.model.overrides = ml_collections.ConfigDict()  # everything from config.json
  config.model.hf_path = src
  config.data.tokenizer = ""  # -> the tokenizer saved beside the weights
  run = str(tmp_path / "run")
  train_loop(config, run, progress=False)

  assert rundir.resolved_config(run)["model"]["hf_path"] == src
  tokenizer = reading.load_tokenizer(os.path.join(run, "tokenizer"))
  assert tokenizer.get_vocab() == toy.build_tokenizer().get_vocab()
  examples, _ = list_examples(
      config.data.train_path, "pairwise", tokenizer, split="train",
      max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
      on_error="raise")
  tokens = np.stack([ex["tokens"] for ex in examples])            # [N, 2, T]
  attention = np.stack([ex["attention_mask"] for ex in examples])
  scored = np.stack([ex["loss_mask"] for ex in examples])
  n, s, t = tokens.shape
  logits = _hf_logits(model, tokens.reshape(n * s, t), attention.reshape(n * s, t))
  logp = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
  token_logp = np.take_along_axis(logp[:, :-1], tokens.reshape(n * s, t)[:, 1:, None], -1)[..., 0]
  want = (token_logp * scored.reshape(n * s, t)[:, 1:]).sum(-1).reshape(n, s)
  got = np.load(os.path.join(run, "ref_logps.npy"))
  print(f"\nhf_path run: max |ref logp diff| vs transformers {np.abs(got - want).max():.2e}")
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)

  # Exporting the aligned run gives the same architecture back, loadable by transformers.
  out = rundir.export_checkpoint(run, str(tmp_path / "out"))
  assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [
      "Qwen2ForCausalLM"]
  graphdef, params, frozen = rundir.load_run_params(run, config)
  trained = nnx.merge(graphdef, params, frozen)
  batch, mask = _batch(trained.config.vocab_size)
  assert _max_diff(_hf_logits(_load_exported(out), batch, mask),
                   _our_logits(trained, batch, mask), mask) <= TOL

  # LoRA on the published checkpoint: its weights are the frozen base, and the
  # export merges the trained adapters into them.
  config.lora.rank, config.lora.alpha = 4, 8.0
  config.reference.mode = "frozen"
  lora_run = str(tmp_path / "lora_run")
  train_loop(config, lora_run, progress=False)
  graphdef, merged, frozen = rundir.load_run_params(lora_run, config)
  aligned = nnx.merge(graphdef, merged, frozen)
  out = rundir.export_checkpoint(lora_run, str(tmp_path / "lora_out"))
  exported = _load_exported(out)
  assert _max_diff(_hf_logits(exported, batch, mask), _our_logits(aligned, batch, mask),
                   mask) <= TOL
  assert _max_diff(_hf_logits(exported, batch, mask), _hf_logits(model, batch, mask),
                   mask) > 1e-5  # the adapters did change the model

  config.model.hf_path = str(tmp_path / "missing")
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.hf_path"):
    config_lib.validate(config, 8)


def test_gemma3_period_of_six_with_a_tail_in_both_layouts(tmp_path):
  """7 Gemma3 layers (5 local : 1 global, then 1 local): one scanned group of 6 and
  an unrolled tail; import matches transformers in both layouts, and an unrolled
  export re-imports scanned to the same weights."""
  from jaxalign.models import transformer
  t = transformers
  cfg = t.Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": 7},
                           **{k: v for k, v in _GEMMA.items() if k != "layer_types"},
                           rope_parameters={"sliding_attention": _ROPE,
                                            "full_attention": {"rope_type": "default",
                                                               "rope_theta": 1e6}})
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  ref = t.Gemma3ForCausalLM(cfg).eval()
  with torch.no_grad():
    g = torch.Generator().manual_seed(1)
    for pname, p in ref.named_parameters():
      p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
  ref.save_pretrained(tmp_path / "hf")
  tokens, mask = _batch(48)
  want = _hf_logits(ref, tokens, mask)
  scanned, config = hf.from_pretrained(str(tmp_path / "hf"))
  assert config.scan_groups() == (6, 1, 1)
  unrolled, _ = hf.from_pretrained(str(tmp_path / "hf"), scan_layers=False)
  for model in (scanned, unrolled):
    assert _max_diff(_our_logits(model, tokens, mask), want, mask) <= TOL
  out = hf.export(unrolled, unrolled.config, str(tmp_path / "out"))
  again, _ = hf.from_pretrained(out)
  back = transformer.unstack_layers(config, nnx.to_pure_dict(nnx.state(again, nnx.Param)))
  want_tree = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, back, want_tree)
