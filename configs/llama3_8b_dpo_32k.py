"""Llama-3.1-8B DPO at sequence length 32768 on a TPU v5p-64 slice (64 chips, 4x4x4).

The 8k recipe (configs/llama3_8b_dpo_8k.py: the 8B shapes, data, optimizer,
precomputed reference, splash attention, remat "minimal") at 32768-token
sequences (prompts up to 16384) with context parallelism: mesh (1, 16, 4, 1)
splits every sequence over 4 chips (jaxalign/models/context.py: all-gather K/V
in the load-balanced causal order) and the 16 pairs of a step over 16 FSDP
shards, so each chip holds 2 x 8192 tokens, what a chip of the 8k recipe holds.
Planned figures and the alternatives tried: docs/performance.md "Long context".

  jaxalign plan --config configs/llama3_8b_dpo_32k.py --topology v5p:4x4x4
  jaxalign train --config configs/llama3_8b_dpo_32k.py --workdir gs://BUCKET/runs/dpo_32k \\
      --config.model.hf_path=meta-llama/Llama-3.1-8B-Instruct
"""

import importlib.util
import pathlib

import ml_collections

TOPOLOGY = "v5p:4x4x4"   # the slice this recipe is sized for (tests plan it)
CONTEXT = 4              # chips per sequence
REMAT = "minimal"        # saves the projections and MLP outputs of each block


def _recipe(name: str):
  path = pathlib.Path(__file__).resolve().with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = _recipe("llama3_8b_dpo_8k").get_config(arg)
  c.data.max_length = 32768
  c.data.max_prompt_length = 16384
  c.data.batch_size = 16               # pairs per step: one per FSDP shard
  c.mesh.shape = (1, -1, CONTEXT, 1)   # (data, fsdp, context, tensor)
  over = c.model.overrides.to_dict()
  over["remat"] = REMAT
  c.model.overrides = ml_collections.ConfigDict(over)
  return c
