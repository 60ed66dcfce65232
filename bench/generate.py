"""Generation throughput: the KV-cache engine vs the naive recompute loop vs transformers.

  nice -n 5 python bench/generate.py                 # demo model and ~100M, 256 new tokens
  python bench/generate.py --only demo --repeats 3    # one model
  python bench/generate.py --new-tokens 64           # shorter generations
  python bench/generate.py --threads 1               # one compute thread for JAX and torch

For each model (random weights; the demo model of configs/sft_demo.py and the
"100m" preset) and the same left-padded greedy prompts, it times:
  engine  jaxalign.sampling.generate: prefill + lax.while_loop decode with a
          KV cache, one compiled program (compile excluded, timed separately).
  naive   a recompute loop (here, `_recompute_decode`): a full forward of the
          whole [B, P + M] buffer for every new token (no cache), jit-compiled.
  hf      transformers' `generate` (PyTorch CPU, greedy, use_cache=True) on the
          same weights exported with jaxalign.models.hf.export.
Every method generates exactly M tokens per row (no stop token; transformers
gets min_new_tokens=M). Tokens/s = B * M / wall time of one call (the best of
--repeats); tok/cpu-s divides by the process CPU time of that call instead
(all threads), a figure that holds up on a machine shared with other jobs.
--threads N pins both frameworks to N compute threads (XLA's intra-op pool
and Eigen, torch.set_num_threads); default: each framework's own default.
Also reported: how many greedy tokens agree with the engine
(float rounding can flip an argmax of near-uniform random-weight logits, after
which sequences diverge; a count, not a failure).

Not a test. Output: a table, then one line `JSON {...}` with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import tempfile
import time


def _threads_from_argv(argv) -> int:
  """--threads N, read before jax starts (XLA reads its flags once)."""
  for i, a in enumerate(argv):
    if a == "--threads" and i + 1 < len(argv):
      return int(argv[i + 1])
    if a.startswith("--threads="):
      return int(a.split("=", 1)[1])
  return 0


THREADS = _threads_from_argv(sys.argv[1:])
if THREADS:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_cpu_multi_thread_eigen={str(THREADS > 1).lower()}"
                             + f" intra_op_parallelism_threads={THREADS}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxalign import config as config_lib  # noqa: E402
from jaxalign.models import hf, transformer  # noqa: E402
from jaxalign.sampling import SamplingParams, generate  # noqa: E402
from jaxalign.train import state as state_lib  # noqa: E402
from jaxalign.workflows import demo  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int          # prompts
  prompt_len: int     # longest prompt; others shorter (left padding)
  naive_repeats: int  # the naive loop is slow: fewer timed calls (0: skip it)
  preset: str = ""    # model (default: name)


CASES = (Case("demo", batch=8, prompt_len=10, naive_repeats=2),
         Case("100m", batch=1, prompt_len=16, naive_repeats=1),
         # Batched sampling as the online methods do it; the naive loop would take
         # ~8x the B=1 row's time, so it is left out here.
         Case("100m", batch=8, prompt_len=16, naive_repeats=0))


def model_config(name: str) -> transformer.ModelConfig:
  if name == "demo":
    # The model of configs/sft_demo.py (demo.sft_config -> demo.base_config).
    return config_lib.model_config(demo.base_config())
  return transformer.preset(name)


def prompts(case: Case, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """[B, P] left-padded random prompts; lengths between P/2 and P."""
  rng = np.random.default_rng(seed)
  P = case.prompt_len
  lengths = rng.integers(P // 2, P + 1, size=case.batch)
  lengths[0] = P
  tokens = np.zeros((case.batch, P), np.int32)
  mask = np.zeros((case.batch, P), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, P - n:] = rng.integers(3, vocab, size=n)
    mask[i, P - n:] = 1
  return tokens, mask


def timed(fn, repeats: int) -> tuple[float, float, object]:
  """(best wall s, CPU s of that call, last result) over `repeats` blocking calls."""
  best, cpu, out = float("inf"), float("inf"), None
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if hasattr(out, "block_until_ready") or isinstance(out, jax.Array):
      out = jax.block_until_ready(out)
    wall, used = time.perf_counter() - t0, time.process_time() - c0
    if wall < best:
      best, cpu = wall, used
  return best, cpu, out


def agreement(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over rows of the fraction of the sequence before the first difference."""
  same = []
  for x, y in zip(a, b):
    diff = np.flatnonzero(x != y)
    same.append((diff[0] if diff.size else len(x)) / len(x))
  return float(np.mean(same))


def run_engine(graphdef, params, frozen, tokens, mask, new_tokens: int, repeats: int):
  sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  key = jax.random.PRNGKey(0)
  call = lambda: generate(graphdef, params, frozen, tokens, mask, key, sp).tokens
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - t0
  seconds, cpu, out = timed(call, repeats)
  return seconds, cpu, first - seconds, np.asarray(out)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _recompute_decode(params, frozen, tokens, mask, *, graphdef, max_new_tokens: int):
  """[B, P] left-padded prompts -> [B, M] greedy tokens, no cache, no stop token."""
  model = nnx.merge(graphdef, params, frozen)
  b, p = tokens.shape
  buf = jnp.concatenate([tokens, jnp.zeros((b, max_new_tokens), tokens.dtype)], axis=1)
  buf_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)

  def body(i, carry):
    buf, buf_mask = carry
    hidden = model(buf, buf_mask)                                          # [B, P+M, D]
    last = jax.lax.dynamic_index_in_dim(hidden, p + i - 1, axis=1, keepdims=False)
    nxt = jnp.argmax(model.next_token_logits(last), axis=-1).astype(buf.dtype)
    buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, p + i, axis=1)
    buf_mask = jax.lax.dynamic_update_index_in_dim(buf_mask, jnp.ones_like(nxt, mask.dtype),
                                                   p + i, axis=1)
    return buf, buf_mask

  buf, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, buf_mask))
  return buf[:, p:]


def run_naive(graphdef, params, frozen, tokens, mask, new_tokens: int, repeats: int):
  args = (params, frozen, jnp.asarray(tokens), jnp.asarray(mask))
  kw = dict(graphdef=graphdef, max_new_tokens=new_tokens)
  t0 = time.perf_counter()
  compiled = _recompute_decode.lower(*args, **kw).compile()
  compile_s = time.perf_counter() - t0
  seconds, cpu, out = timed(lambda: compiled(*args), repeats)
  return seconds, cpu, compile_s, np.asarray(out)


def run_hf(params, model_cfg, tokens, mask, new_tokens: int, repeats: int):
  import torch
  from transformers import AutoModelForCausalLM

  if THREADS:
    torch.set_num_threads(THREADS)
  with tempfile.TemporaryDirectory() as d:
    hf.export(params, model_cfg, d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  model.eval()
  ids, attn = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  def call():
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=attn, do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=0, use_cache=True)
  call()  # warm-up
  seconds, cpu, out = timed(call, repeats)
  return seconds, cpu, out[:, tokens.shape[1]:].numpy(), torch.__version__


def run_case(case: Case, *, new_tokens: int, repeats: int, skip_naive: bool) -> dict:
  model_cfg = model_config(case.preset or case.name)
  model = transformer.init_model(model_cfg, seed=0)
  graphdef, params, frozen = state_lib.split_model(model)
  tokens, mask = prompts(case, model_cfg.vocab_size)
  generated = case.batch * new_tokens
  r = {"name": case.name, "params": model_cfg.num_params(), "batch": case.batch,
       "prompt_len": case.prompt_len, "new_tokens": new_tokens}

  eng_s, eng_cpu, eng_compile, eng_out = run_engine(graphdef, params, frozen, tokens, mask,
                                                    new_tokens, repeats)
  r.update(engine_s=eng_s, engine_cpu_s=eng_cpu, engine_compile_s=eng_compile,
           engine_tok_s=generated / eng_s, engine_tok_cpu_s=generated / eng_cpu)
  print(f"  {case.name} B={case.batch} engine: {generated / eng_s:.1f} tok/s", file=sys.stderr)

  hf_s, hf_cpu, hf_out, torch_version = run_hf(params, model_cfg, tokens, mask, new_tokens,
                                               repeats)
  r.update(hf_s=hf_s, hf_cpu_s=hf_cpu, hf_tok_s=generated / hf_s, hf_tok_cpu_s=generated / hf_cpu,
           hf_agree=agreement(eng_out, hf_out), torch=torch_version)
  print(f"  {case.name} B={case.batch} hf: {generated / hf_s:.1f} tok/s", file=sys.stderr)

  if not skip_naive and case.naive_repeats:
    nv_s, nv_cpu, nv_compile, nv_out = run_naive(graphdef, params, frozen, tokens, mask,
                                                 new_tokens, min(repeats, case.naive_repeats))
    r.update(naive_s=nv_s, naive_cpu_s=nv_cpu, naive_compile_s=nv_compile,
             naive_tok_s=generated / nv_s, naive_tok_cpu_s=generated / nv_cpu,
             naive_agree=agreement(eng_out, nv_out), speedup_vs_naive=nv_s / eng_s,
             cpu_speedup_vs_naive=nv_cpu / eng_cpu)
    print(f"  {case.name} B={case.batch} naive: {generated / nv_s:.1f} tok/s", file=sys.stderr)
  r["speedup_vs_hf"] = hf_s / eng_s
  r["cpu_speedup_vs_hf"] = hf_cpu / eng_cpu
  return r


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--new-tokens", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--only", default="", help="comma-separated case names (demo, 100m)")
  ap.add_argument("--batch", type=int, default=0, help="override every case's batch")
  ap.add_argument("--skip-naive", action="store_true")
  ap.add_argument("--threads", type=int, default=0,
                  help="compute threads for JAX and torch (0: their defaults)")
  args = ap.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")

  cases = [c for c in CASES if not args.only or c.name in args.only.split(",")]
  if args.batch:
    cases = [dataclasses.replace(c, batch=args.batch) for c in cases]
  results = [run_case(c, new_tokens=args.new_tokens, repeats=args.repeats,
                      skip_naive=args.skip_naive) for c in cases]

  devices = jax.devices()
  cpu = platform.processor() or platform.machine()
  machine = f"{devices[0].platform} x{len(devices)} ({cpu}, {os.cpu_count()} cores)"
  threads = f"{THREADS} thread(s)" if THREADS else "default threads"
  print(f"\nGreedy generation, {args.new_tokens} new tokens per row, float32, {machine}, "
        f"{threads}; tok/s (wall) | tok/cpu-s")
  header = (f"{'model':<7}{'params':>8}{'B x P':>9}{'engine':>16}{'naive loop':>16}"
            f"{'transformers':>16}{'x naive':>12}{'x hf':>12}{'compile s':>10}"
            f"{'agree naive/hf':>16}")
  print(header)
  print("-" * len(header))
  pair = lambda a, b: f"{a:>9.1f} |{b:>6.1f}" if a is not None else f"{'-':>16}"
  for r in results:
    naive = "naive_tok_s" in r
    print(f"{r['name']:<7}{r['params'] / 1e6:>7.1f}M{r['batch']:>5} x {r['prompt_len']:<3}"
          + pair(r["engine_tok_s"], r["engine_tok_cpu_s"])
          + pair(r.get("naive_tok_s"), r.get("naive_tok_cpu_s"))
          + pair(r["hf_tok_s"], r["hf_tok_cpu_s"])
          + (f"{r['speedup_vs_naive']:>6.1f} |{r['cpu_speedup_vs_naive']:>4.1f}" if naive
             else f"{'-':>12}")
          + f"{r['speedup_vs_hf']:>6.1f} |{r['cpu_speedup_vs_hf']:>4.1f}"
          + f"{r['engine_compile_s']:>10.1f}"
          + (f"{100 * r['naive_agree']:>8.0f}%" if naive else f"{'-':>9}")
          + f"{100 * r['hf_agree']:>6.0f}%")
  print("JSON " + json.dumps({
      "bench": "generate", "date": time.strftime("%Y-%m-%d"), "machine": machine,
      "jax": jax.__version__, "threads": THREADS, "new_tokens": args.new_tokens,
      "repeats": args.repeats,
      "results": results}))


if __name__ == "__main__":
  main()
