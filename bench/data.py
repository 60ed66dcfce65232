"""The input pipeline at dataset scale: host memory to the first batch, pipeline
examples/s, and `prepare` rows/s.

  python bench/data.py                              # 100k and 1M rows, ~10 min on 2 busy cores
  python bench/data.py --rows 100000 --prepare_rows 100000

Not a test: it prints figures. Data: generated pairwise JSONL from the bundled
arithmetic task (`toy.ArithmeticTask.pairwise_records`), tokenized with the
bundled toy (character) tokenizer, max_length 16 / max_prompt_length 8 as
configs/dpo_toy.py, not a BPE tokenizer on long texts: the figures measure the
pipeline's own cost (reading, validation, indexing, tokenization calls,
batching), not a real tokenizer's.

Each figure comes from a fresh child process (`--child`), so its peak RSS
(ru_maxrss) is that source's alone: load the tokenizer, open the source
(eager: `reading.load_examples`, a list of every example; lazy:
`data.lazy`'s indexed JSONL; prepared: a `jaxalign prepare` directory), build
the run's Grain pipeline (`pipeline.make_dataset`, batch 32) and take the
first batch; then "pipeline examples/s" takes 200 more batches. The
model, its compile and the step are not included.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH, MAX_PROMPT, BATCH = 16, 8, 32


def _generate(path: str, rows: int) -> None:
  from jaxalign.data import toy
  task = toy.ArithmeticTask()
  with open(path, "w") as f:
    for chunk in range(0, rows, 100_000):
      for r in task.pairwise_records(min(100_000, rows - chunk), seed=chunk):
        f.write(json.dumps(r) + "\n")


def _peak_rss_mb() -> float:
  """This process's peak resident set (VmHWM: per address space, reset by exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, path: str, batches: int) -> dict:
  start = time.perf_counter()
  from jaxalign.data import pipeline, prepared, reading
  tok = reading.load_tokenizer("toy")
  kw = dict(split="train", max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT,
            on_error="raise", group_size=None)
  examples, _ = prepared.load_examples(path, "pairwise", tok, lazy=mode == "lazy", **kw)
  opened = time.perf_counter()
  it = iter(pipeline.make_dataset(examples, seed=0, batch_size=BATCH))
  next(it)
  first = time.perf_counter()
  rss_first = _peak_rss_mb()
  for _ in range(batches):
    next(it)
  done = time.perf_counter()
  return {"mode": mode, "rows": len(examples), "open_s": opened - start,
          "first_batch_s": first - start, "peak_rss_mb_first_batch": rss_first,
          "pipeline_examples_per_s": batches * BATCH / (done - first)}


def _run_child(*args: str) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": REPO,
                                       "JAX_PLATFORMS": "cpu"})
  if out.returncode:
    raise RuntimeError(out.stderr[-2000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare(src: str, out: str, workers: int) -> dict:
  from tests.train.helpers import tiny_config   # only for the toy config's defaults
  import shutil

  from jaxalign.workflows import prepare as prepare_lib
  shutil.rmtree(out, ignore_errors=True)
  cfg = tiny_config(**{"data.train_path": src, "data.max_length": MAX_LENGTH,
                       "data.max_prompt_length": MAX_PROMPT})
  t = time.perf_counter()
  m = prepare_lib.prepare_from_config(cfg, out, shard_size=25_000, workers=workers)
  seconds = time.perf_counter() - t
  return {"workers": workers, "rows": m["examples"], "seconds": seconds,
          "rows_per_s": m["examples"] / seconds}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="100000,1000000")
  p.add_argument("--prepare_rows", type=int, default=200_000)
  p.add_argument("--modes", default="eager,lazy,prepared")
  p.add_argument("--dir", default="/tmp/jaxalign_bench_data")
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"))
  args = p.parse_args()
  if args.child:
    print(json.dumps(_child(args.child[0], args.child[1], args.batches)))
    return
  os.makedirs(args.dir, exist_ok=True)
  print(f"load: {os.getloadavg()}")
  for rows in [int(r) for r in args.rows.split(",")]:
    src = os.path.join(args.dir, f"pairs_{rows}.jsonl")
    if not os.path.exists(src):
      _generate(src, rows)
    for mode in args.modes.split(","):
      path = src
      if mode == "prepared":
        path = os.path.join(args.dir, f"prep_{rows}")
        if not os.path.exists(os.path.join(path, "manifest.json")):
          _prepare(src, path, workers=2)
      r = _run_child(mode, path)
      print(f"{rows:>8} rows  {mode:<8}  first batch {r['first_batch_s']:6.1f} s  "
            f"peak RSS {r['peak_rss_mb_first_batch']:7.0f} MB  pipeline "
            f"{r['pipeline_examples_per_s']:8.0f} examples/s", flush=True)
  src = os.path.join(args.dir, f"pairs_{args.prepare_rows}.jsonl")
  if not os.path.exists(src):
    _generate(src, args.prepare_rows)
  for workers in (1, 2):
    r = _prepare(src, os.path.join(args.dir, f"prep_bench_{workers}"), workers)
    print(f"prepare {r['rows']} rows, {workers} worker(s): {r['seconds']:.1f} s, "
          f"{r['rows_per_s']:.0f} rows/s", flush=True)
  print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  main()
