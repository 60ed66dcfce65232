"""Llama-3.1-8B DPO at sequence length 131072 on a TPU v5p-256 slice (256 chips, 8x8x4).

The 32k recipe (configs/llama3_8b_dpo_32k.py) at 131072-token sequences (prompts
up to 65536; the preset's max_seq_len, Llama 3.1's 128k context) with mesh
(1, 8, 32, 1): every sequence split over 32 chips (context parallelism,
jaxalign/models/context.py) and the 8 pairs of a step over 8 FSDP shards, so
each chip holds 2 x 4096 tokens. (A mesh axis must be a product of the slice's
physical axes, 8x8x4: context 16 is not; context 8 would put 2 x 16384 tokens
on a chip.) Planned figures: docs/performance.md "Long context".

  jaxalign plan --config configs/llama3_8b_dpo_128k.py --topology v5p:8x8x4
  jaxalign train --config configs/llama3_8b_dpo_128k.py --workdir gs://BUCKET/runs/dpo_128k \\
      --config.model.hf_path=meta-llama/Llama-3.1-8B-Instruct
"""

import importlib.util
import pathlib

import ml_collections

TOPOLOGY = "v5p:8x8x4"   # the slice this recipe is sized for (tests plan it)
CONTEXT = 32             # chips per sequence (8 x 4 of the 8x8x4 torus)


def _recipe(name: str):
  path = pathlib.Path(__file__).resolve().with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = _recipe("llama3_8b_dpo_32k").get_config(arg)
  c.data.max_length = 131072
  c.data.max_prompt_length = 65536
  c.data.batch_size = 8                # pairs per step: one per FSDP shard
  c.mesh.shape = (1, -1, CONTEXT, 1)   # (data, fsdp, context, tensor)
  return c
