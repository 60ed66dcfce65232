"""QLoRA end to end on a tiny Llama saved by transformers: the import quantizes per
device block exactly as quantizing the float import does, a run resumes bit for bit
(the quantized base is rebuilt from the source, never checkpointed), and the export
merges the adapters into the dequantized weights, which transformers loads, one
projection at a time (never the whole merged model on the devices)."""
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxalign import config as config_lib
from jaxalign import sharding
from jaxalign.models import hf, quant
from jaxalign.train import build as build_lib, rundir
from tests.train.helpers import read_metrics, tiny_config, train_loop

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random 1-layer Llama (d_model, head_dim, d_ff multiples of the NF4 block)."""
  from jaxalign.data import toy
  path = str(tmp_path_factory.mktemp("hf"))
  config = transformers.LlamaConfig(
      vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(path)
  toy.build_tokenizer().save_pretrained(path)
  return path


def _config(hf_dir, fmt="nf4", **overrides):
  c = tiny_config("dpo", **{"lora.rank": 4, "lora.alpha": 8.0, "lora.base_dtype": fmt,
                            "lora.targets": ("q", "v", "down"), "reference.mode": "frozen",
                            "optim.lr": 1e-2, "total_steps": 2, "optim.warmup_steps": 1, "checkpoint.every": 1,
                            **overrides})
  c.model.overrides = ml_collections.ConfigDict()   # everything from config.json
  c.model.hf_path = hf_dir
  c.data.tokenizer = ""
  return c


def test_import_quantizes_each_device_block_as_quantizing_the_float_import(hf_dir):
  """Mesh (4, 1, 2): "tensor" splits down's block axis, d_ff (2 blocks), so each device
  quantizes its own block of the HF tensor on the host (NF4; int8 takes the same path,
  its host and device codes agree in tests/models/test_quant.py)."""
  _check_quantized_import(hf_dir, "nf4")


def _check_quantized_import(hf_dir, fmt, **overrides):
  """Imports `hf_dir` on mesh (4, 1, 2) with base_dtype `fmt` and as floats: the codes
  and scales equal quantizing the float import, shard as its weights do, and every
  other parameter (router, norms, embeddings, head) is the float one. Returns the
  quantized import's flat state."""
  def base(fmt):
    built = build_lib.build_config(_config(hf_dir, fmt, **{"mesh.shape": (4, 1, 2),
                                                           **overrides}))
    with jax.set_mesh(built.mesh):
      return rundir.starting_params(built.abstract_state.frozen, init_from="",
                                    hf_dir=hf_dir, model_cfg=built.run_spec.model_cfg)
  quantized = dict(nnx.to_flat_state(base(fmt)))
  floats = dict(nnx.to_flat_state(base("")))
  projections = [p for p in floats if p[-1] in quant.PROJECTIONS]
  assert len(projections) == 7 and len(quantized) == len(floats) + len(projections)
  for path, leaf in floats.items():
    w = leaf.get_value()
    if path[-1] not in quant.PROJECTIONS:
      np.testing.assert_array_equal(quantized[path].get_value(), w)
      continue
    codes = quantized[path + ("codes",)].get_value()
    scale = quantized[path + ("scale",)].get_value()
    assert codes.sharding.spec == scale.sharding.spec == w.sharding.spec, path
    want = jax.jit(lambda a: quant.quantize(a, fmt, axis=quant.BLOCK_AXIS[path[-1]]))(w)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(want[0]), err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(want[1]), err_msg=str(path))
  return quantized


def _float_weights_alive_during(fn, monkeypatch, *, size: int) -> list[int]:
  """fn(); at each tensor the export fetches to the host, the number of floating-point
  jax arrays of at least `size` entries alive that were not alive before fn() (those
  are held meanwhile, so their ids stay theirs)."""
  before = jax.live_arrays()
  seen = {id(a) for a in before}
  alive = []
  host_value = hf._host_value

  def recording(x):
    alive.append(sum(1 for a in jax.live_arrays() if id(a) not in seen and a.size >= size
                     and jnp.issubdtype(a.dtype, jnp.floating)))
    return host_value(x)
  monkeypatch.setattr(hf, "_host_value", recording)
  fn()
  monkeypatch.undo()
  return alive


def test_qlora_run_resumes_bit_identically_and_exports_merged_float_weights(
    hf_dir, tmp_path, monkeypatch):
  one = jax.devices()[:1]
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = _config(hf_dir)
  train_loop(config, straight, progress=False, devices=one)
  train_loop(config, resumed, progress=False, devices=one, stop_after=1)
  train_loop(config, resumed, progress=False, devices=one)
  a, b = read_metrics(straight), read_metrics(resumed)
  assert [m["step"] for m in b] == [1, 2]
  for x, y in zip(a, b):
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
      assert x[key] == y[key], (key, x, y)
  assert all(m["grad_norm"] > 0 for m in a)

  mesh = sharding.make_mesh((1, 1, 1), one)
  out = str(tmp_path / "out")
  # The export merges one tensor at a time: of the 7 float projection weights (64 x 128
  # entries each, the biggest tensors here) one at most is on the devices at once, where
  # the whole-model merge (load_run_params) held all 7 merged ones during the export.
  shapes = hf.param_shapes(config_lib.model_config(config))
  projection = min(math.prod(s) for p, s in shapes.items() if p[-1] in quant.PROJECTIONS)
  alive = _float_weights_alive_during(
      lambda: rundir.export_checkpoint(straight, out, mesh=mesh), monkeypatch, size=projection)
  assert len(alive) == len(shapes) and max(alive) == 1, alive
  exported, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
  assert not any(info.values()), info
  graphdef, merged, frozen = rundir.load_run_params(straight, config, mesh)
  ours = nnx.merge(graphdef, merged, frozen)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 48, size=(2, 10)).astype(np.int32)
  mask = np.ones_like(tokens)
  want = np.asarray(ours.logits(ours(jnp.asarray(tokens), jnp.asarray(mask))))
  with torch.no_grad():
    got = exported.eval()(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)

  # k is not adapted: exported, it is the NF4-dequantized original, within NF4's bound.
  original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  w = original.model.layers[0].self_attn.k_proj.weight.detach().numpy()   # [KV*Dh, D]
  k = exported.model.layers[0].self_attn.k_proj.weight.detach().numpy()
  ours_w = np.asarray(quant.dequantize(*quant.quantize(w, "nf4", xp=np), "nf4"))
  np.testing.assert_array_equal(k, ours_w)     # blocks along the input axis: HF's rows
  assert 0 < np.abs(k - w).max() <= np.abs(w).max() * 0.139
  # q is adapted: the export is dequantized base + scale * A @ B, not the base.
  q0 = original.model.layers[0].self_attn.q_proj.weight.detach().numpy()
  q = exported.model.layers[0].self_attn.q_proj.weight.detach().numpy()
  q_base = np.asarray(quant.dequantize(*quant.quantize(q0, "nf4", xp=np), "nf4"))
  assert np.abs(q - q_base).max() > 1e-4
  assert os.path.exists(os.path.join(out, "config.json"))


# --------------------------------------------------------------------------------------
# Mixture-of-experts bases: the routed experts quantized too.


def _moe_hf(name):
  """A random 1-layer Qwen3-MoE or Mixtral, 4 experts, top 2; d_model, head_dim and the
  experts' hidden size multiples of the NF4 block. Every tensor random (transformers
  inits the router to 0: ties in the top-k choice), the router at scale 1."""
  t = transformers
  common = dict(vocab_size=48, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
                rms_norm_eps=1e-6, num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  if name == "qwen3_moe":
    cls, config = t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(
        **common, intermediate_size=128, moe_intermediate_size=128, num_experts=4)
  else:
    cls, config = t.MixtralForCausalLM, t.MixtralConfig(
        **common, intermediate_size=128, num_local_experts=4)
  model = cls(config)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      p.copy_(1.0 + 0.1 * noise if "norm" in pname
              else (1.0 if pname.endswith("gate.weight") else 0.1) * noise)
  return model


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "mixtral_fused"])
def moe_hf_dir(request, tmp_path_factory):
  """The hub's per-expert tensors, or (fused) transformers 5's own gate_up_proj [E, 2F, D]
  and down_proj [E, D, F]."""
  from jaxalign.data import toy
  path = str(tmp_path_factory.mktemp(request.param))
  name, _, fused = request.param.partition("_")
  _moe_hf(name).save_pretrained(path, save_original_format=not fused)
  toy.build_tokenizer().save_pretrained(path)
  return path


def test_moe_import_quantizes_each_device_block_of_the_experts(moe_hf_dir):
  """Mesh (4, 1, 2): the 4 experts over "data", the experts' hidden size (down's block
  axis, 2 blocks) over "tensor": each device reads and quantizes only its own experts'
  block of the HF tensors; codes and scales equal quantizing the float import; the
  router, norms and embeddings stay float."""
  quantized = _check_quantized_import(moe_hf_dir, "nf4", **{"lora.targets": ("q", "v")})
  assert quantized[("layers", 0, "mlp", "router")].get_value().shape[-1] == 4   # 4 experts
  down = quantized[("layers", 0, "mlp", "down", "codes")].get_value()   # [E, F/2, D]
  assert down.shape[-3:] == (4, 64, 64)
  assert tuple(down.sharding.spec)[-3:-1] == ("data", "tensor")


def test_moe_qlora_run_exports_merged_weights_transformers_loads(tmp_path):
  """A one-step LoRA run over an NF4 Qwen3-MoE base exports the dequantized experts and
  merged attention; transformers' logits on the export equal our merged model's, and an
  expert's exported weight is the NF4-dequantized original."""
  from jaxalign.data import toy
  hf_dir = str(tmp_path / "hf")
  original = _moe_hf("qwen3_moe")
  original.save_pretrained(hf_dir)
  toy.build_tokenizer().save_pretrained(hf_dir)
  one = jax.devices()[:1]
  run = str(tmp_path / "run")
  config = _config(hf_dir, **{"lora.targets": ("q", "o"), "total_steps": 1})
  train_loop(config, run, progress=False, devices=one)
  mesh = sharding.make_mesh((1, 1, 1), one)
  out = rundir.export_checkpoint(run, str(tmp_path / "out"), mesh=mesh)
  exported, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
  assert not any(info.values()), info
  assert type(exported).__name__ == "Qwen3MoeForCausalLM"
  graphdef, merged, frozen = rundir.load_run_params(run, config, mesh)
  ours = nnx.merge(graphdef, merged, frozen)
  tokens = np.random.default_rng(0).integers(1, 48, size=(2, 10)).astype(np.int32)
  want = np.asarray(ours.logits(ours(jnp.asarray(tokens), jnp.asarray(np.ones_like(tokens)))))
  with torch.no_grad():
    got = exported.eval()(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  # Expert 2's down_proj [D, F]: blocks along F (its input axis, HF's rows).
  w = original.model.layers[0].mlp.experts.down_proj[2].detach().numpy()
  e = exported.model.layers[0].mlp.experts.down_proj[2].detach().numpy()
  np.testing.assert_array_equal(e, np.asarray(quant.dequantize(*quant.quantize(w, "nf4", xp=np),
                                                              "nf4")))
  assert 0 < np.abs(e - w).max()
  np.testing.assert_array_equal(exported.model.layers[0].mlp.gate.weight.detach().numpy(),
                                original.model.layers[0].mlp.gate.weight.detach().numpy())
