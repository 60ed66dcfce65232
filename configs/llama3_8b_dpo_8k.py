"""Llama-3.1-8B DPO at sequence length 8192 on a TPU v5p-64 slice (64 chips, 4x4x4).

The 8B recipe (configs/llama3_8b_dpo.py: shapes, data, optimizer, mesh, scanned
layers) with 8192-token sequences (prompts up to 4096), the splash attention
kernel and REMAT_8K below. With the XLA attention it does not fit: 112.9 GiB per
chip of 95 (the [B, heads, T, T] scores); with splash, 49.3 GiB and a predicted
MFU of 69.1% (docs/performance.md).

  jaxalign plan --config configs/llama3_8b_dpo_8k.py --topology v5p:4x4x4
  jaxalign train --config configs/llama3_8b_dpo_8k.py --workdir gs://BUCKET/runs/llama3_8b_dpo_8k \\
      --config.model.hf_path=meta-llama/Llama-3.1-8B-Instruct
"""

import importlib.util
import pathlib

import ml_collections

TOPOLOGY = "v5p:4x4x4"   # the slice this recipe is sized for (tests plan it)
REMAT_8K = "minimal"     # saves the projections and MLP outputs of each block


def _base():
  path = pathlib.Path(__file__).resolve().with_name("llama3_8b_dpo.py")
  spec = importlib.util.spec_from_file_location("llama3_8b_dpo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = _base().get_config(arg)
  c.data.max_length = 8192
  c.data.max_prompt_length = 4096
  c.model.attention = "splash"
  over = c.model.overrides.to_dict()
  over["remat"] = REMAT_8K
  c.model.overrides = ml_collections.ConfigDict(over)
  return c
