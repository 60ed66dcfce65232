"""Llama-3.1-70B DPO with LoRA over an NF4 base (QLoRA), meant for a TPU v5e-8 slice
(8 chips, 2x4, 16 GiB HBM each: 128 GiB in all, where the bf16 base alone is 141 GB).

Shapes: Llama-3.1-70B as configs/llama3_70b_dpo.py (70.6B parameters). The frozen
base's projections are stored NF4 (lora.base_dtype="nf4": 4-bit NormalFloat codes,
one float32 absmax per 64 entries along each weight's input axis, 0.5625 bytes per
weight: ~38 GB for the 68.5B projection weights) and dequantized layer by layer inside
the matmuls; embeddings, head and norms are frozen bfloat16 (the compute dtype they are
cast to anyway). Adapters: rank 16 on all seven projections, float32 with float32
AdamW state (lora.param_dtype). bf16 compute, rematerialization per block, nested in 16
stages of 5 layers (model.remat_stages).
Batch: 4 pairs x 2 sequences x 4096 tokens per micro-batch (one sequence per chip), 8
micro-batches accumulated: 32 pairs per optimizer step. Mesh (1, 8, 1): FSDP over the
8 chips. The reference is the quantized base with the adapters off (computed in the
step: no second copy of the model).

Fits, thinly: planned (fit-only, libtpu 0.0.42) at 6.57 GiB of arguments + 9.24 GiB of
temporaries per chip of the chip's 16 GiB, with 16 remat stages (10 stages: 9.46 GiB of
temporaries, over; 20: 9.33). The margin is under 0.2 GiB; docs/performance.md, "QLoRA:
a quantized frozen base", has the plans and the levers left for more room.

  # Check that it compiles and fits, on any CPU machine with libtpu installed
  # (an 80-layer step: compiling takes minutes):
  jaxalign plan --config configs/llama3_70b_qlora_dpo.py --topology v5e:2x4
  # Train (the base is quantized on import, device block by device block):
  jaxalign train --config configs/llama3_70b_qlora_dpo.py \\
      --workdir gs://BUCKET/runs/llama3_70b_qlora_dpo \\
      --config.model.hf_path=meta-llama/Llama-3.1-70B-Instruct   # or a local HF directory

Data: UltraFeedback binarized preference pairs from the Hugging Face hub.
"""

import ml_collections

from jaxalign import config as config_lib

TOPOLOGY = "v5e:2x4"   # the slice this recipe is sized for (tests plan it)

# meta-llama/Llama-3.1-70B: the 8B preset's vocab, rope and norms, wider and deeper.
LLAMA3_70B = dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                  d_ff=28672)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = config_lib.defaults()
  c.model.preset = "llama3-8b"
  c.model.attention = "splash"
  c.model.overrides = ml_collections.ConfigDict(
      # The frozen float parts (embeddings, head, norms) in bfloat16, the compute dtype
      # they are cast to anyway; the adapters and their AdamW state float32 (below).
      dict(**LLAMA3_70B, dtype="bfloat16", param_dtype="bfloat16", remat=True,
           # 16 checkpointed stages of 5 layers: the backward keeps 16 + 5 layer inputs,
           # not 80 (one scan's 80 x 4096 x 8192 bf16 inputs per sequence: 5 GiB/chip).
           # Planned: 16 stages 9.24 GiB of temporaries, 20 9.33, 10 9.46, 8 9.84.
           remat_stages=16))
  c.mesh.shape = (1, -1, 1)            # FSDP over the slice
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
  c.lora.base_dtype = "nf4"
  c.lora.param_dtype = "float32"       # adapters + AdamW state: lr 5e-6 steps survive
  c.data.train_path = "HuggingFaceH4/ultrafeedback_binarized"
  c.data.split = "train_prefs"
  c.data.tokenizer = "meta-llama/Llama-3.1-70B-Instruct"
  c.data.max_length = 4096
  c.data.max_prompt_length = 2048
  c.data.batch_size = 32               # pairs per optimizer step (global)
  c.optim.grad_accum_steps = 8         # 4 pairs per micro-batch: one sequence per chip
  c.loss.name = "dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0))
  c.reference.mode = "frozen"          # LoRA: the base with adapters off
  c.optim.lr = 5e-6
  c.optim.warmup_steps = 20
  c.total_steps = 1900                 # ~1 epoch of 61k pairs at 32 per step
  c.log_every = 10
  c.checkpoint.every = 100
  return c
