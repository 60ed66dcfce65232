"""Llama-3.1-70B DPO at real scale, meant for a TPU v5p-256 slice (256 chips, 8x8x4,
95 GiB HBM each).

Shapes: "llama3-70b", defined here as overrides of the "llama3-8b" preset
(d_model 8192, 80 layers, 64 query / 8 kv heads, d_ff 28672; 70.6B
parameters), bf16 compute with float32 master weights and AdamW state
(16 bytes/parameter: 1.1 TB, 4.4 GB per chip), rematerialization per block.
Batch: 128 pairs x 2 sequences x 4096 tokens = 1,048,576 tokens per step; mesh
(1, 64, 4): FSDP over 64 x 4-way tensor parallelism (heads, MLP, vocab), so a
layer's gathered weights are a quarter of the layer; reference log-probs
precomputed.

  # Check that it compiles and fits, on any CPU machine with libtpu installed
  # (an 80-layer step: compiling takes minutes):
  jaxalign plan --config configs/llama3_70b_dpo.py --topology v5p:8x8x4
  # Train on the slice (every worker runs the same command; see docs/scaling.md):
  jaxalign train --config configs/llama3_70b_dpo.py --workdir gs://BUCKET/runs/llama3_70b_dpo \
      --config.model.hf_path=meta-llama/Llama-3.1-70B-Instruct   # or a local HF directory

Data: UltraFeedback binarized preference pairs from the Hugging Face hub.
"""

import ml_collections

from jaxalign import config as config_lib

TOPOLOGY = "v5p:8x8x4"   # the slice this recipe is sized for (tests plan it)

# meta-llama/Llama-3.1-70B: the 8B preset's vocab, rope and norms, wider and deeper.
LLAMA3_70B = dict(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                  d_ff=28672)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = config_lib.defaults()
  c.model.preset = "llama3-8b"
  # Re-planned at T=4096 with the splash kernel (docs/performance.md): 32.2 GiB per
  # chip, predicted MFU 61.3% (54.4% with the XLA attention at T=2048).
  c.model.attention = "splash"
  c.model.overrides = ml_collections.ConfigDict(
      dict(**LLAMA3_70B, dtype="bfloat16", param_dtype="float32", remat=True))
  c.mesh.shape = (1, -1, 4)            # FSDP x 4-way tensor parallelism
  c.data.train_path = "HuggingFaceH4/ultrafeedback_binarized"
  c.data.split = "train_prefs"
  c.data.tokenizer = "meta-llama/Llama-3.1-70B-Instruct"
  c.data.max_length = 4096
  c.data.max_prompt_length = 2048
  c.data.batch_size = 128              # pairs per step (global)
  c.loss.name = "dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0))
  c.reference.mode = "precompute"
  c.optim.lr = 2e-7
  c.optim.warmup_steps = 20
  c.total_steps = 480                  # ~1 epoch of 61k pairs at 128 per step
  c.log_every = 10
  c.checkpoint.every = 40
  return c
