"""jaxalign's CPU train step vs a plain PyTorch step of the same Llama, per computed token.

  python bench/cpu_step.py                 # default shapes, 3 rounds (~6 min on 2 cores)
  python bench/cpu_step.py --quick         # 2 rounds of 3 steps (~2-3 min)
  python bench/cpu_step.py --xla all       # also every XLA:CPU setting candidate (below)
  python bench/cpu_step.py --xla default,eigen_dots --vocab 8192
  python bench/cpu_step.py --baseline /work/main   # this checkout vs another, same run

Both sides run forward + backward + AdamW (global-norm clipping at 1.0, no weight
decay) of sigmoid DPO on precomputed reference log-probs, float32, on the same
`[2B, T]` batch shapes (B pairs of T tokens, every token real: computed tokens =
real tokens = 2 * B * T per step), the batch already in memory (no host data
handling timed):
  jaxalign: THE jitted step `jaxalign train` builds (`build.build_config` of
    bench/compare_trl.py's recipe), on one CPU device.
  torch: transformers' LlamaForCausalLM of the same shape (`config_to_hf`, SDPA
    attention, causal, no padding mask), full logits + log_softmax + gather,
    the same loss, `clip_grad_norm_` and `torch.optim.AdamW`.

Each side (and each XLA:CPU setting, `--xla`) is its own worker process, built
and warmed up first, then timed in `--rounds` interleaved rounds (the order
rotates each round), so a change of machine load hits all of them. Each worker
also measures a 2048^3 float32 matmul (its own framework, its own XLA flags) in
the same run. Printed: per worker the best and median step time, tokens/s and
the share of the matmul peak (6 * params FLOPs per token, the attention scores
not counted); per round the ratios against torch and against the default XLA
flags; the load average before and after. Last line: `JSON {...}` with every figure.

XLA:CPU settings (`--xla`, comma-separated names, or `all`): each runs with
XLA_FLAGS set to the default's plus its own flags (see XLA_VARIANTS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Candidate XLA:CPU settings (jaxlib 0.10.2; names from `strings` on libjax_common.so).
# This XLA already runs float32 dots as YNNPACK (XNNPACK's successor) library fusions
# ("ynn_fusion" thunks); --xla_cpu_use_xnnpack and the xnn fusion types change nothing
# in the compiled step here, so they are not candidates.
_YNN = "--xla_cpu_experimental_ynn_fusion_type="
XLA_VARIANTS = {
    "default": "",
    # No library fusions: dots through XLA's own Eigen calls.
    "eigen_dots": _YNN,
    # YNNPACK also fuses the elementwise ops around a dot, and reductions.
    "ynn_eltwise": _YNN + "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
    "ynn_eltwise_reduce": _YNN + ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                                  "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"),
    # Eigen's single-threaded matmuls (the program's thunks still run concurrently).
    "eigen1": "--xla_cpu_multi_thread_eigen=false",
    # The scheduler that favours running independent thunks concurrently.
    "concurrent": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    # Fast math (reassociation, approximate exp/log): changes numerics, never a default.
    "fastmath": "--xla_cpu_enable_fast_math=true",
}


def jaxalign_args(args) -> argparse.Namespace:
  """The argument namespace bench/compare_trl.py's jaxalign_config reads."""
  return argparse.Namespace(
      vocab=args.vocab, d_model=args.d_model, layers=args.layers, heads=args.heads,
      kv_heads=args.kv_heads, d_ff=args.d_ff, length=args.length,
      prompt_length=args.prompt_length, batch=args.batch)


def host_batches(args, vocab: int, n: int = 2):
  """n batches of B pairs x 2 x T random tokens, the response scored; numpy arrays."""
  import numpy as np
  rng = np.random.default_rng(0)
  B, T, P = args.batch, args.length, args.prompt_length
  out = []
  for _ in range(n):
    tokens = rng.integers(3, vocab, size=(B, 2, T), dtype=np.int32)
    tokens[:, 1, :P] = tokens[:, 0, :P]          # chosen and rejected share the prompt
    loss_mask = np.zeros((B, 2, T), np.int32)
    loss_mask[:, :, P:] = 1
    ref = np.full((B, 2), -float(T - P) * np.log(vocab), np.float32)
    out.append({"tokens": tokens, "attention_mask": np.ones((B, 2, T), np.int32),
                "loss_mask": loss_mask, "ref_logps": ref})
  return out


# --- workers (one framework each; a line protocol on stdin / stdout) ---------------

def jax_worker(args):
  """Builds jaxalign's step, compiles, warms up; then times `run N` requests.

  With CPU_STEP_ROOT set (--baseline), jaxalign and bench/compare_trl.py are
  imported from that checkout instead of this one."""
  sys.path.insert(0, os.environ.get("CPU_STEP_ROOT", ROOT))
  import jax
  import numpy as np

  from bench.compare_trl import jaxalign_config
  from jaxalign import sharding
  from jaxalign.train import build as build_lib, init

  config = jaxalign_config(jaxalign_args(args))
  for kv in args.set or ():
    key, value = kv.split("=", 1)
    sec, name = key.rsplit(".", 1)
    node = config
    for part in sec.split("."):
      node = node[part]
    node[name] = json.loads(value)
  built = build_lib.build_config(config, jax.devices()[:1])
  model_cfg = built.run_spec.model_cfg
  with jax.set_mesh(built.mesh):
    state = init.initial_state(built.run_spec, built, fresh=True)
    batches = [sharding.host_to_global(b, built.batch_sharding)
               for b in host_batches(args, model_cfg.vocab_size)]
    t0 = time.perf_counter()
    step = built.step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0

  def run(n):
    nonlocal state
    with jax.set_mesh(built.mesh):
      t0 = time.perf_counter()
      for i in range(n):
        state, metrics = step(state, batches[i % 2])
      jax.block_until_ready((state, metrics))
      return time.perf_counter() - t0, float(metrics["loss"])

  def peak(n=2048, reps=5):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), np.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), np.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best

  def profile(n):
    import glob
    import gzip
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
      jax.profiler.start_trace(tmp, create_perfetto_trace=False)
      seconds, _ = run(n)
      jax.profiler.stop_trace()
      trace = json.load(gzip.open(glob.glob(f"{tmp}/plugins/profile/*/*.trace.json.gz")[0]))
    return seconds / n, jax_categories(trace, step.as_text(), n, args.length, seconds / n)

  _serve(run, peak, {"framework": "jax", "version": jax.__version__,
                     "params": model_cfg.num_params(), "compile_s": compile_s,
                     "xla_flags": os.environ.get("XLA_FLAGS", "")}, args.warmup, profile)


# The LM head's matmul is counted with the others: in PyTorch it cannot be told from
# them by shape (2 * B * T = V = 2048 at the default shapes).
CATEGORIES = ("matmul: projections, MLP, LM head", "log-prob head, other",
              "attention (scores, softmax, mask)", "layout copies / transposes",
              "elementwise: norms, RoPE, activations", "optimizer: clip + AdamW",
              "runtime / host, not in an op")


def _frames_in(hlo: str, file_suffix: str) -> set[int]:
  """Stack frame ids of the compiled HLO text whose call stack passes through a
  source file ending in `file_suffix` (the module's FileNames / FileLocations /
  StackFrames tables)."""
  import re

  def table(name):
    m = re.search(rf"^{name}\n(.*?)(?:\n\n|\Z)", hlo, re.M | re.S)
    return m.group(1).splitlines() if m else []

  files = {int(line.split()[0]) for line in table("FileNames")
           if line.split(" ", 1)[1].strip('"').endswith(file_suffix)}
  locations = {int(line.split()[0]) for line in table("FileLocations")
               if int(re.search(r"file_name_id=(\d+)", line).group(1)) in files}
  parent, hit = {}, set()
  for line in table("StackFrames"):
    fid = int(line.split()[0])
    parent[fid] = int(re.search(r"parent_frame_id=(\d+)", line).group(1))
    if int(re.search(r"file_location_id=(\d+)", line).group(1)) in locations:
      hit.add(fid)
  out = set()
  for fid in parent:
    seen, f = set(), fid
    while f in parent and f not in seen:
      if f in hit:
        out.add(fid)
        break
      seen.add(f)
      f = parent[f]
  return out


def jax_categories(trace: dict, hlo: str, steps: int, T: int, step_s: float) -> dict:
  """Per-step milliseconds by category from a jax.profiler trace of the CPU step.

  Needs XLA_FLAGS --xla_cpu_enable_xprof_traceme=true (one event per thunk); each
  thunk is matched to its HLO instruction in the compiled text for its op_name.
  Attention: a dot, or any op not a copy, traced from jaxalign/models/attention.py
  (the stack frames in the HLO), or named by the einsums of the pre-issue-29 kernel,
  or with two axes of length T."""
  import re
  attention_frames = _frames_in(hlo, "jaxalign/models/attention.py")
  info = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", hlo, re.M):
    name, shape, op, rest = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    frame = re.search(r"stack_frame_id=(\d+)", rest)
    in_attention = ((frame is not None and int(frame.group(1)) in attention_frames)
                    or (op_name is not None and re.search(r"bgrts|bsgk|btgrk", op_name.group(1))))
    info[name] = (shape, op, op_name.group(1) if op_name else "", bool(in_attention))
  events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
  ms = dict.fromkeys(CATEGORIES, 0.0)
  for e in events:
    if e["name"] not in info:
      continue
    shape, op, op_name, in_attention = info[e["name"]]
    is_dot = "dot_general" in op_name and (e["name"].startswith(("ynn", "xnn", "dot"))
                                           or op in ("dot", "custom-call"))
    is_copy = op in ("copy", "transpose") or e["name"].startswith(("copy", "transpose"))
    dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])]
    if "/while/" in op_name:
      cat = "matmul: projections, MLP, LM head" if is_dot else "log-prob head, other"
    elif "jvp(" not in op_name and "transpose(" not in op_name:
      cat = "optimizer: clip + AdamW"           # after the gradient: clipping, update, metrics
    elif is_dot:
      cat = ("attention (scores, softmax, mask)" if in_attention
             else "matmul: projections, MLP, LM head")
    elif dims.count(T) >= 2 or (in_attention and not is_copy):
      cat = "attention (scores, softmax, mask)"
    elif is_copy:
      cat = "layout copies / transposes"
    else:
      cat = "elementwise: norms, RoPE, activations"
    ms[cat] += e["dur"] / 1e3 / steps
  ms["runtime / host, not in an op"] = max(step_s * 1e3 - sum(ms.values()), 0.0)
  return ms


def torch_worker(args):
  """A plain PyTorch DPO step of the same Llama; then times `run N` requests."""
  sys.path.insert(0, ROOT)
  import torch
  import torch.nn.functional as F
  from torch.profiler import record_function
  from transformers import LlamaConfig, LlamaForCausalLM

  from bench.compare_trl import jaxalign_config
  from jaxalign import config as config_lib
  from jaxalign.models.hf_config import config_to_hf

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  model_cfg = config_lib.model_config(jaxalign_config(jaxalign_args(args)))
  hf = dict(config_to_hf(model_cfg, "LlamaForCausalLM"))
  for k in ("architectures", "torch_dtype", "dtype"):
    hf.pop(k, None)
  model = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa")).float().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.0)
  batches = []
  for b in host_batches(args, model_cfg.vocab_size):
    B, _, T = b["tokens"].shape
    batches.append({"tokens": torch.from_numpy(b["tokens"]).long().reshape(2 * B, T),
                    "loss_mask": torch.from_numpy(b["loss_mask"]).float().reshape(2 * B, T),
                    "ref": torch.from_numpy(b["ref_logps"])})

  def one_step(b):
    logits = model(input_ids=b["tokens"]).logits.float()
    with record_function("head"):
      logp = torch.log_softmax(logits[:, :-1], dim=-1)
      tok = logp.gather(-1, b["tokens"][:, 1:, None]).squeeze(-1)
    seq = (tok * b["loss_mask"][:, 1:]).sum(-1).reshape(-1, 2)
    margin = (seq[:, 0] - b["ref"][:, 0]) - (seq[:, 1] - b["ref"][:, 1])
    loss = -F.logsigmoid(0.1 * margin).mean()
    loss.backward()
    with record_function("optimizer"):
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
    return loss.detach()

  def run(n):
    t0 = time.perf_counter()
    for i in range(n):
      loss = one_step(batches[i % 2])
    return time.perf_counter() - t0, float(loss)

  def peak(n=2048, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      a @ b
      best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best

  def profile(n):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
      t0 = time.perf_counter()
      for i in range(n):
        b = batches[i % 2]
        with record_function("step"):
          one_step(b)
      seconds = time.perf_counter() - t0
    return seconds / n, torch_categories(prof.events(), n, seconds / n)

  _serve(run, peak, {"framework": "torch", "version": torch.__version__,
                     "threads": torch.get_num_threads(),
                     "params": sum(p.numel() for p in model.parameters()), "compile_s": 0.0},
         args.warmup, profile)


def torch_categories(events, steps: int, step_s: float) -> dict:
  """Per-step milliseconds by category (self CPU time of each op) from torch.profiler events."""
  ms = dict.fromkeys(CATEGORIES, 0.0)
  for e in events:
    if e.name in ("step", "head", "optimizer") or e.name.startswith("ProfilerStep"):
      continue
    t = e.self_cpu_time_total / 1e3 / steps
    parents, p = set(), e.cpu_parent
    while p is not None:
      parents.add(p.name)
      p = p.cpu_parent
    name = e.name
    attention = "scaled_dot_product" in name or "flash_attention" in name or any(
        "scaled_dot_product" in q or "flash_attention" in q for q in parents)
    is_mm = name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    if "optimizer" in parents or "Optimizer" in name:
      cat = "optimizer: clip + AdamW"
    elif attention:
      cat = "attention (scores, softmax, mask)"
    elif "head" in parents or "log_softmax" in name or "LogSoftmax" in name or name in (
        "aten::gather", "aten::scatter_add_", "aten::scatter_add", "GatherBackward0"):
      cat = "log-prob head, other"
    elif is_mm:
      cat = "matmul: projections, MLP, LM head"
    elif name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat",
                  "aten::_to_copy", "aten::to", "aten::transpose", "aten::t"):
      cat = "layout copies / transposes"
    else:
      cat = "elementwise: norms, RoPE, activations"
    ms[cat] += t
  ms["runtime / host, not in an op"] = max(step_s * 1e3 - sum(ms.values()), 0.0)
  return ms


def _serve(run, peak, info, warmup, profile):
  """READY after the warm-up steps; then `run N` -> TIME, `peak` -> PEAK,
  `profile N` -> PROFILE (step seconds and ms per category), `quit`."""
  run(warmup)
  print("READY " + json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
      return
    if cmd[0] == "run":
      seconds, loss = run(int(cmd[1]))
      print("TIME " + json.dumps({"seconds": seconds, "loss": loss}), flush=True)
    elif cmd[0] == "peak":
      print("PEAK " + json.dumps({"flops": peak()}), flush=True)
    elif cmd[0] == "profile":
      step_s, ms = profile(int(cmd[1]))
      print("PROFILE " + json.dumps({"step_s": step_s, "ms": ms}), flush=True)


# --- the driver -----------------------------------------------------------------

class Worker:
  def __init__(self, name: str, argv: list[str], env: dict):
    self.name = name
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=ROOT)
    self.info = self._read("READY")
    self.times: list[float] = []
    self.peaks: list[float] = []
    self.loss = None

  def _read(self, tag: str) -> dict:
    for line in self.proc.stdout:
      if line.startswith(tag + " "):
        return json.loads(line[len(tag) + 1:])
    raise SystemExit(f"worker {self.name} exited ({self.proc.wait()}) before {tag}")

  def ask(self, cmd: str, tag: str) -> dict:
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()
    return self._read(tag)

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except BrokenPipeError:
      pass
    self.proc.wait()


def _shape_argv(args) -> list[str]:
  return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
      "batch", "length", "prompt_length", "vocab", "d_model", "layers", "heads", "kv_heads",
      "d_ff", "warmup")]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="2 rounds of 3 steps (~2-3 min)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=8, help="pairs per step")
  ap.add_argument("--length", type=int, default=128)
  ap.add_argument("--prompt-length", type=int, default=32)
  ap.add_argument("--vocab", type=int, default=2048)
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv-heads", type=int, default=2)
  ap.add_argument("--d-ff", type=int, default=688)
  ap.add_argument("--xla", default="default",
                  help="comma-separated XLA:CPU settings to time (names of XLA_VARIANTS) or 'all'")
  ap.add_argument("--baseline", metavar="DIR",
                  help="also time jaxalign from another checkout (e.g. a main worktree) with "
                       "the default XLA flags: jaxalign[baseline]")
  ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                  help="after the timing, profile this many steps of jaxalign (default flags, "
                       "and the baseline if given) and torch; print ms per category")
  ap.add_argument("--no-torch", action="store_true", help="time jaxalign only")
  ap.add_argument("--set", action="append", metavar="KEY=JSON",
                  help="a config override for every jaxalign worker, e.g. logprob_chunk_size=1024")
  ap.add_argument("--_worker", dest="worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker == "jax":
    return jax_worker(args)
  if args.worker == "torch":
    return torch_worker(args)
  if args.quick:
    args.steps, args.rounds, args.warmup = 3, 2, 1

  names = list(XLA_VARIANTS) if args.xla == "all" else args.xla.split(",")
  unknown = [n for n in names if n not in XLA_VARIANTS]
  if unknown:
    ap.error(f"unknown --xla settings {unknown}; known: {sorted(XLA_VARIANTS)}")
  load_before = os.getloadavg()
  base_env = dict(os.environ, JAX_PLATFORMS="cpu")
  base_flags = base_env.get("XLA_FLAGS", "")
  extra = [f"--set={s}" for s in args.set or ()]
  workers = []
  for name in names:
    env = dict(base_env, XLA_FLAGS=f"{base_flags} {XLA_VARIANTS[name]}".strip())
    print(f"building jaxalign [{name}] ...", file=sys.stderr)
    workers.append(Worker(f"jaxalign[{name}]", ["--_worker=jax"] + _shape_argv(args) + extra,
                          env))
  if args.baseline:
    print(f"building jaxalign [baseline] from {args.baseline} ...", file=sys.stderr)
    env = dict(base_env, CPU_STEP_ROOT=os.path.abspath(args.baseline),
               PYTHONPATH=os.path.abspath(args.baseline))
    workers.append(Worker("jaxalign[baseline]", ["--_worker=jax"] + _shape_argv(args) + extra,
                          env))
  if not args.no_torch:
    print("building torch ...", file=sys.stderr)
    workers.append(Worker("torch", ["--_worker=torch"] + _shape_argv(args), base_env))

  tokens = 2 * args.batch * args.length * args.steps
  for r in range(args.rounds):
    order = workers[r % len(workers):] + workers[:r % len(workers)]
    for w in order:
      got = w.ask(f"run {args.steps}", "TIME")
      w.times.append(got["seconds"] / args.steps)
      w.loss = got["loss"]
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{w.name} {w.times[-1] * 1e3:.0f} ms" for w in workers), file=sys.stderr)
  for w in workers:          # the peaks after the timing, twice each, interleaved
    w.peaks.append(w.ask("peak", "PEAK")["flops"])
  for w in reversed(workers):
    w.peaks.append(w.ask("peak", "PEAK")["flops"])
  profiles = {}
  if args.profile:
    specs = [("jaxalign", {}, _shape_argv(args) + extra)]
    if args.baseline:
      specs.append(("jaxalign[baseline]", {"CPU_STEP_ROOT": os.path.abspath(args.baseline),
                                           "PYTHONPATH": os.path.abspath(args.baseline)},
                    _shape_argv(args) + extra))
    for label, env_extra, argv_w in specs:
      flags = f"{base_flags} --xla_cpu_enable_xprof_traceme=true".strip()
      w = Worker(label, ["--_worker=jax"] + argv_w, dict(base_env, XLA_FLAGS=flags, **env_extra))
      profiles[label] = w.ask(f"profile {args.profile}", "PROFILE")
      w.close()
    if not args.no_torch:
      profiles["torch"] = workers[-1].ask(f"profile {args.profile}", "PROFILE")
  for w in workers:
    w.close()
  load_after = os.getloadavg()

  print(f"\nDPO step, forward + backward + AdamW, float32, CPU ({os.cpu_count()} cores): "
        f"{args.batch} pairs x 2 x {args.length} tokens (all real), d_model {args.d_model}, "
        f"{args.layers} layers, vocab {args.vocab}; {args.rounds} interleaved rounds of "
        f"{args.steps} steps after {args.warmup} warm-up")
  header = (f"{'worker':<24}{'params':>8}{'best ms':>9}{'median ms':>10}{'tok/s':>8}"
            f"{'peak GFLOP/s':>13}{'% peak':>7}{'compile s':>10}{'loss':>8}")
  print(header)
  print("-" * len(header))
  results = []
  for w in workers:
    best, med, peak = min(w.times), statistics.median(w.times), max(w.peaks)
    n = w.info["params"]
    r = {"name": w.name, **w.info, "step_s": w.times, "best_step_s": best,
         "median_step_s": med, "tokens_per_s": tokens / args.steps / best,
         "peak_flops": w.peaks, "frac_of_peak": 6 * n * tokens / args.steps / best / peak,
         "loss": w.loss}
    results.append(r)
    print(f"{w.name:<24}{n / 1e6:>7.2f}M{best * 1e3:>9.1f}{med * 1e3:>10.1f}"
          f"{r['tokens_per_s']:>8.0f}{peak / 1e9:>13.1f}{100 * r['frac_of_peak']:>6.1f}%"
          f"{w.info['compile_s']:>10.1f}{w.loss:>8.4f}")
  ratios = {}

  def ratio_line(label, num, den):
    per_round = [d / n for n, d in zip(num.times, den.times)]   # tokens/s ratio num / den
    ratios[label] = {"median": statistics.median(per_round), "rounds": per_round}
    print(f"{label}: {statistics.median(per_round):.3f}x tokens/s (median of rounds: "
          + ", ".join(f"{x:.3f}" for x in per_round) + ")")

  torch_w = None if args.no_torch else workers[-1]
  jax_ws = workers[:-1] if torch_w else workers
  for w in jax_ws:
    if torch_w:
      ratio_line(f"{w.name} / torch", w, torch_w)
  default = next((w for w in jax_ws if w.name == "jaxalign[default]"), None)
  for w in jax_ws:
    if default and w is not default and w.name != "jaxalign[baseline]":
      ratio_line(f"{w.name} / jaxalign[default]", w, default)
  base = next((w for w in jax_ws if w.name == "jaxalign[baseline]"), None)
  if default and base:
    ratio_line("jaxalign[default] / jaxalign[baseline]", default, base)
  if profiles:
    labels = list(profiles)
    print(f"\nprofile of {args.profile} steps (ms per step, share of the step):")
    print(f"{'category':<40}" + "".join(f"{x:>24}" for x in labels))
    cats = list(next(iter(profiles.values()))["ms"])
    for cat in cats + ["step (wall)"]:
      row = f"{cat:<40}"
      for x in labels:
        step_ms = profiles[x]["step_s"] * 1e3
        v = step_ms if cat == "step (wall)" else profiles[x]["ms"][cat]
        row += f"{v:>15.1f} ({100 * v / step_ms:4.1f}%)"
      print(row)
  print(f"load average {load_before[0]:.2f}, {load_before[1]:.2f}, {load_before[2]:.2f} before; "
        f"{load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f} after "
        f"({os.cpu_count()} cores)")
  print("JSON " + json.dumps({
      "bench": "cpu_step", "date": time.strftime("%Y-%m-%d %H:%M"),
      "args": {k: v for k, v in vars(args).items() if k != "worker"},
      "results": results, "ratios": ratios, "profiles": profiles, "loadavg_before": load_before,
      "loadavg_after": load_after}))


if __name__ == "__main__":
  main()
