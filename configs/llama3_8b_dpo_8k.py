"""Llama-3.1-8B DPO at sequence length 8192 on a TPU v5p-64 slice (64 chips, 4x4x4).

The 8B recipe (configs/llama3_8b_dpo.py: shapes, data, optimizer, mesh, splash
attention, scanned layers) with 8192-token sequences (prompts up to 4096) and
REMAT_8K below; see docs/performance.md for its plan.

  jaxalign plan --config configs/llama3_8b_dpo_8k.py --topology v5p:4x4x4
  jaxalign train --config configs/llama3_8b_dpo_8k.py --workdir gs://BUCKET/runs/llama3_8b_dpo_8k \\
      --config.model.hf_path=meta-llama/Llama-3.1-8B-Instruct
"""

import importlib.util
import pathlib

import ml_collections

TOPOLOGY = "v5p:4x4x4"   # the slice this recipe is sized for (tests plan it)
REMAT_8K = "minimal"     # docs/performance.md: the policy that fits at 8192


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
  over = c.model.overrides.to_dict()
  over["remat"] = REMAT_8K
  c.model.overrides = ml_collections.ConfigDict(over)
  return c
