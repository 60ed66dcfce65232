"""jaxalign.flops: the model-FLOP count against XLA's own count, and the utilization metrics.

XLA's cost analysis of the compiled CPU program counts every op it runs: the
matmuls, the full T x T score squares the einsum path computes (masked or
not) and the elementwise ops (norms, rope, softmax, activations). So
forward_flops (causal pairs only) plus the masked-out half of the squares must
equal XLA's count up to the elementwise ops, which are ~1.2% of this model's
forward; the tolerance is 3%.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import flops
from jaxalign.models import transformer

B, T = 2, 64


def _cfg(**kw):
  return transformer.ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4,
                                 n_kv_heads=2, head_dim=32, d_ff=256, max_seq_len=T,
                                 attention="xla", scan_layers=False, **kw)
  # Unrolled: XLA's cost analysis counts a scanned (loop) body once, not per layer.


def _masked_square_flops(cfg):
  """Score FLOPs the einsum path spends on masked-out pairs (not model FLOPs)."""
  squares = sum(B * T * T - flops.attention_pairs([T] * B, cfg.window_of(i))
                for i in range(cfg.n_layers))
  return 4 * cfg.n_heads * cfg.head_dim * squares


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "sliding_window": 16}])
def test_forward_count_matches_xla_cost_analysis(kw):
  cfg = _cfg(**kw)
  model = transformer.init_model(cfg, seed=0)
  tokens, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
  xla = _xla_flops(lambda t, m: model.logits(model(t, m)), tokens, mask)
  ours = flops.forward_flops(cfg, [T] * B) + _masked_square_flops(cfg)
  assert ours == pytest.approx(xla, rel=0.03)


def test_training_count_matches_xla_cost_analysis_of_the_gradient():
  cfg = _cfg()
  graphdef, params = nnx.split(transformer.init_model(cfg, seed=0))
  tokens, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)

  def loss(p):
    model = nnx.merge(graphdef, p)
    return model.logits(model(tokens, mask)).sum()

  xla = _xla_flops(jax.grad(loss), params)
  ours = flops.model_flops(cfg, [T] * B) + 3 * _masked_square_flops(cfg)
  assert ours == pytest.approx(xla, rel=0.03)


def test_lora_training_count_matches_xla_cost_analysis_of_the_adapter_gradient():
  """LoRA: the gradient of the adapters only. XLA runs the base's forward and input
  gradient (4N per token, no weight gradient) and the adapters' forward, input and
  weight gradients (6 per adapter parameter per token): flops.model_flops(lora=True,
  adapter_params=A). Rank 32 on every projection makes A (131 k) 40% of N, so the
  adapters' term is well beyond the tolerance. The convention counts every layer's
  input gradient, as 6N counts every layer's backward; XLA skips the one below the
  lowest adapters (layer 0's q, k, v input gradient: nothing under it trains), taken
  out here. The loss squares the logits: a plain sum lets XLA fold the head's input
  gradient (a constant times the weight) into a reduction."""
  from jaxalign.models import lora
  cfg = _cfg()
  config = lora.LoraConfig(rank=32, alpha=32.0,
                           targets=("q", "k", "v", "o", "gate", "up", "down"))
  model = lora.add_adapters(transformer.init_model(cfg, seed=0), config, seed=0)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
  a = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
  assert a == 2 * 32 * ((128 + 128) * 2 + (128 + 64) * 2 + (128 + 256) * 3)
  tokens, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)

  def loss(adapters):
    model = nnx.merge(graphdef, adapters, base)
    logits = model.logits(model(tokens, mask))
    return (logits * logits).sum()

  xla = _xla_flops(jax.grad(loss), adapters)
  skipped = 2 * 128 * (128 + 64 + 64) * B * T           # layer 0's q, k, v input gradient
  ours = flops.model_flops(cfg, [T] * B, lora=True, adapter_params=a)
  assert ours + 3 * _masked_square_flops(cfg) - skipped == pytest.approx(xla, rel=0.03)
  base_only = flops.model_flops(cfg, [T] * B, lora=True)  # the adapters' term matters
  assert base_only + 3 * _masked_square_flops(cfg) - skipped < 0.7 * xla


@pytest.mark.parametrize("window", [None, 1, 3, 7, 50])
def test_attention_pairs_count_the_allowed_mask(window):
  lengths = [0, 1, 5, 12, 40]
  brute = 0
  for L in lengths:
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    ok = j <= i
    if window is not None:
      ok &= j > i - window
    brute += int(ok.sum())
  assert flops.attention_pairs(lengths, window) == brute


def test_model_flops_count_real_tokens_only_and_each_term():
  cfg = _cfg(sliding_window=8, layer_types=("sliding", "full"))
  n = flops.matmul_params(cfg)
  assert n == cfg.num_params() - 256 * 128                # untied input table left out
  fwd = lambda L: 2 * n * L + 4 * 4 * 32 * (
      flops.attention_pairs([L], 8) + flops.attention_pairs([L]))
  assert flops.forward_flops(cfg, [10]) == pytest.approx(fwd(10))
  train = lambda L: 6 * n * L + 3 * (fwd(L) - 2 * n * L)
  mask = np.zeros((2, 3, 16), np.int32)       # [B, S, T]: lengths 10, 16, 0 (a padding slot)
  mask[0, 0, :10] = 1
  mask[0, 1, :] = 1
  mask[1, 0, 6:] = 1                          # left padding: 10 real tokens
  u = flops.Utilization(cfg, num_devices=4, peak=100e12)
  assert u.batch_flops(mask) == pytest.approx(2 * train(10) + train(16))
  ref = flops.Utilization(cfg, 4, None, frozen_reference=True, lora=True)
  assert ref.batch_flops(mask[:, :1, :10] * 0 + 1) == pytest.approx(
      2 * ((4 * n * 10 + 3 * (fwd(10) - 2 * n * 10)) + fwd(10)))
  m = u.metrics(8e12, seconds=2.0)
  assert m["perf/model_tflops_per_sec_per_device"] == pytest.approx(1.0)
  assert m["perf/mfu"] == pytest.approx(0.01)
  assert "perf/mfu" not in ref.metrics(8e12, 2.0)     # unknown peak: no MFU


def test_kernel_flops_count_the_recomputing_backward():
  cfg = _cfg()
  fwd = flops.attention_forward_flops(cfg, [T] * B)
  assert flops.attention_kernel_flops(cfg, [T] * B) == 3.5 * fwd
  assert flops.attention_kernel_flops(cfg, [T] * B, recompute_forward=True,
                                      frozen_reference=True) == 5.5 * fwd


def test_peak_table():
  assert flops.peak_flops("TPU v5 lite", "float32") == 197e12
  assert flops.peak_flops("TPU v5", "bfloat16") == 459e12
  assert flops.peak_flops("TPU v6 lite", "bfloat16") == 918e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 495e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
  assert flops.peak_flops("cpu", "float32") is None


def _moe_cfg():
  return _cfg(n_experts=4, experts_per_token=2, moe_d_ff=128)


def test_moe_counts_active_parameters_by_hand():
  cfg = _moe_cfg()
  D, V, L = 128, 256, 2
  attn = D * 4 * 32 * 2 + D * 2 * 32 * 2          # q, o; k, v
  router, experts = D * 4, 2 * 3 * D * 128          # all router columns, top-2 SwiGLU experts
  active = D * V + L * (attn + router + experts + 2 * D) + D   # head, blocks, final norm
  assert flops.matmul_params(cfg) == active
  assert cfg.num_params() - D * V - flops.matmul_params(cfg) == L * 2 * 3 * D * 128
  train = flops.model_flops(cfg, [T] * B)
  assert train == pytest.approx(6 * active * B * T + 3 * flops.attention_forward_flops(cfg, [T] * B))


def test_moe_forward_count_matches_xla_cost_analysis():
  """XLA's CPU ragged_dot is lowered as one dense matmul per group, so its cost
  analysis counts every row against all E experts: E / k times the routed
  experts' model FLOPs (2 * 3 * D * F per row of the N * k sorted rows)."""
  cfg = _moe_cfg()
  model = transformer.init_model(cfg, seed=0)
  tokens, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
  xla = _xla_flops(lambda t, m: model.logits(model(t, m)), tokens, mask)
  routed = cfg.n_layers * 2 * 3 * cfg.d_model * 128 * (B * T * 2)
  ours = (flops.forward_flops(cfg, [T] * B) + _masked_square_flops(cfg)
          + (cfg.n_experts - 1) * routed)
  assert ours == pytest.approx(xla, rel=0.03)
