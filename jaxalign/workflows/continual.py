"""Training over a sequence of domains: sequential LoRA training, and COFS-DPO.

  config.data.domains = ("d1.jsonl", "d2.jsonl")   # one stage of total_steps each

Stage t trains the config's loss (LoRA DPO, OFS-DPO, ...) on domain t in
WORKDIR/stage_t, a normal run directory (checkpoints, metrics, resume). Stage
t+1 starts its adapters (OFS-DPO: both modules) from stage t's fast module, on
the same frozen base. After each stage its fast module (OFS-DPO's "fast"
adapter; the adapter of a one-module loss) is stored adapter-only in
WORKDIR/modules/domain_t.

COFS-DPO (config.cofs.enabled; Qi et al., arXiv 2406.05534, docs/losses.md `ofs_dpo`):
the model after stage t is base + sum_{s<=t} w_s * scale * A_s B_s, the stored
fast modules combined linearly (`cofs_combine`, space "delta" by default).
The weights are config.cofs.weights (the first t+1, as given) or searched on
the held-out preference sets data.domain_eval_paths of the domains seen so far:
every point of the simplex grid with step 1/cofs.grid, scored by the mean
held-out preference accuracy (log pi(chosen) > log pi(rejected)) over those
domains; the first best point in grid order wins. The paper's abstract says
only that fast modules of different domains are combined linearly; the grid
search on held-out preferences, delta space, and continuing each stage from
the previous fast module (not from the combination: a delta-space combination
is not a rank-r adapter) are jaxalign choices. WORKDIR/cofs.json records each
stage's weights and search scores.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import sharding
from jaxalign.data import examples as examples_lib, pipeline
from jaxalign.models import lora
from jaxalign.train import build as build_lib
from jaxalign.train import loop, rundir, step as step_lib
from jaxalign.data import reading

log = logging.getLogger("jaxalign")


def stage_dir(workdir: str, t: int) -> str:
  return os.path.join(workdir, f"stage_{t}")


def module_dir(workdir: str, t: int) -> str:
  return os.path.join(workdir, "modules", f"domain_{t}")


def stage_config(config: ml_collections.ConfigDict, t: int, workdir: str
                 ) -> ml_collections.ConfigDict:
  """The plain (one-domain) run config of stage t."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.train_path = config.data.domains[t]
  c.data.domains = ()
  c.data.domain_eval_paths = ()
  c.cofs.enabled = False
  if t > 0:
    c.lora.init_adapters = module_dir(workdir, t - 1)
  return c


def _abstract_adapters(spec: config_lib.RunSpec, mesh):
  """(model config, abstract adapter state with shardings, LoRA modules, init_fn)."""
  built = build_lib.build(spec, mesh)   # the stage runs' own state (train/build.py)
  return spec.model_cfg, built.abstract_state, spec.modules, built.init_fn


def fast_module(run_dir: str, config: config_lib.RunSpec, mesh):
  """The fast module (adapter state) of the latest checkpoint of a LoRA run."""
  _, abstract, modules, _ = _abstract_adapters(config, mesh)
  with jax.set_mesh(mesh):
    params = ckpt.restore_params(rundir.checkpoint_dir(run_dir), abstract.params)
  return params[modules[0]] if modules else params


def base_params(spec: config_lib.RunSpec, mesh):
  """The frozen base the stages share: init_from's parameters, or the seed init."""
  _, abstract, _, init_fn = _abstract_adapters(spec, mesh)
  with jax.set_mesh(mesh):
    base = rundir.starting_params(abstract.frozen, init_from=spec.init_from,
                                  hf_dir=spec.hf_dir, model_cfg=spec.model_cfg)
    if base is not None:
      return base
    return jax.jit(lambda: init_fn().frozen,
                   out_shardings=jax.tree.map(lambda a: a.sharding, abstract.frozen))()


@functools.partial(jax.jit, static_argnames=("scale", "space"))
def _combined(base, modules_, weights, *, scale: float, space: str):
  return lora.merge_deltas(base, lora.combine(modules_, weights, space=space), scale=scale)


def combined_model(base, modules_, weights, *, scale: float, space: str = "delta"):
  """Merged parameters of base + the weighted combination of stored modules."""
  return _combined(base, list(modules_), jnp.asarray(weights, jnp.float32), scale=float(scale),
                   space=space)


class PreferenceScorer:
  """Held-out preference accuracy of merged models: the fraction of pairs with
  log pi(chosen) > log pi(rejected). Compiled once per config."""

  def __init__(self, spec: config_lib.RunSpec, mesh, tokenizer, paths):
    graphdef = lora.base_graphdef(spec.model_cfg)
    d = spec.data
    self.mesh = mesh
    self.batch_size = d.batch_size
    self.examples = [   # each domain's held-out pairs, read lazily
        examples_lib.open_examples(p, "pairwise", tokenizer, split=d.split,
                                   max_length=d.max_length,
                                   max_prompt_length=d.max_prompt_length, on_error=d.on_error,
                                   key="config.data.domain_eval_paths")[0]
        for p in paths]
    self._logps = jax.jit(functools.partial(step_lib.batch_logps_only, graphdef,
                                            chunk_size=spec.logprob_chunk_size))

  def accuracy(self, params, domain: int) -> float:
    """Preference accuracy of the merged `params` on held-out domain `domain`."""
    wins, total = 0, 0
    empty = nnx.State({})
    with jax.set_mesh(self.mesh):
      for batch in pipeline.ordered_batches(self.examples[domain], self.batch_size):
        arrays = {k: np.asarray(batch[k]) for k in ("tokens", "attention_mask", "loss_mask")}
        logps = np.asarray(self._logps(params, empty, arrays))          # [B, 2]
        valid = np.asarray(batch["valid"]).astype(bool)
        wins += int((logps[valid, 0] > logps[valid, 1]).sum())
        total += int(valid.sum())
    return wins / max(total, 1)


def simplex_grid(num: int, grid: int) -> list[tuple[float, ...]]:
  """Every weight vector of `num` entries in {0, 1/grid, ..., 1} summing to 1."""
  points = [c for c in itertools.product(range(grid + 1), repeat=num) if sum(c) == grid]
  return [tuple(x / grid for x in c) for c in points]


def search_weights(score, num: int, grid: int) -> tuple[tuple[float, ...], list[dict]]:
  """The simplex-grid point maximising `score(weights)`; (best, every point's score)."""
  table = [{"weights": list(w), "score": float(score(w))} for w in simplex_grid(num, grid)]
  best = max(table, key=lambda r: r["score"])   # first best in grid order
  return tuple(best["weights"]), table


def train(run_spec: config_lib.RunSpec, workdir: str, *, progress: bool = True,
          devices=None) -> rundir.RunResult:
  """Trains every domain of data.domains in turn (resuming what exists).

  `run_spec`: the continual run's (config.resolve); each stage's own config
  (stage_config, derived from its record) is resolved once and its spec passed down.
  """
  devices = jax.devices() if devices is None else list(devices)
  run_spec = config_lib.resolve(run_spec, len(devices))   # another device count: refused
  config = run_spec.config
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(run_spec.mesh_shape, devices)
  domains = run_spec.data.domains
  record, result = [], None
  for t in range(len(domains)):
    stage = config_lib.derived_from(
        config_lib.resolve(stage_config(config, t, workdir), len(devices)), run_spec)
    result = loop.train(stage, stage_dir(workdir, t), progress=progress, devices=devices)
    if result.final_step < stage.total_steps:   # stopped by SIGTERM: continue on rerun
      return result
    if not os.path.isdir(module_dir(workdir, t)):
      if jax.process_index() == 0:
        lora.save_adapters(module_dir(workdir, t), fast_module(stage_dir(workdir, t), stage,
                                                               mesh))
    if run_spec.cofs:
      record.append(cofs_weights(run_spec, workdir, t, mesh))
      if jax.process_index() == 0:
        ckpt.write_json(os.path.join(workdir, "cofs.json"), record)
  return result


def load_modules(config: config_lib.RunSpec, workdir: str, upto: int, mesh) -> list:
  """Stored fast modules of domains 0..upto."""
  _, abstract, modules, _ = _abstract_adapters(config, mesh)
  one = abstract.params[modules[0]] if modules else abstract.params
  return [lora.load_adapters(module_dir(workdir, s), one) for s in range(upto + 1)]


def cofs_weights(spec: config_lib.RunSpec, workdir: str, t: int, mesh,
                 scorer: PreferenceScorer | None = None) -> dict:
  """COFS weights after stage t: given, or searched on the seen domains' held-out sets.

  `spec`: the continual run's."""
  config = spec.config   # its cofs section
  weights = tuple(config.cofs.weights)
  if weights:
    return {"stage": t, "weights": list(weights[:t + 1]), "searched": False}
  if scorer is None:
    tokenizer = reading.load_tokenizer(spec.data.tokenizer)
    scorer = PreferenceScorer(spec, mesh, tokenizer, spec.data.domain_eval_paths)
  base = base_params(spec, mesh)
  mods = load_modules(spec, workdir, t, mesh)
  scale = spec.lora_cfg.scale

  def score(w):
    params = combined_model(base, mods, w, scale=scale, space=config.cofs.space)
    return np.mean([scorer.accuracy(params, s) for s in range(t + 1)])

  best, table = search_weights(score, t + 1, config.cofs.grid)
  log.info("COFS stage %d: weights %s", t, best)
  return {"stage": t, "weights": list(best), "searched": True, "grid": table}


def stage_weights(workdir: str, t: int) -> list[float]:
  """The COFS weights recorded after stage t (cofs.json)."""
  with open(os.path.join(workdir, "cofs.json")) as f:
    return next(r["weights"] for r in json.load(f) if r["stage"] == t)
