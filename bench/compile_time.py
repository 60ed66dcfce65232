"""Compile wall time of a recipe's train step for a TPU slice, per layer count and layout.

  python bench/compile_time.py                          # 8B recipe: 32 and 2 layers, scanned
  python bench/compile_time.py --layers 32 --unrolled   # adds the unrolled 32-layer step
  python bench/compile_time.py --config configs/llama3_70b_dpo.py --layers 80,2

Each variant is the step `jaxalign plan` compiles (`jaxalign.plan.plan`, ahead of
time with libtpu, no TPU needed), without the scanned-cost probes, one after
the other in this process, so the figures are comparable with each other only
at the load average printed with them. What it answers: how much of the compile
depends on the number of layers (scanned, it should not) and how much is the
fixed rest of the step. Needs the `tpu` extra. Not a test: it prints figures.
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
  ap.add_argument("--layers", default="32,2", help="comma-separated layer counts")
  ap.add_argument("--unrolled", action="store_true",
                  help="also compile each layer count with model.scan_layers=False")
  args = ap.parse_args()
  recipe = _recipe(args.config)
  topology = args.topology or recipe.TOPOLOGY
  rows = []
  for n in [int(x) for x in args.layers.split(",")]:
    for scan in (True, False) if args.unrolled else (True,):
      c = recipe.get_config()
      c.model.scan_layers = scan
      overrides = dict(c.model.overrides.to_dict()) if c.model.get("overrides") else {}
      c.model.overrides = ml_collections.ConfigDict({**overrides, "n_layers": n})
      t = time.perf_counter()
      p = plan_lib.plan(c, topology=topology, scan_estimate=False)
      rows.append((n, "scan" if scan else "unrolled", p["lower_seconds"],
                   p["compile_seconds"], time.perf_counter() - t, p["fits"]))
      print(f"  {n} layers {rows[-1][1]}: compile {p['compile_seconds']:.1f} s", flush=True)
  print(f"\n{args.config} on {topology}, compiled one after the other in one process")
  print(f"{'layers':>6} {'layout':>9} {'lower s':>8} {'compile s':>10} {'total s':>8}  fits")
  for n, layout, lower, comp, total, fits in rows:
    print(f"{n:>6} {layout:>9} {lower:>8.1f} {comp:>10.1f} {total:>8.1f}  {fits}")
  print("load average %.2f, %.2f, %.2f (%d cores) at the end of the run"
        % (*os.getloadavg(), os.cpu_count()))


if __name__ == "__main__":
  main()
