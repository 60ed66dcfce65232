"""Device memory per chip that `jaxalign export` of a LoRA / QLoRA recipe needs, per-tensor
merge (models/merged.py) against the whole-model merge (`rundir.load_run_params`).

  python bench/export_memory.py                  # the 70B QLoRA recipe on v5e:2x4
  python bench/export_memory.py --whole          # also compile the whole-model merge
  python bench/export_memory.py --config configs/llama3_8b_dpo.py --topology v5p:4x4x4

Arithmetic from the recipe's abstract state (each leaf's bytes on the most loaded
chip, from its sharding on the topology's mesh), and ahead-of-time compiles for the
topology (libtpu, no TPU): the per-slice merge of each projection kind (one compile
serves every layer), and with --whole the jitted dequantize_state + merge of the whole
model (80 stacked layers: compile under `flock /tmp/bigcompile.lock` on a shared
machine). Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from jaxalign import config as config_lib
from jaxalign import losses, sharding
from jaxalign import plan as plan_lib
from jaxalign.models import lora, merged, quant
from jaxalign.train import build as build_lib
from jaxalign.train import optim

GIB = 2 ** 30


def _recipe(path: str):
  spec = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _chip_bytes(x) -> int:
  """Bytes of `x`'s biggest shard (a ShapeDtypeStruct with a sharding)."""
  return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def _tree_chip_bytes(tree) -> int:
  return sum(_chip_bytes(x) for x in jax.tree.leaves(tree))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/llama3_70b_qlora_dpo.py")
  p.add_argument("--topology", default="v5e:2x4")
  p.add_argument("--whole", action="store_true",
                 help="also compile the whole-model merge (dequantize_state + lora.merge)")
  args = p.parse_args()

  c = _recipe(args.config)
  model_cfg = config_lib.model_config(c)
  lora_cfg = lora.config_from(c.get("lora"))
  if not lora_cfg.enabled:
    raise SystemExit(f"{args.config}: not a LoRA recipe (lora.rank 0)")
  devices = plan_lib.tpu_devices(args.topology)
  mesh = sharding.make_mesh(c.mesh.shape, devices)
  rules = tuple(tuple(r) for r in c.sharding_rules)
  tx, _ = optim.make_optimizer(lr=1.0, warmup_steps=1, total_steps=2)
  _, abstract, _, _ = build_lib.build_model_and_state(
      model_cfg, tx, mesh, rules, seed=0, keep_reference=False, lora_config=lora_cfg,
      modules=losses.get(c.loss.name).modules)
  base, adapters = abstract.frozen, abstract.params
  float_dtype = jnp.dtype(model_cfg.param_dtype)
  print(f"{args.config} on {args.topology} ({len(devices)} chips, mesh "
        f"{dict(mesh.shape)}), base {lora_cfg.base_dtype}, adapters rank {lora_cfg.rank}")

  stored, adapter_bytes = _tree_chip_bytes(base), _tree_chip_bytes(adapters)
  params = merged.weights(base, adapters, scale=lora_cfg.scale, dtype=float_dtype)
  # Entries per chip of the merged model: a quantized weight's as its codes' shard
  # (NF4: two per byte), the others' as stored.
  merged_float = sum(math.prod(x.sharding.shard_shape(x.shape))
                     * (2 if isinstance(v, merged.Weight) and v.fmt == "nf4" else 1)
                     for v in params.values()
                     for x in [v.arrays[0] if isinstance(v, merged.Weight) else v])
  float_bytes = merged_float * float_dtype.itemsize
  print(f"per chip: stored base {stored / GIB:.2f} GiB, adapters {adapter_bytes / GIB:.2f} "
        f"GiB; the merged model in {float_dtype.name} {float_bytes / GIB:.2f} GiB")

  index = jax.ShapeDtypeStruct((1,), jnp.int32)
  worst = 0
  seen = set()
  for path, w in params.items():
    if not isinstance(w, merged.Weight) or (w.shape, w.fmt, w.adapted) in seen:
      continue
    seen.add((w.shape, w.fmt, w.adapted))
    t = time.perf_counter()
    memory = w.slice_fn(1).lower(w.arrays, index).compile().memory_analysis()
    extra = memory.output_size_in_bytes + memory.temp_size_in_bytes
    worst = max(worst, extra)
    print(f"  slice merge {'.'.join(map(str, path[2:]))} {w.shape[1:]}: output "
          f"{memory.output_size_in_bytes / 2**20:.1f} MiB + temporaries "
          f"{memory.temp_size_in_bytes / 2**20:.1f} MiB per chip "
          f"(compiled in {time.perf_counter() - t:.1f} s)")
  print(f"per-tensor export: stored base + adapters + one slice = "
        f"{(stored + adapter_bytes + worst) / GIB:.2f} GiB per chip")
  # load_run_params: a seeded init of the frozen base (a LoRA run restored from
  # model.hf_path or init_from built it and kept it), then the dequantized base and the
  # merged model, both alive during the merge.
  print(f"whole-model merge (load_run_params, before this change): merged model alone "
        f"{float_bytes / GIB:.2f} GiB per chip; at its peak (seeded base + stored base "
        f"while dequantizing, then seeded base + dequantized + merged + adapters) "
        f"{(stored + max(stored + float_bytes, float_bytes * 2 + adapter_bytes)) / GIB:.2f}"
        f" GiB per chip")
  if args.whole:
    dequantize = (functools.partial(quant.dequantize_state, dtype=float_dtype)
                  if lora_cfg.base_dtype != "none" else (lambda b: b))
    whole = jax.jit(lambda b, a: lora.merge(dequantize(b), a, scale=lora_cfg.scale))
    t = time.perf_counter()
    try:
      with jax.set_mesh(mesh):
        memory = whole.lower(base, adapters).compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:   # XLA refuses what overflows the chip
      print(f"  compiled whole merge (one jit, {time.perf_counter() - t:.1f} s): "
            f"{str(e).strip().splitlines()[0]}")
      return
    print(f"  compiled whole merge (one jit, {time.perf_counter() - t:.1f} s): arguments "
          f"{memory.argument_size_in_bytes / GIB:.2f} + output "
          f"{memory.output_size_in_bytes / GIB:.2f} + temporaries "
          f"{memory.temp_size_in_bytes / GIB:.2f} GiB per chip")


if __name__ == "__main__":
  main()
