"""Attention kernels side by side: forward + backward time of one layer's attention.

  python bench/attention.py                 # small shapes (CPU: xla only, < 1 min)
  python bench/attention.py --length 4096   # one sequence length

Times `jaxalign.models.attention.attention` (causal, right padding, GQA) under
`jax.value_and_grad` for each implementation that has a kernel on this
backend: xla everywhere, cudnn on an NVIDIA GPU (bf16), splash on a TPU. On
CPU only xla runs (splash would run in Pallas interpret mode, a correctness
tool, not a timing), and the script says so. Not a test: it prints figures,
with the attention FLOPs rate (jaxalign.flops convention: causal pairs, 3x the
forward) so kernels that skip masked blocks compare by useful work.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxalign import flops
from jaxalign.models import attention as attn


def _time(fn, args, steps: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--length", type=int, default=0, help="one sequence length (default: a sweep)")
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()
  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  B, H, KV, Dh = (2, 8, 2, 64) if on_cpu else (8, 32, 8, 128)
  lengths = [args.length] if args.length else ([256, 512, 1024] if on_cpu else [1024, 2048, 4096])
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  fused = {"gpu": "cudnn", "tpu": "splash"}.get(backend)
  print(f"attention fwd+bwd on {backend} ({jax.devices()[0].device_kind}), B={B} H={H} "
        f"KV={KV} Dh={Dh} {jnp.dtype(dtype).name}, causal, right padding; load average "
        f"{os.getloadavg()[0]:.1f}")
  if fused is None:
    print("  no fused kernel on this backend (cudnn needs an NVIDIA GPU, splash a TPU): "
          "xla only")
  impls = ["xla"] + ([fused] if fused else [])
  print(f"{'T':>6}" + "".join(f"{i + ' ms':>12}{i + ' GFLOP/s':>16}" for i in impls))
  for T in lengths:
    keys = jax.random.split(jax.random.key(T), 3)
    q = jax.random.normal(keys[0], (B, T, H, Dh), dtype)
    k = jax.random.normal(keys[1], (B, T, KV, Dh), dtype)
    v = jax.random.normal(keys[2], (B, T, KV, Dh), dtype)
    lengths_b = [T, (3 * T) // 4]
    mask = jnp.arange(T)[None] < jnp.asarray(lengths_b)[:, None].repeat(B // 2, 0)
    useful = 3 * 4 * H * Dh * flops.attention_pairs(lengths_b * (B // 2))
    row = f"{T:>6}"
    for impl in impls:
      f = jax.jit(jax.value_and_grad(
          lambda q, k, v, impl=impl: attn.attention(q, k, v, scale=Dh ** -0.5, key_mask=mask,
                                                    implementation=impl).astype(
                                                        jnp.float32).sum(), argnums=(0, 1, 2)))
      seconds = _time(f, (q, k, v), args.steps)
      row += f"{seconds * 1e3:>12.1f}{useful / seconds / 1e9:>16.1f}"
    print(row, flush=True)


if __name__ == "__main__":
  main()
