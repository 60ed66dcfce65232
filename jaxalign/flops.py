"""Model FLOPs of a training step, device peaks and utilization (docs/performance.md).

Pure functions of a ModelConfig and sequence lengths; `jaxalign plan` and the
host loop both count with them, so a plan's MFU and a run's `perf/mfu` mean
the same thing.

Conventions (per real token / per real sequence; padding counts nothing):
  N      = matmul parameters one token uses: ModelConfig.num_active_params()
           (num_params() for a dense model; a mixture of experts counts its
           router and the experts_per_token experts a token is routed to, not
           all n_experts) less the input embedding table when it is untied (a
           gather, not a matmul; a tied table is the output head and counts).
           Norm scales and biases are included (tiny).
  pairs  = (query, key) pairs a causal (sliding-window) layer attends over in a
           sequence of L real tokens: L(L+1)/2, or with window w, sum_i min(i+1, w).
  attention forward = 4 * H * Dh * pairs per layer (QK^T and PV, 2 FLOPs a MAC).
  model FLOPs of a training step = sum over the step's sequences of
      policy:    6 N L + 3 * attention forward      (forward + backward = 2 x forward)
      LoRA:      4 N L + 6 A L + 3 * attention forward
                 (the base: forward and input gradient, no weight gradient; A = the
                 adapter parameters one pass trains, 6 per token like any trained
                 weight: their forward, input and weight gradients)
      frozen reference forward, when one runs in the step: 2 N L + attention forward
                 (with LoRA: the base with the adapters off)
  Recomputation (remat) and masked-out score blocks are never model FLOPs.
  Fused kernels (splash, cuDNN) execute more than that: their backward recomputes
  the scores, 5 matmuls against the forward's 2, so `attention_kernel_flops`
  counts the backward as 2.5 x the forward (plus the forward again under remat).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Flash-style backward: recompute QK^T, then dV, dP, dQ, dK -- 5 matmuls vs 2 forward.
KERNEL_BACKWARD_FACTOR = 2.5
# Assumed fraction of the chip's peak a fused attention kernel sustains, for
# the planner's kernel-time estimate (a roofline at peak would be optimistic).
KERNEL_EFFICIENCY = 0.5

# Dense (no sparsity) peak FLOP/s per chip, from the vendors' data sheets.
# TPUs: bf16 MXU peak; float32 matmuls at XLA's default precision run as bf16
# passes on the MXU, so the bf16 peak is the honest denominator for every dtype.
# GPUs: bf16/fp16 tensor-core peak; float32 at its TF32 tensor-core peak (XLA's
# default precision for float32 dots on Ampere and later).
# Checked in order: the first key contained in the lower-cased device_kind wins.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("v5 lite", {"*": 197e12}), ("v5e", {"*": 197e12}),
    ("v6 lite", {"*": 918e12}), ("v6e", {"*": 918e12}),
    ("v5p", {"*": 459e12}), ("tpu v5", {"*": 459e12}),
    ("tpu v4", {"*": 275e12}),
    ("h100 pcie", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("h100", {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}),
    ("h200", {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12}),
    ("b200", {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12}),
    ("a100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of `device_kind` computing in `dtype`; None if unknown
  (CPUs: no dependable peak, so no MFU is reported there)."""
  kind = device_kind.lower()
  for key, peaks in PEAK_FLOPS:
    if key in kind:
      return peaks.get("*", peaks.get(dtype))
  return None


def matmul_params(cfg) -> int:
  """N of the 6N convention: num_active_params() (all of num_params() for a dense
  model, the top-k experts for an MoE) without an untied input embedding table."""
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  return cfg.num_active_params() - lookup


def attention_pairs(lengths, window: int | None = None) -> float:
  """Total causal (query, key) pairs over sequences of `lengths` real tokens."""
  L = np.asarray(lengths, np.float64)
  if window is None:
    return float(np.sum(L * (L + 1) / 2))
  w = float(window)
  head = np.minimum(L, w)            # the first min(L, w) queries see i + 1 keys
  return float(np.sum(head * (head + 1) / 2 + (L - head) * w))


def attention_forward_flops(cfg, lengths) -> float:
  """Attention-score FLOPs (QK^T and PV) of one forward over `lengths`, all layers."""
  per_pair = 4 * cfg.n_heads * cfg.head_dim
  return float(sum(per_pair * attention_pairs(lengths, cfg.window_of(i))
                   for i in range(cfg.n_layers)))


def forward_flops(cfg, lengths) -> float:
  """Model FLOPs of one forward (with the output head) over sequences of `lengths`."""
  return 2.0 * matmul_params(cfg) * float(np.sum(lengths)) + attention_forward_flops(cfg, lengths)


def model_flops(cfg, lengths, *, frozen_reference: bool = False, lora: bool = False,
                policy_passes: int = 1, adapter_params: int = 0) -> float:
  """Model FLOPs of a training step over sequences of `lengths` real tokens.

  Args:
    cfg: the ModelConfig.
    lengths: real (non-padding) tokens of each sequence in the step.
    frozen_reference: a reference copy runs a forward in the step.
    lora: only adapters train: no weight gradients of the base (4N, not 6N).
    policy_passes: forward + backward passes of the policy (OFS-DPO: one per module).
    adapter_params: with `lora`, the adapter parameters one pass trains (6 per token).
  """
  tokens = float(np.sum(lengths))
  n = matmul_params(cfg)
  attn = attention_forward_flops(cfg, lengths)
  policy = ((4.0 * n + 6.0 * adapter_params) if lora else 6.0 * n) * tokens + 3.0 * attn
  reference = 2.0 * n * tokens + attn if frozen_reference else 0.0
  return policy_passes * policy + reference


def attention_kernel_flops(cfg, lengths, *, frozen_reference: bool = False,
                           policy_passes: int = 1, recompute_forward: bool = False) -> float:
  """FLOPs a fused attention kernel executes in a training step (masked blocks skipped).

  Forward, backward at KERNEL_BACKWARD_FACTOR x forward, the forward once more
  when the block is rematerialized, and a frozen reference's forward.
  """
  attn = attention_forward_flops(cfg, lengths)
  policy = (1.0 + KERNEL_BACKWARD_FACTOR + (1.0 if recompute_forward else 0.0)) * attn
  return policy_passes * policy + (attn if frozen_reference else 0.0)


def context_imbalance(shards: int, window: int | None = None,
                      length: int | None = None) -> float:
  """Attention work of the busiest of `shards` contiguous context shards over the
  mean (jaxalign/models/context.py), for a causal sequence of `length` tokens.

  Shard i's queries see (i + 1/2) * length / shards keys on average (causal), the
  last one (shards - 1/2): (2 * shards - 1) / shards times the mean. With a
  sliding window no longer than a shard every shard does about the same work (1).
  """
  if shards <= 1:
    return 1.0
  if window is not None and length is not None and window <= length // shards:
    return 1.0
  return (2 * shards - 1) / shards


def remat_on(cfg) -> bool:
  """Whether the blocks are rematerialized (a bool today, a policy name later)."""
  return cfg.remat not in (False, None, "none")


@dataclasses.dataclass(frozen=True)
class Utilization:
  """Turns a window of steps (their attention masks, wall time) into perf/ metrics."""
  cfg: Any
  num_devices: int
  peak: float | None            # per device, FLOP/s; None: no MFU
  frozen_reference: bool = False
  lora: bool = False
  policy_passes: int = 1
  adapter_params: int = 0

  @classmethod
  def for_devices(cls, cfg, devices, **kwargs) -> "Utilization":
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    return cls(cfg, len(devices), peak_flops(kind, cfg.dtype), **kwargs)

  def batch_flops(self, attention_mask) -> float:
    """Model FLOPs of one step on a batch with this attention mask ([..., T], 1 = real)."""
    mask = np.asarray(attention_mask)
    lengths = mask.reshape(-1, mask.shape[-1]).sum(axis=-1)
    return model_flops(self.cfg, lengths, frozen_reference=self.frozen_reference,
                       lora=self.lora, policy_passes=self.policy_passes,
                       adapter_params=self.adapter_params)

  def metrics(self, flops: float, seconds: float) -> dict[str, float]:
    """perf/model_tflops_per_sec_per_device and, where the peak is known, perf/mfu."""
    per_device = flops / max(seconds, 1e-9) / self.num_devices
    out = {"perf/model_tflops_per_sec_per_device": per_device / 1e12}
    if self.peak:
      out["perf/mfu"] = per_device / self.peak
    return out
