"""Export merging one tensor at a time (models/merged.py through hf.export): the files
equal the whole-model merge's (dequantize_state + lora.merge + hf.export, today's
reference path) bit for bit, on one device and on an FSDP mesh of 8, and no array the
export creates is bigger than one layer's slice of a stacked weight.

The model: 2 scanned Llama layers, d_model 512 so that FSDP over 8 devices leaves each
device one whole quantization block of 64 along d_model (the 70B recipe's layout)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding
from jaxalign.models import hf, lora, merged, quant
from jaxalign.models.transformer import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=512, n_layers=2, n_heads=2, n_kv_heads=1,
                  head_dim=64, d_ff=128, max_seq_len=16, scan_layers=True)
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "up", "down"))


@functools.cache
def _base_and_adapters(fmt: str):
  """(base as stored, adapters with random B) built sharded over FSDP 8 by the default rules."""
  mesh = sharding.make_mesh((1, 8, 1))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
    model = lora.add_adapters(lora.base_model(CFG, seed=0, base_dtype=fmt), LORA, seed=0)
  _, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  adapters = jax.tree.map(   # B starts at zero: give every adapter a delta
      lambda x: jax.device_put(x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
                               x.sharding), adapters)
  return base, adapters


def _weights_file(out_dir: str) -> bytes:
  with open(os.path.join(out_dir, "model.safetensors"), "rb") as f:
    return f.read()


@pytest.mark.parametrize("fmt", ["none", "int8", "nf4"])
def test_per_tensor_export_on_fsdp_8_equals_the_whole_model_merge_on_one_device(
    fmt, tmp_path):
  base, adapters = _base_and_adapters(fmt)
  if fmt != "none":
    codes = [v.get_value() for p, v in nnx.to_flat_state(base) if p[-1] == "codes"]
    assert len(codes) == 7 and all("fsdp" in c.sharding.spec for c in codes)
  one = jax.devices()[0]
  base1, adapters1 = jax.device_put(base, one), jax.device_put(adapters, one)

  # The reference, on one device: the whole float base, every adapter merged at once.
  whole = base1 if fmt == "none" else jax.jit(quant.dequantize_state, static_argnums=1)(
      base1, jnp.float32)
  whole = jax.jit(functools.partial(lora.merge, scale=LORA.scale))(whole, adapters1)
  want = hf.export(whole, CFG, str(tmp_path / "whole"))
  got = hf.export(base, CFG, str(tmp_path / "fsdp8"), adapters=adapters,
                  lora_scale=LORA.scale)
  assert _weights_file(got) == _weights_file(want), "not bit-equal to the whole merge"

  if fmt == "int8":   # nf4 and float LoRA: loaded by transformers in test_qlora / test_lora
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, info = transformers.AutoModelForCausalLM.from_pretrained(
        got, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info


def test_export_merges_one_layer_slice_at_a_time(tmp_path, monkeypatch):
  """NF4 base + adapters on one device, 2 stacked layers: every merge the export runs
  outputs one layer's slice of a stacked weight, never the stacked [L, ...] float weight
  (its compiled temporaries a few slices at most), and no array alive during the export
  that was not alive before it is bigger than that slice."""
  base, adapters = jax.device_put(_base_and_adapters("nf4"), jax.devices()[0])
  before = jax.live_arrays()   # held: their ids stay theirs
  seen = {id(a) for a in before}
  largest, merges = [], []
  host_value, slice_fn = hf._host_value, merged.Weight.slice_fn

  def recording_fetch(x):
    largest.append(max((a.nbytes for a in jax.live_arrays() if id(a) not in seen), default=0))
    return host_value(x)

  def recording_merge(weight, entry_ndim):
    fn = slice_fn(weight, entry_ndim)
    def run(arrays, index):
      merges.append((weight.shape, jax.eval_shape(fn, arrays, index).shape))
      return fn(arrays, index)
    return run
  monkeypatch.setattr(hf, "_host_value", recording_fetch)
  monkeypatch.setattr(merged.Weight, "slice_fn", recording_merge)
  hf.export(base, CFG, str(tmp_path / "out"), adapters=adapters, lora_scale=LORA.scale)
  monkeypatch.undo()

  written = hf.read_header(str(tmp_path / "out" / "model.safetensors"))
  assert len(largest) == len(written)   # one fetch per HF tensor
  assert len(merges) == 7 * CFG.n_layers   # each projection, layer by layer
  assert all(shape[0] == CFG.n_layers and out == shape[1:] for shape, out in merges), merges
  params = merged.weights(base, adapters, scale=LORA.scale, dtype=CFG.param_dtype)
  up = params[("layers", 0, "mlp", "up")]       # [L, D, F] NF4 + adapter, the biggest
  slice_bytes = np.prod(up.shape[1:]) * 4       # one layer's float32 [D, F]
  assert max(largest) <= slice_bytes, (max(largest), slice_bytes)
  memory = up.slice_fn(1).lower(up.arrays, jnp.asarray((1,), jnp.int32)).compile(
      ).memory_analysis()
  assert memory.output_size_in_bytes == slice_bytes
  assert memory.temp_size_in_bytes <= 3 * slice_bytes, memory
