"""The input pipeline at dataset scale (issue 14): host memory and time to the first
training step, pipeline examples/s against the step's consumption, `prepare` rows/s.

  python bench/data.py                     # 100k and 1M rows; ~10 min on 2 busy cores
  python bench/data.py --rows 20000 --prepare_rows 20000   # a quick look

Not a test: it prints figures. Data: a generated pairwise JSONL (the bundled
arithmetic task's pairs, each prompt wrapped in a sentence of filler words), and a
real byte-level BPE tokenizer (`tokenizers`, 2,000 merges) trained on that text
and saved as a `transformers` tokenizer directory, so every row is tokenized by
a real BPE on every read. The run is the toy DPO recipe (configs/dpo_toy.py, its
tiny model, batch 32, max_length 16 / max_prompt_length 10) with the BPE
vocabulary, reference.mode="frozen" (a precomputed reference would tokenize the
whole set before step 1, by design) and checkpoints off until the end.

Each figure comes from a fresh child process (JAX_PLATFORMS=cpu, set by this
parent), so its peak RSS (VmHWM) is that run's alone:
  * train: `loop.train` from the raw JSONL (read lazily) or a prepared
    set; peak RSS when the first step returns; "start" = process start to the
    first step's end minus that step's compile (its first call minus a later
    step); the steady step's examples/s = batch / step time.
  * pipeline: the same source through `pipeline.make_dataset` alone, 200 batches.
  * prepare: `jaxalign prepare`'s function with 1 and 2 worker processes.
Generated data lives under --dir (default /tmp) and is deleted at the end.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH, MAX_PROMPT, BATCH = 16, 10, 32
WORDS = ("please compute the sum below and answer with digits only thanks friend "
         "what is value result of adding these numbers together quickly now").split()


def _generate(path: str, rows: int) -> None:
  import numpy as np
  from jaxalign.data import toy
  task = toy.ArithmeticTask()
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for chunk in range(0, rows, 100_000):
      for r in task.pairwise_records(min(100_000, rows - chunk), seed=chunk):
        words = " ".join(rng.choice(WORDS, size=6))
        f.write(json.dumps({**r, "prompt": f"{words}: {r['prompt']}"}) + "\n")


def _bpe(path: str, out: str) -> None:
  """A byte-level BPE trained on the first 100k rows, saved for AutoTokenizer."""
  import itertools
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=2256, special_tokens=["<pad>", "<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

  def texts():
    with open(path) as f:
      for line in itertools.islice(f, 100_000):
        r = json.loads(line)
        yield r["prompt"] + r["chosen"] + r["rejected"]
  tok.train_from_iterator(texts(), trainer)
  PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                          model_max_length=MAX_LENGTH).save_pretrained(out)


def _peak_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _process_start() -> float:
  """This process's start on the time.time() clock."""
  with open("/proc/self/stat") as f:
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
  with open("/proc/uptime") as f:
    uptime = float(f.read().split()[0])
  return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _config(path: str, tokenizer: str, steps: int):
  sys.path.insert(0, REPO)
  from configs import dpo_toy
  c = dpo_toy.get_config()
  c.data.train_path, c.data.tokenizer = path, tokenizer
  c.data.max_length, c.data.max_prompt_length = MAX_LENGTH, MAX_PROMPT
  c.model.overrides = {"vocab_size": 2304}
  c.reference.mode = "frozen"
  c.total_steps, c.log_every, c.checkpoint.every = steps, steps, steps
  return c


def _child_train(path: str, tokenizer: str, workdir: str, steps: int) -> dict:
  import jax
  from jaxalign import config as config_lib
  from jaxalign.train import build as build_lib, loop
  started = _process_start()
  times = []
  original = build_lib.build

  def build(*a, **k):
    built = original(*a, **k)
    step_fn = built.step_fn

    def timed(state, batch):
      t = time.perf_counter()
      out = jax.block_until_ready(step_fn(state, batch))
      times.append((t, time.perf_counter(), time.time(), _peak_rss_mb()))
      return out
    object.__setattr__(built, "step_fn", timed)
    return built
  build_lib.build = build
  loop.train(config_lib.resolve(_config(path, tokenizer, steps), jax.device_count()), workdir,
             progress=False)
  first = times[0]
  steady = sorted(b - a for a, b, _, _ in times[1:])[len(times[1:]) // 2]
  compile_s = (first[1] - first[0]) - steady
  return {"to_first_step_s": first[2] - started, "compile_s": compile_s,
          "start_minus_compile_s": first[2] - started - compile_s,
          "peak_rss_mb_first_step": first[3], "step_s": steady,
          "step_examples_per_s": BATCH / steady}


def _child_pipeline(path: str, tokenizer: str, batches: int) -> dict:
  from jaxalign.data import examples as examples_lib, pipeline, reading
  tok = reading.load_tokenizer(tokenizer)
  examples, _ = examples_lib.open_examples(path, "pairwise", tok, split="train",
                                           max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT,
                                           on_error="raise", group_size=None)
  it = iter(pipeline.make_dataset(examples, seed=0, batch_size=BATCH))
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return {"pipeline_examples_per_s": batches * BATCH / (time.perf_counter() - t)}


def _run_child(*args: str) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": REPO,
                                       "JAX_PLATFORMS": "cpu"})
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare(src: str, tokenizer: str, out: str, workers: int) -> dict:
  import jax
  from jaxalign import config as config_lib
  from jaxalign.workflows import prepare as prepare_lib
  shutil.rmtree(out, ignore_errors=True)
  spec = config_lib.resolve(_config(src, tokenizer, 1), jax.device_count())
  t = time.perf_counter()
  m = prepare_lib.prepare_from_config(spec, out, shard_size=25_000, workers=workers)
  seconds = time.perf_counter() - t
  return {"rows": m["examples"], "seconds": seconds, "rows_per_s": m["examples"] / seconds}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="100000,1000000")
  p.add_argument("--prepare_rows", type=int, default=200_000)
  p.add_argument("--dir", default="/tmp/jaxalign_bench_data")
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--keep", action="store_true", help="keep the generated data")
  p.add_argument("--child", nargs="+")
  args = p.parse_args()
  if args.child:
    kind, *rest = args.child
    r = (_child_train(rest[0], rest[1], rest[2], args.steps) if kind == "train"
         else _child_pipeline(rest[0], rest[1], args.batches))
    print(json.dumps(r))
    return
  os.makedirs(args.dir, exist_ok=True)
  print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        flush=True)
  try:
    rows_list = [int(r) for r in args.rows.split(",")]
    srcs = {}
    for rows in sorted(set(rows_list + [args.prepare_rows])):
      srcs[rows] = os.path.join(args.dir, f"pairs_{rows}.jsonl")
      t = time.perf_counter()
      _generate(srcs[rows], rows)
      print(f"generated {rows} rows ({os.path.getsize(srcs[rows]) / 1e6:.0f} MB) in "
            f"{time.perf_counter() - t:.0f} s", flush=True)
    tok = os.path.join(args.dir, "bpe")
    _bpe(srcs[max(srcs)], tok)
    with open(os.path.join(tok, "tokenizer.json")) as f:
      vocab = len(json.load(f)["model"]["vocab"])
    print(f"BPE tokenizer: {vocab} tokens", flush=True)
    for rows in rows_list:
      r = _run_child("train", srcs[rows], tok, os.path.join(args.dir, f"run_raw_{rows}"))
      q = _run_child("pipeline", srcs[rows], tok)
      print(f"raw {rows:>8} rows: peak RSS at step 1 {r['peak_rss_mb_first_step']:6.0f} MB, "
            f"process start to step 1 {r['to_first_step_s']:5.1f} s (compile "
            f"{r['compile_s']:4.1f} s), step {r['step_s'] * 1e3:.1f} ms = "
            f"{r['step_examples_per_s']:.0f} examples/s; pipeline alone "
            f"{q['pipeline_examples_per_s']:.0f} examples/s", flush=True)
    src = srcs[args.prepare_rows]
    for workers in (1, 2):
      r = _prepare(src, tok, os.path.join(args.dir, f"prep_{workers}"), workers)
      print(f"prepare {r['rows']} rows, {workers} worker(s): {r['seconds']:.1f} s, "
            f"{r['rows_per_s']:.0f} rows/s", flush=True)
    prep = os.path.join(args.dir, "prep_2")
    r = _run_child("train", prep, tok, os.path.join(args.dir, "run_prep"))
    q = _run_child("pipeline", prep, tok)
    print(f"prepared {args.prepare_rows} rows: process start to step 1 "
          f"{r['to_first_step_s']:.1f} s, minus compile {r['compile_s']:.1f} s = "
          f"{r['start_minus_compile_s']:.1f} s; peak RSS {r['peak_rss_mb_first_step']:.0f} MB; "
          f"pipeline alone {q['pipeline_examples_per_s']:.0f} examples/s vs the step's "
          f"{r['step_examples_per_s']:.0f} "
          f"({q['pipeline_examples_per_s'] / r['step_examples_per_s']:.1f}x)", flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)
  print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        flush=True)


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  main()
