"""Compile wall time of a recipe's train step for a TPU slice, per layer count and layout.

  python bench/compile_time.py                          # 8B recipe: 32 and 2 layers, scanned
  python bench/compile_time.py --layers 32 --unrolled   # adds the unrolled 32-layer step
  python bench/compile_time.py --config configs/llama3_70b_dpo.py --layers 80,2
  python bench/compile_time.py --config configs/dpo_toy.py --devices cpu \
      --layers 2,8,16,32 --unrolled                    # the host's CPU, no libtpu

Each variant is the step `jaxalign plan` compiles (`jaxalign.plan.plan`, ahead
of time with libtpu, no TPU needed; with --devices, on this host's devices),
without the scanned-cost probes, one after the other in this process, so the
figures are comparable with each other only at the load average printed with
them (--rounds N: N interleaved rounds, the fastest compile of each kept; the
process CPU time of the whole plan call is printed too, as it varies less with
the machine's load). What it
answers: how much of the compile depends on the number of layers (scanned, it
should not) and how much is the fixed rest of the step; on CPU (--devices cpu)
it is the measurement behind model.scan_layers="auto"'s layer threshold
(docs/performance.md). A topology needs the `tpu` extra. Not a test: it prints
figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections

from jaxalign import plan as plan_lib


def _recipe(path: str):
  spec = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/llama3_8b_dpo.py")
  ap.add_argument("--topology", default="", help="default: the recipe's TOPOLOGY")
  ap.add_argument("--devices", default="",
                  help="plan on this host's devices instead of a topology (e.g. cpu, cpu:8)")
  ap.add_argument("--layers", default="32,2", help="comma-separated layer counts")
  ap.add_argument("--unrolled", action="store_true",
                  help="also compile each layer count with model.scan_layers=False")
  ap.add_argument("--rounds", type=int, default=1,
                  help="compile every variant this many times, interleaved; keep the fastest")
  args = ap.parse_args()
  recipe = _recipe(args.config)
  topology = "" if args.devices else (args.topology or recipe.TOPOLOGY)
  target = dict(devices=args.devices) if args.devices else dict(topology=topology)
  variants = [(int(n), scan) for n in args.layers.split(",")
              for scan in ((True, False) if args.unrolled else (True,))]
  best: dict[tuple[int, bool], tuple[float, float, float, float, bool]] = {}
  for r in range(args.rounds):
    for n, scan in variants:
      c = recipe.get_config()
      c.model.scan_layers = scan
      overrides = dict(c.model.overrides.to_dict()) if c.model.get("overrides") else {}
      c.model.overrides = ml_collections.ConfigDict({**overrides, "n_layers": n})
      t, cpu = time.perf_counter(), time.process_time()
      p = plan_lib.plan(c, **target, scan_estimate=False)
      row = (p["lower_seconds"], p["compile_seconds"], time.perf_counter() - t,
             time.process_time() - cpu, p["fits"])
      if (n, scan) not in best or row[1] < best[n, scan][1]:
        best[n, scan] = row
      print(f"  round {r + 1}: {n} layers {'scan' if scan else 'unrolled'}: compile "
            f"{p['compile_seconds']:.1f} s, process CPU {row[3]:.1f} s", flush=True)
  rows = [(n, "scan" if scan else "unrolled", *best[n, scan]) for n, scan in variants]
  print(f"\n{args.config} on {args.devices or topology}, compiled one after the other in "
        f"one process (fastest of {args.rounds} interleaved rounds)")
  print(f"{'layers':>6} {'layout':>9} {'lower s':>8} {'compile s':>10} {'total s':>8} "
        f"{'CPU s':>7}  fits")
  for n, layout, lower, comp, total, cpu, fits in rows:
    print(f"{n:>6} {layout:>9} {lower:>8.1f} {comp:>10.1f} {total:>8.1f} {cpu:>7.1f}  {fits}")
  print("load average %.2f, %.2f, %.2f (%d cores) at the end of the run"
        % (*os.getloadavg(), os.cpu_count()))


if __name__ == "__main__":
  main()
