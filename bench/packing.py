"""Padded vs packed DPO steps on preference-shaped lengths: real tokens/s and MFU.

  python bench/packing.py                 # CPU, both cases, ~6 min on 2 busy cores
  python bench/packing.py --case pairs    # DPO pairs: padded vs packed vs packed+shared
  python bench/packing.py --case grao     # GRAO groups: unshared vs shared vs packed+shared
  python bench/packing.py --case pairs --trl-python /work/venv-trl/bin/python
                                          # + the same batches through TRL's DPOTrainer
  python bench/packing.py --case pairs --layouts packed+shared --rounds 1 --profile 2
                                          # + ms per category of each layout's step

Not a test: it prints figures. Every layout runs THE jitted step (one
`jaxalign.train.build.build_config` of the case's recipe: the step `jaxalign
train` runs, which reads the layout from the batch) on the same examples, in the same
process, interleaved in rounds (padded block, packed block, ...) so a change
of machine load hits both; the ratio is the median over rounds.

Lengths. Prompt and response lengths (tokens) are drawn from log-normal
distributions fitted to the mean lengths UltraFeedback's paper reports for its
data (Cui et al. 2023, arXiv 2310.01377, Table 1: prompts ~185 tokens,
responses ~306 tokens on average), with a long right tail (sigma 0.9 for
prompts, 0.75 for responses; real preference sets span 10-50x within a batch).
The recipe truncates the way jaxalign's tokenizer does: prompt <= 512, prompt +
response <= 1024. On CPU everything is scaled by `--scale` (default 1/4: T =
256, prompts <= 128), which keeps the ratios of the lengths. Chosen and
rejected draw their own response lengths and share the prompt. Tokens are
random ids; each sequence ends with EOS (id vocab - 1).

TRL (--trl-python, pairs case). The same batches, in the same order, run
through TRL's DPOTrainer in a separate environment's python (bench/compare_trl.py's
worker: no jax there; `python -m venv V && V/bin/pip install torch==2.13.0 trl`):
the same token ids, the same model shape (jaxalign.models.hf_config.config_to_hf,
LlamaForCausalLM), float32, the reference log-probs precomputed, the same pairs
per step, and TRL's default collator, which pads each batch to its longest
sequence. One TRL run per round, after the jaxalign layouts' blocks, each its
own process (PyTorch warms up on every batch once, then times a block of the
same steps jaxalign times). Its real tokens are counted on the policy's
forwards and checked against the batches'.

Figures (per layout):
  tokens/s real: non-padding tokens of the sequences per second, as the padded
    layout holds them (with a shared prompt, the prompt still counts once per
    sequence: the work a user asked for).
  MFU real: model FLOPs of the real tokens the forward runs (a shared prompt
    once; jaxalign.flops.model_flops per sequence or prompt, attention
    included) per second / a matmul peak measured in this run (float32,
    n = 2048).
  computed tokens: tokens the step's forward runs over (rows x row length; TRL:
    rows x the batch's longest).
  ratios (with TRL): each jaxalign layout's real tokens/s over TRL's, the median
    over rounds of the per-round ratio.
Output: a table, `uptime`, then one line `JSON {...}`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import compare_trl
from jaxalign import config as config_lib, flops, sharding
from jaxalign.data import packing
from jaxalign.train import build as build_lib, init

PROMPT_MEAN, RESPONSE_MEAN = 185.0, 306.0     # UltraFeedback, tokens (see docstring)
PROMPT_SIGMA, RESPONSE_SIGMA = 0.9, 0.75
MAX_LENGTH, MAX_PROMPT = 1024, 512


def lognormal(rng, mean, sigma, size):
  """Log-normal draws with the given mean (mu = log(mean) - sigma^2 / 2), at least 1."""
  mu = np.log(mean) - sigma ** 2 / 2
  return np.maximum(1, np.round(rng.lognormal(mu, sigma, size))).astype(np.int64)


def preference_examples(n: int, *, scale: float, vocab: int, seed: int) -> list[dict]:
  """n tokenized pairs ([2, T] tokens/attention_mask/loss_mask) of preference-shaped lengths."""
  rng = np.random.default_rng(seed)
  T, P = int(MAX_LENGTH * scale), int(MAX_PROMPT * scale)
  prompt = np.minimum(lognormal(rng, PROMPT_MEAN * scale, PROMPT_SIGMA, n), P)
  response = np.minimum(lognormal(rng, RESPONSE_MEAN * scale, RESPONSE_SIGMA, (n, 2)),
                        T - prompt[:, None])
  pos = np.arange(T)
  out = []
  for i in range(n):
    lengths = prompt[i] + response[i]                                      # [2]
    attention = (pos < lengths[:, None]).astype(np.int32)
    loss_mask = (attention.astype(bool) & (pos >= prompt[i])).astype(np.int32)
    # Ids below vocab - 2 (compare_trl's word tokenizer: vocab - 2 pad, vocab - 1 EOS).
    tokens = rng.integers(3, vocab - 2, size=(2, T), dtype=np.int32)
    tokens[1, :prompt[i]] = tokens[0, :prompt[i]]                          # one prompt
    tokens[np.arange(2), lengths - 1] = vocab - 1                          # EOS
    tokens *= attention
    ref = (-np.log(vocab) * loss_mask[:, 1:].sum(-1)).astype(np.float32)
    out.append({"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask,
                "ref_logps": ref})
  return out


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), np.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
  return 2 * n ** 3 / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def model_config(T: int, batch: int, prompt: int, loss: str):
  """The recipe timed: `loss` with precomputed reference log-probs, lr 1e-6 after one
  warm-up step of a 1000-step cosine schedule, on one device."""
  c = config_lib.defaults()
  c.model.preset = "tiny"
  c.model.overrides.update(dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=4,
                                n_kv_heads=2, head_dim=64, d_ff=768, max_seq_len=T))
  c.data.max_length, c.data.max_prompt_length = T, prompt
  c.data.batch_size = batch
  c.mesh.shape = (1, 1, 1)
  c.loss.name = loss
  c.loss.hparams = {"beta": 0.1} if loss == "dpo" else {}
  c.reference.mode = "precompute"
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 1
  c.total_steps = 1000
  config_lib.validate(c, 1)
  return c


def time_layouts(c, layouts: dict[str, list[dict]], *, steps: int, rounds: int,
                 external: dict[str, Callable[[], float]] | None = None,
                 profile: int = 0, profiles: dict | None = None) -> dict:
  """Seconds per block of `steps` steps of THE jitted step, per layout, per round.

  `external`: name -> a function that times a block of the same steps elsewhere
  (TRL) and returns its seconds; called once per round after the layouts.
  `profile` > 0: after the rounds, each layout's step on its first batch is
  profiled for that many steps into `profiles` (name -> ms per step by category,
  bench/cpu_step.py's jax_categories; needs the traceme flag main() sets).
  """
  external = external or {}
  built = build_lib.build_config(c, jax.devices()[:1])
  step_fn = built.step_fn
  times = {name: [] for name in (*layouts, *external)}
  with jax.set_mesh(built.mesh):
    state = init.initial_state(built.run_spec, built, fresh=True)
    on_device = {name: [sharding.host_to_global(b, built.batch_sharding) for b in bs]
                 for name, bs in layouts.items()}
    for bs in on_device.values():   # compile every shape (packed: each bucket used)
      for b in bs:
        state, m = step_fn(state, b)
      jax.block_until_ready(m)
    for _ in range(rounds):
      for name, bs in on_device.items():
        t0 = time.perf_counter()
        for i in range(steps):
          state, m = step_fn(state, bs[i % len(bs)])
        jax.block_until_ready(m)
        times[name].append(time.perf_counter() - t0)
      for name, run in external.items():
        times[name].append(run())
    if profile:
      for name, bs in on_device.items():
        state, profiles[name] = _profile_step(step_fn, state, bs[0], profile)
  return times


def _profile_step(step_fn, state, batch, steps: int):
  """(state, {category: ms per step, "step (wall)": ms}) of `steps` profiled steps."""
  import glob
  import gzip
  from bench import cpu_step
  hlo = step_fn.lower(state, batch).compile().as_text()
  T = (batch["packed_tokens"] if "packed_tokens" in batch else batch["tokens"]).shape[-1]
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=False)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(glob.glob(f"{tmp}/plugins/profile/*/*.trace.json.gz")[0]))
  return state, {**cpu_step.jax_categories(trace, hlo, steps, T, step_s),
                 "step (wall)": step_s * 1e3}


def _print_profiles(profiles: dict, steps: int) -> None:
  names = list(profiles)
  print(f"profile of {steps} steps on each layout's first batch (ms per step, share of the "
        "thunks' sum; thunks can overlap, so the sum may exceed the wall):")
  print(f"{'category':40}" + "".join(f"{n:>22}" for n in names))
  cats = [k for k in next(iter(profiles.values())) if k != "step (wall)"]
  for cat in (*cats, "step (wall)"):
    cells = []
    for n in names:
      total = sum(v for k, v in profiles[n].items() if k not in ("step (wall)",) and
                  not k.startswith("runtime"))
      v = profiles[n][cat]
      cells.append(f"{v:10.1f}" + (f" ({v / total:5.1%})" if cat != "step (wall)" and
                                   not cat.startswith("runtime") else " " * 9))
    print(f"{cat[:40]:40}" + "".join(f"{x:>22}" for x in cells))


def trl_timer(trl_python: str, c, padded: list[dict], *, steps: int, tmp: str
              ) -> tuple[Callable[[], float], list[dict]]:
  """(run, results): `run()` times the block of `steps` steps over `padded` (batch
  i % len(padded) at step i, as time_layouts does) in one TRL DPOTrainer run
  (compare_trl's worker, in `trl_python`) and returns its seconds; `results`
  collects each run's RESULT dict.

  The dataset is the batches in step order: every batch once (PyTorch's warm-up,
  as time_layouts' compile pass), then the timed block; TRL runs it in order.
  """
  from jaxalign.models.hf_config import config_to_hf
  n, T = len(padded), c.data.max_length
  order = list(range(n)) + [i % n for i in range(steps)]
  prompt, chosen, rejected, p_len, c_len, r_len = [], [], [], [], [], []
  for i in order:
    b = padded[i]
    for tokens, lengths, loss in zip(b["tokens"], b["attention_mask"].sum(-1), b["loss_mask"]):
      p = int(np.argmax(loss[0]))           # the first scored token: the prompt's end
      assert p == int(np.argmax(loss[1])) and p > 0
      pad = lambda x: np.pad(x, (0, T - len(x)))
      prompt.append(pad(tokens[0, :p]))
      chosen.append(pad(tokens[0, p:lengths[0]]))
      rejected.append(pad(tokens[1, p:lengths[1]]))
      p_len.append(p)
      c_len.append(lengths[0] - p)
      r_len.append(lengths[1] - p)
  data_path = os.path.join(tmp, "trl_data.npz")
  np.savez(data_path, prompt=np.stack(prompt), chosen=np.stack(chosen),
           rejected=np.stack(rejected), prompt_len=np.array(p_len),
           chosen_len=np.array(c_len), rejected_len=np.array(r_len))
  spec_path = os.path.join(tmp, "trl_spec.json")
  json.dump({"hf_config": config_to_hf(config_lib.model_config(c), "LlamaForCausalLM"),
             "data": data_path, "vocab": c.model.overrides.vocab_size,
             "batch": c.data.batch_size, "length": T, "warmup": n, "steps": steps},
            open(spec_path, "w"))
  want = [int(padded[i % n]["attention_mask"].sum()) for i in range(steps)]
  results: list[dict] = []

  def run() -> float:
    r = compare_trl.run_trl(trl_python, spec_path)
    if r["real_tokens_per_step"] != want:
      sys.exit(f"TRL's timed steps saw {r['real_tokens_per_step']} real tokens, the "
               f"batches hold {want}")
    results.append(r)
    return r["timed_seconds"]

  return run, results


def _stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _computed_lengths(b) -> np.ndarray:
  """Real tokens of each part the forward runs: a shared prompt counts once, then
  each response on its own (its attention to the prompt is not counted)."""
  if packing.is_shared(b):
    return np.concatenate([b["shared_prompt_mask"].sum(-1),
                           b["shared_response_mask"].sum(-1).reshape(-1)])
  if packing.is_packed_shared(b):   # parts: (row, segment, part id 0 = prompt / s + 1)
    real = b["packed_attention_mask"].astype(bool)
    part = b["packed_segment_ids"] * (int(b["packed_part_ids"].max()) + 1) \
        + b["packed_part_ids"]
    rows = zip(real.reshape(-1, real.shape[-1]), part.reshape(-1, part.shape[-1]))
    return np.concatenate([np.unique(p[r], return_counts=True)[1] for r, p in rows])
  return packing.sequence_lengths(b).reshape(-1)


def _summary(c, padded, layouts, times, *, steps, peak,
             external_computed: dict[str, float] | None = None) -> dict:
  """Per layout: step s, real tokens/s, MFU real, computed tokens per step.

  `external_computed`: name -> computed tokens per step of a run outside this
  process (TRL) on the `padded` batches (its model FLOPs: theirs, real tokens).
  """
  model_cfg = config_lib.model_config(c)
  per_block = lambda v: sum(v[i % len(v)] for i in range(steps))
  real = per_block([int(b["attention_mask"].sum()) for b in padded])
  out = {}
  for name, bs in layouts.items():
    best = float(np.median(times[name]))
    model_flops = per_block([flops.model_flops(model_cfg, _computed_lengths(b)) for b in bs])
    computed = [sum(int(np.prod(np.shape(b[k]))) for k in
                    ("tokens", "packed_tokens", "shared_prompt", "shared_response") if k in b)
                for b in bs]
    out[name] = {"step_s": best / steps, "tokens_per_s_real": real / best,
                 "mfu_real": model_flops / best / peak,
                 "computed_tokens_per_step": float(np.mean(computed))}
  for name, computed in (external_computed or {}).items():
    best = float(np.median(times[name]))
    model_flops = per_block([flops.model_flops(model_cfg, _computed_lengths(b)) for b in padded])
    out[name] = {"step_s": best / steps, "tokens_per_s_real": real / best,
                 "mfu_real": model_flops / best / peak, "computed_tokens_per_step": computed}
  return out


def _print_table(result, names):
  print(f"{'layout':14} {'step s':>8} {'real tok/s':>11} {'MFU real':>9} {'computed tok':>13}")
  for name in names:
    r = result[name]
    print(f"{name:14} {r['step_s']:8.3f} {r['tokens_per_s_real']:11.0f} {r['mfu_real']:9.2%} "
          f"{r['computed_tokens_per_step']:13.0f}")


# Layouts of the pairs case: name -> (padded host batches, packers) -> its batches;
# packers: "packed" / "packed+shared" -> make_packer's pack. A new layout is one
# entry here and a name in --layouts.
PAIR_LAYOUTS: dict[str, Callable[[list[dict], dict], list[dict]]] = {
    "padded": lambda padded, packers: padded,
    "packed": lambda padded, packers: [packers["packed"](b) for b in padded],
    "packed+shared": lambda padded, packers: [packers["packed+shared"](b) for b in padded],
}


def pairs_case(args, peak) -> dict:
  """DPO pairs of UltraFeedback-shaped lengths: padded vs packed (vs TRL)."""
  T, P = int(MAX_LENGTH * args.scale), int(MAX_PROMPT * args.scale)
  c = model_config(T, args.batch, P, "dpo")
  examples = preference_examples(args.batch * 64, scale=args.scale, vocab=2048, seed=0)
  sample = packing.sample_examples(examples, seed=0)
  specs, packers = {}, {}
  for name, prompts in (("packed", None),
                        ("packed+shared", packing.example_prompt_lengths(sample))):
    specs[name], packers[name] = packing.make_packer(
        packing.length_sample(sample, seed=0), process_batch=args.batch, num_groups=1,
        global_groups=1, row_length=T, num_buckets=args.buckets, seed=0, pad_id=0,
        prompts=prompts)
  padded = [_stack(examples[i * args.batch:(i + 1) * args.batch]) for i in range(args.batches)]
  names = args.layouts.split(",")
  if "padded" not in names:
    names = ["padded", *names]     # every ratio is against it
  unknown = set(names) - set(PAIR_LAYOUTS)
  if unknown:
    sys.exit(f"--layouts: unknown {sorted(unknown)}; known {sorted(PAIR_LAYOUTS)}")
  layouts = {name: PAIR_LAYOUTS[name](padded, packers) for name in names}
  with tempfile.TemporaryDirectory() as tmp:
    external, trl_runs = {}, []
    if args.trl_python:
      external["trl"], trl_runs = trl_timer(args.trl_python, c, padded, steps=args.steps,
                                            tmp=tmp)
    profiles: dict = {}
    times = time_layouts(c, layouts, steps=args.steps, rounds=args.rounds, external=external,
                         profile=args.profile, profiles=profiles)
  lengths = np.concatenate([b["attention_mask"].sum(-1).reshape(-1) for b in padded])
  rows = {name: [int(np.prod(b["packed_tokens"].shape[:2])) if "packed_tokens" in b
                 else int(np.prod(b["tokens"].shape[:2])) for b in bs]
          for name, bs in layouts.items()}
  trl_computed = ({"trl": float(np.mean([x for r in trl_runs
                                         for x in r["computed_tokens_per_step"]]))}
                  if trl_runs else None)
  result = {"distribution": {"prompt_mean": PROMPT_MEAN * args.scale,
                             "response_mean": RESPONSE_MEAN * args.scale, "T": T,
                             "real_fraction": float(lengths.sum() / (len(lengths) * T)),
                             "len_p5_p50_p95": [int(x) for x in
                                                np.percentile(lengths, [5, 50, 95])]},
            "buckets": {k: list(v.buckets) for k, v in specs.items()},
            "batch_pairs": args.batch, "rows_per_step": rows,
            "times": times,
            **_summary(c, padded, layouts, times, steps=args.steps, peak=peak,
                       external_computed=trl_computed)}
  ratio = lambda a, b: [x / y for x, y in zip(times[b], times[a])]  # a/b tok/s
  print(f"[pairs] lengths: prompt mean {PROMPT_MEAN * args.scale:.0f}, response mean "
        f"{RESPONSE_MEAN * args.scale:.0f}, T {T}; real tokens "
        f"{result['distribution']['real_fraction']:.1%} of the padded layout; p5/p50/p95 "
        f"sequence length {result['distribution']['len_p5_p50_p95']}")
  print("buckets (rows per step): " + "; ".join(
      f"{k} {list(v.buckets)}" for k, v in specs.items()) + f" of {2 * args.batch} padded rows")
  _print_table(result, (*layouts, *external))
  pairs = [(name, "padded") for name in layouts if name != "padded"]
  if trl_runs:
    r = trl_runs[0]
    print(f"trl: TRL {r['trl']}, torch {r['torch']}, {r['threads']} threads, "
          f"{r['params'] / 1e6:.2f}M params (jaxalign "
          f"{config_lib.model_config(c).num_params() / 1e6:.2f}M); padding "
          f"{np.mean([x['padding_fraction'] for x in trl_runs]):.1%} of its computed tokens")
    pairs += [(name, "trl") for name in layouts]
  result["ratios"] = {}
  for a, b in pairs:
    rs = ratio(a, b)
    result["ratios"][f"{a}/{b}"] = {"median": float(np.median(rs)), "rounds": rs}
    print(f"{a} / {b} real tokens/s: {np.median(rs):.2f}x (median of {args.rounds} rounds: "
          f"{', '.join(f'{x:.2f}' for x in rs)})")
  if profiles:
    result["profiles"] = profiles
    _print_profiles(profiles, args.profile)
  result["speedup_median"] = result["ratios"]["packed/padded"]["median"] \
      if "packed/padded" in result["ratios"] else None
  return result


def grao_case(args, peak) -> dict:
  """GRAO-shaped groups (reference answer + G samples, one prompt): unshared vs shared.

  Full size: G = 8, 512-token prompts, 128-token samples; scaled by --scale.
  """
  G, P, R = 8, int(512 * args.scale), int(128 * args.scale)
  T, B = P + R, args.group_batch
  c = model_config(T, B, P, "grao")
  rng = np.random.default_rng(1)
  pos = np.arange(T)

  def batch():
    prompt = rng.integers(3, 2048, size=(B, 1, P))
    tokens = np.concatenate([np.repeat(prompt, G + 1, axis=1),
                             rng.integers(3, 2048, size=(B, G + 1, R))], axis=-1)
    return {"tokens": tokens.astype(np.int32),
            "attention_mask": np.ones((B, G + 1, T), np.int32),
            "loss_mask": np.broadcast_to(pos >= P, (B, G + 1, T)).astype(np.int32),
            "group_mask": np.ones((B, G), np.int32),
            "rewards": rng.uniform(size=(B, G)).astype(np.float32)}

  padded = [batch() for _ in range(args.batches)]
  share = packing.make_sharer(prompt_length=P, max_length=T)
  # Packed + shared: rows of one prompt and its G + 1 samples (P + (G + 1) R tokens).
  pack_spec = packing.PackSpec(num_groups=1, row_length=P + (G + 1) * R,
                               buckets=(B, B * (G + 1)))
  layouts = {"unshared": padded, "shared": [share(b) for b in padded],
             "packed+shared": [packing.pack_shared_batch(b, pack_spec) for b in padded]}
  times = time_layouts(c, layouts, steps=args.steps, rounds=args.rounds)
  result = {"G": G, "prompt": P, "sample": R, "groups_per_step": B,
            **_summary(c, padded, layouts, times, steps=args.steps, peak=peak)}
  ratios = [p / q for p, q in zip(times["unshared"], times["shared"])]
  result["speedup_median"], result["speedup_rounds"] = float(np.median(ratios)), ratios
  packed_ratios = [p / q for p, q in zip(times["unshared"], times["packed+shared"])]
  result["packed_shared_speedup_median"] = float(np.median(packed_ratios))
  result["packed_shared_speedup_rounds"] = packed_ratios
  print(f"[grao] {B} groups per step of 1 + G = {G + 1} sequences: {P}-token prompt, "
        f"{R}-token samples")
  _print_table(result, tuple(layouts))
  for name, rs in (("shared", ratios), ("packed+shared", packed_ratios)):
    print(f"{name} / unshared real tokens/s: {np.median(rs):.2f}x (median of "
          f"{args.rounds} rounds: {', '.join(f'{x:.2f}' for x in rs)})")
  return result


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--case", default="pairs,grao", help="pairs, grao or both")
  ap.add_argument("--scale", type=float, default=0.25)
  ap.add_argument("--batch", type=int, default=16, help="pairs per step")
  ap.add_argument("--group-batch", type=int, default=2, help="GRAO groups per step")
  ap.add_argument("--steps", type=int, default=2, help="timed steps per block")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--batches", type=int, default=2, help="distinct batches cycled")
  ap.add_argument("--buckets", type=int, default=3)
  ap.add_argument("--layouts", default="padded,packed,packed+shared",
                  help=f"pairs case: layouts to time, of {sorted(PAIR_LAYOUTS)}")
  ap.add_argument("--trl-python", help="pairs case: also run the batches through TRL's "
                  "DPOTrainer with the python of this environment (bench/compare_trl.py)")
  ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                  help="pairs case: after the timing, profile this many steps of each "
                  "layout and print ms per category (bench/cpu_step.py's); sets the XLA:CPU "
                  "traceme flag for the whole run, so take timed figures without it")
  args = ap.parse_args(argv)
  if args.profile:   # before the backend starts (matmul_peak is the first jax call)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_xprof_traceme=true").strip()
  peak = matmul_peak()
  result = {"peak_flops": peak}
  cases = args.case.split(",")
  if "pairs" in cases:
    result["pairs"] = pairs_case(args, peak)
  if "grao" in cases:
    result["grao"] = grao_case(args, peak)
  result["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  print(result["uptime"])
  print("JSON " + json.dumps(result))


if __name__ == "__main__":
  main()
