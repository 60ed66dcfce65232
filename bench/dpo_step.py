"""DPO training-step throughput: real tokens/s, MFU against a measured matmul peak, memory.

  python bench/dpo_step.py              # CPU: tiny and ~100M at small batch (< 3 min)
  python bench/dpo_step.py --steps 10   # more timed steps
  python bench/dpo_step.py --only 100m  # one config
  python bench/dpo_step.py --layers scan   # only the scanned model (default: both)

Each config runs with the layers scanned (`model.scan_layers=True`, what the
default "auto" picks on TPU/GPU) and unrolled (a Python loop over layers, what
it picks for these shallow models on CPU) in the same process: both
are compiled first, then timed in `--rounds` interleaved rounds (scan,
unrolled, scan, ...; best round of each kept), and the table ends with the
scanned / unrolled tokens/s ratio per config and the load average.

On a GPU it also runs ~100M at a larger batch and a ~1.2B (Llama-3.2-1B
shaped) model at sequence length 2048, both bf16 with float32 master weights
and precomputed reference log-probs. Not a test: it prints figures.

Each config builds the real train state (random weights, sharded over all local
devices) and THE jitted step (`jaxalign.train.build.build_config`: the builder
`jaxalign train` runs), feeds it synthetic pairs whose lengths vary (so some tokens are
padding), compiles, runs `--warmup` steps, then times `--steps` steps.

Figures:
  tokens/s (real): attention-mask tokens per second, padding excluded.
  MFU: model FLOPs (6 * params per token, forward + backward, all tokens the
    step computes, padding included) per second / measured peak. "MFU real"
    counts real tokens only.
  peak: a large square matmul in the step's compute dtype (float32 on CPU,
    bfloat16 on GPU), timed in this same run, times the number of devices
    (on CPU, once: fake CPU devices share the same cores).
  memory: device.memory_stats()["peak_bytes_in_use"] per device where the
    backend reports it (GPU, TPU), else the compiled step's memory analysis.

Output: a table, then one line `JSON {...}` with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxalign import config as config_lib, sharding
from jaxalign.train import build as build_lib, init

# meta-llama/Llama-3.2-1B shapes (1.24B parameters, tied embeddings).
LLAMA_1B = dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                d_ff=8192, tie_embeddings=True)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  preset: str
  batch: int          # pairs per step
  length: int         # tokens per sequence (max_length)
  dtype: str = "float32"
  remat: bool = False
  overrides: tuple = ()


CPU_CASES = (
    Case("tiny", "tiny", batch=16, length=64),
    Case("100m", "100m", batch=2, length=128),
)
GPU_CASES = (
    Case("100m-bf16", "100m", batch=16, length=1024, dtype="bfloat16"),
    Case("1b-bf16-2048", "llama3-8b", batch=4, length=2048, dtype="bfloat16", remat=True,
         overrides=tuple(LLAMA_1B.items())),
)


def make_config(case: Case, scan: bool = True):
  """The recipe timed: DPO with precomputed reference log-probs, lr 1e-6 after one
  warm-up step of a 1000-step cosine schedule."""
  c = config_lib.defaults()
  c.model.preset = case.preset
  c.model.scan_layers = scan
  c.model.overrides.update(dict(case.overrides, dtype=case.dtype, param_dtype="float32",
                                remat=case.remat))
  c.data.max_length = case.length
  c.data.max_prompt_length = case.length // 4
  c.data.batch_size = case.batch
  c.loss.name = "dpo"
  c.reference.mode = "precompute"
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 1
  c.total_steps = 1000
  return c


def synthetic_batch(case: Case, vocab: int, seed: int) -> dict[str, np.ndarray]:
  """Pairs of prompt + response, right-padded; lengths between T/2 and T."""
  rng = np.random.default_rng(seed)
  B, T = case.batch, case.length
  tokens = rng.integers(3, vocab, size=(B, 2, T), dtype=np.int32)
  lengths = rng.integers(T // 2, T + 1, size=(B, 2))
  prompt = np.minimum(T // 4, lengths - 1)
  pos = np.arange(T)
  attention = (pos < lengths[..., None]).astype(np.int32)
  loss_mask = (attention & (pos >= prompt[..., None])).astype(np.int32)
  # A uniform reference (log 1/V per scored token): margins start near 0, loss near log 2.
  ref = (-np.log(vocab) * (loss_mask[..., 1:].sum(-1))).astype(np.float32)
  return {"tokens": tokens * attention, "attention_mask": attention,
          "loss_mask": loss_mask, "ref_logps": ref}


def matmul_peak(dtype: str, device, *, n: int, reps: int = 5) -> float:
  """FLOP/s of an n x n x n matmul on `device`, best of `reps` after a warm-up."""
  key = jax.random.PRNGKey(0)
  a = jax.device_put(jax.random.normal(key, (n, n), dtype), device)
  b = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def build_case(case: Case, devices, *, scan: bool) -> dict:
  """The real train state and THE compiled step of `case`, layers scanned or not."""
  built = build_lib.build_config(make_config(case, scan), devices)
  mesh, model_cfg = built.mesh, built.run_spec.model_cfg
  host_batches = [synthetic_batch(case, model_cfg.vocab_size, seed=i) for i in range(2)]
  with jax.set_mesh(mesh):
    state = init.initial_state(built.run_spec, built, fresh=True)
    batches = [sharding.host_to_global(b, built.batch_sharding) for b in host_batches]
    t0 = time.perf_counter()
    compiled = built.step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
  return {"case": case, "scan": scan, "mesh": mesh, "model_cfg": model_cfg,
          "state": state, "batches": batches, "host_batches": host_batches,
          "compiled": compiled, "compile_s": compile_s, "elapsed": [], "loss": None}


def time_round(b: dict, *, steps: int, warmup: int) -> None:
  """Runs `warmup` then times `steps` steps of a built case; appends the elapsed time."""
  compiled, batches, state = b["compiled"], b["batches"], b["state"]
  with jax.set_mesh(b["mesh"]):
    for i in range(warmup):
      state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    b["elapsed"].append(time.perf_counter() - t0)
  b["state"], b["loss"] = state, float(metrics["loss"])


def summarize(b: dict, devices, *, steps: int, peak: float) -> dict:
  case, host_batches, compiled = b["case"], b["host_batches"], b["compiled"]
  elapsed = min(b["elapsed"])
  real = sum(int(host_batches[i % 2]["attention_mask"].sum()) for i in range(steps))
  total = steps * case.batch * 2 * case.length
  n = b["model_cfg"].num_params()
  step_s = elapsed / steps
  mem_stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if mem_stats and "peak_bytes_in_use" in mem_stats:
    mem, mem_source = max(d.memory_stats()["peak_bytes_in_use"] for d in devices), "memory_stats"
  else:
    m = compiled.memory_analysis()
    mem = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    mem_source = "compiled"
  return {
      "name": case.name, "layers": "scan" if b["scan"] else "unrolled",
      "params": n, "batch_pairs": case.batch, "seq_len": case.length,
      "dtype": case.dtype, "remat": case.remat, "devices": len(devices),
      "compile_s": b["compile_s"], "step_s": step_s,
      "round_step_s": [e / steps for e in b["elapsed"]],
      "tokens_per_s_real": real / elapsed, "tokens_per_s_all": total / elapsed,
      "padding_frac": 1 - real / total,
      "model_flops_per_s": 6 * n * total / elapsed,
      "mfu": 6 * n * total / elapsed / peak,
      "mfu_real": 6 * n * real / elapsed / peak,
      "peak_mem_bytes_per_device": int(mem), "mem_source": mem_source,
      "loss": b["loss"],
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--only", default="", help="comma-separated case names")
  ap.add_argument("--layers", choices=("both", "scan", "unrolled"), default="both",
                  help="scanned layers, the unrolled Python loop, or both in this run")
  ap.add_argument("--rounds", type=int, default=2,
                  help="interleaved timing rounds per layout (the best is reported)")
  args = ap.parse_args(argv)
  layouts = {"both": (True, False), "scan": (True,), "unrolled": (False,)}[args.layers]

  devices = jax.devices()
  backend = devices[0].platform
  cases = CPU_CASES + (GPU_CASES if backend == "gpu" else ())
  if args.only:
    cases = tuple(c for c in cases if c.name in args.only.split(","))

  peaks = {}
  for dtype in sorted({c.dtype for c in cases}):
    n = 8192 if backend != "cpu" else 2048
    per_device = matmul_peak(dtype, devices[0], n=n)
    peaks[dtype] = per_device * (len(devices) if backend != "cpu" else 1)

  results = []
  for case in cases:
    built = [build_case(case, devices, scan=scan) for scan in layouts]
    for _ in range(args.rounds):
      for b in built:
        time_round(b, steps=args.steps, warmup=args.warmup)
    for b in built:
      r = summarize(b, devices, steps=args.steps, peak=peaks[case.dtype])
      results.append(r)
      print(f"  {case.name} ({r['layers']}): {r['tokens_per_s_real']:.0f} real tokens/s",
            file=sys.stderr)
    del built

  cpu = platform.processor() or platform.machine()
  machine = f"{backend} x{len(devices)} ({devices[0].device_kind}; {cpu}, {os.cpu_count()} cores)"
  print(f"\nDPO train step on {machine}; peak matmul "
        + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))
  header = (f"{'config':<14}{'layers':>9}{'params':>9}{'B x 2 x T':>13}{'dtype':>10}"
            f"{'compile s':>10}"
            f"{'step ms':>10}{'real tok/s':>12}{'pad %':>7}{'MFU %':>7}{'MFU real %':>11}"
            f"{'mem/dev':>11}")
  print(header)
  print("-" * len(header))
  for r in results:
    print(f"{r['name']:<14}{r['layers']:>9}{r['params'] / 1e6:>8.1f}M"
          f"{r['batch_pairs']:>6} x 2 x {r['seq_len']:<4}"
          f"{r['dtype']:>8}{r['compile_s']:>10.1f}{r['step_s'] * 1e3:>10.1f}"
          f"{r['tokens_per_s_real']:>12.0f}{100 * r['padding_frac']:>7.1f}"
          f"{100 * r['mfu']:>7.1f}{100 * r['mfu_real']:>11.1f}"
          f"{r['peak_mem_bytes_per_device'] / 2**20:>8.0f}MiB"
          + ("" if r["mem_source"] == "memory_stats" else "*"))
  if any(r["mem_source"] != "memory_stats" for r in results):
    print("* memory from the compiled step's memory analysis (no device.memory_stats here)")
  ratios = {}
  for name in dict.fromkeys(r["name"] for r in results):
    by = {r["layers"]: r for r in results if r["name"] == name}
    if {"scan", "unrolled"} <= set(by):
      ratios[name] = by["scan"]["tokens_per_s_real"] / by["unrolled"]["tokens_per_s_real"]
      print(f"{name}: scanned / unrolled real tokens/s {ratios[name]:.3f}x "
            f"(best of {args.rounds} interleaved rounds; compile "
            f"{by['scan']['compile_s']:.1f} s vs {by['unrolled']['compile_s']:.1f} s)")
  load = os.getloadavg()
  print(f"load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
        f"({os.cpu_count()} cores) at the end of the run")
  print("JSON " + json.dumps({
      "bench": "dpo_step", "date": time.strftime("%Y-%m-%d"), "machine": machine,
      "jax": jax.__version__, "peak_flops": peaks, "steps": args.steps, "rounds": args.rounds,
      "scan_over_unrolled": ratios, "loadavg": load, "results": results}))


if __name__ == "__main__":
  main()
