"""Qwen3-30B-A3B DPO at real scale, meant for a TPU v5p-64 slice (64 chips, 4x4x4).

Shapes: Qwen/Qwen3-30B-A3B, a mixture of experts: 48 layers, d_model 2048, 32
query / 4 kv heads of 128, q/k norms, every MLP 128 SwiGLU experts of hidden
size 768 with the top 8 per token (normalized top-k probabilities), vocab
151936, rope theta 1e6. 30.5B parameters, 3.3B active per token (the FLOPs and
MFU count those: jaxalign.flops). bf16 compute with float32 master weights and
AdamW state, rematerialization per block with the "minimal" policy (the
projections and the experts' sorted rows saved), the splash attention kernel and
the megablox grouped-matmul kernel for the experts.

Mesh (4, 16, 1): the 128 experts are split over "data" (32 whole experts per
data shard: expert parallelism, models/expert_parallel.py) and FSDP-sharded
over "fsdp" inside each of the 4 groups; attention and embeddings are FSDP over
"fsdp". Batch: 64 pairs x 2 sequences x 4096 tokens = 524,288 tokens per step
(one pair per chip), reference log-probs precomputed once. Each device sorts its
experts' assignments into a buffer of moe_capacity_factor (default 1.25) x its
average share (81,920 rows, against 262,144 for the worst case), and a layer
whose experts on some device receive more runs the rest through the worst-case
buffer (dropless either way). The router's
load-balancing loss is added with Qwen3-MoE's router_aux_loss_coef 0.001, as
TRL does for MoE policies.

  # Check that it compiles and fits, on any CPU machine with libtpu installed:
  jaxalign plan --config configs/qwen3_30b_a3b_dpo.py --topology v5p:4x4x4
  # Planned at 48 layers (docs/performance.md, "Bytes around the expert kernel"):
  # 63.52 GiB per chip, predicted step 1256 ms, MFU on active parameters 32.8%
  # (21.4% before that pass, with remat "full": 24.77 GiB per chip).
  # Train on the slice (every worker runs the same command; see docs/scaling.md):
  jaxalign train --config configs/qwen3_30b_a3b_dpo.py --workdir gs://BUCKET/runs/qwen3_30b_a3b \
      --config.model.hf_path=Qwen/Qwen3-30B-A3B   # or a local HF directory

Data: UltraFeedback binarized preference pairs from the Hugging Face hub.
"""

import ml_collections

from jaxalign import config as config_lib

TOPOLOGY = "v5p:4x4x4"   # the slice this recipe is sized for (tests plan it)

# Qwen/Qwen3-30B-A3B's config.json, as overrides of the "llama3-8b" preset.
QWEN3_30B_A3B = dict(
    vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
    d_ff=6144, max_seq_len=40960, rope_theta=1_000_000.0, rope_scaling=None, norm_eps=1e-6,
    qk_norm=True, tie_embeddings=False, n_experts=128, experts_per_token=8, moe_d_ff=768,
    moe_norm_topk=True)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = config_lib.defaults()
  c.model.preset = "llama3-8b"
  c.model.attention = "splash"
  c.model.moe_kernel = "auto"          # megablox on TPU
  c.model.overrides = ml_collections.ConfigDict(
      dict(**QWEN3_30B_A3B, router_aux_loss_coef=0.001, dtype="bfloat16",
           param_dtype="float32", remat="minimal"))
  c.mesh.shape = (4, -1, 1)            # 4 expert groups x 16-way FSDP
  c.data.train_path = "HuggingFaceH4/ultrafeedback_binarized"
  c.data.split = "train_prefs"
  c.data.tokenizer = "Qwen/Qwen3-30B-A3B"
  c.data.max_length = 4096
  c.data.max_prompt_length = 2048
  c.data.batch_size = 64               # pairs per step (global)
  c.loss.name = "dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0))
  c.reference.mode = "precompute"
  c.optim.lr = 5e-7
  c.optim.warmup_steps = 20
  c.total_steps = 950                  # ~1 epoch of 61k pairs at 64 per step
  c.log_every = 10
  c.checkpoint.every = 50
  return c
