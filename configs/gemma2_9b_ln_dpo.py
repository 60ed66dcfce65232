"""Gemma-2-9B LN-DPO (length-normalized DPO) at real scale, meant for a TPU
v6e-256 slice (256 chips, 16x16, 32 GiB HBM each).

Shapes: the "gemma2-9b" preset (9.2B parameters, vocab 256000 tied, sliding
window on alternate layers, logit softcaps), bf16 compute with float32 master
weights and AdamW state, rematerialization per block. Batch: 256 pairs x 2
sequences x 2048 tokens = 1,048,576 tokens per step, FSDP over all 256 chips,
reference log-probs precomputed (one pair per chip needs ~18 GiB: more than
a v5e chip's 16 GiB). beta=3.0 per token (LN-DPO's beta is on the
per-token log-ratio; DPO's 0.1 would be far too small, see ln_dpo_loss).

  # Check that it compiles and fits, on any CPU machine with libtpu installed:
  jaxalign plan --config configs/gemma2_9b_ln_dpo.py --topology v6e:16x16
  # Train on the slice (every worker runs the same command; see docs/scaling.md):
  jaxalign train --config configs/gemma2_9b_ln_dpo.py --workdir gs://BUCKET/runs/gemma2_ln_dpo \
      --config.model.hf_path=google/gemma-2-9b-it   # or a local HF directory

Data: on-policy Gemma-2 UltraFeedback pairs scored by ArmoRM
(princeton-nlp/gemma2-ultrafeedback-armorm) from the Hugging Face hub.
"""

import ml_collections

from jaxalign import config as config_lib

TOPOLOGY = "v6e:16x16"   # the slice this recipe is sized for (tests plan it)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = config_lib.defaults()
  c.model.preset = "gemma2-9b"
  # Pinned to the XLA attention until this recipe is re-planned with the splash
  # kernel (docs/performance.md): "auto" would pick splash on a TPU slice.
  c.model.attention = "xla"
  c.model.overrides = ml_collections.ConfigDict(
      dict(dtype="bfloat16", param_dtype="float32", remat=True))
  c.mesh.shape = (1, -1, 1)            # FSDP over the whole slice
  c.data.train_path = "princeton-nlp/gemma2-ultrafeedback-armorm"
  c.data.split = "train"
  c.data.tokenizer = "google/gemma-2-9b-it"
  c.data.max_length = 2048
  c.data.max_prompt_length = 1024
  c.data.batch_size = 256              # pairs per step (global)
  c.loss.name = "ln_dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=3.0))
  c.reference.mode = "precompute"
  c.optim.lr = 8e-7
  c.optim.warmup_steps = 20
  c.total_steps = 230                  # ~1 epoch of 59k pairs at 256 per step
  c.log_every = 10
  c.checkpoint.every = 50
  return c
