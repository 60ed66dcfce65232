"""The run directory: what a finished (or running) run leaves, and how to read it back.

  workdir/checkpoints/<step>/   the saved part of the train state, the resolved config
  workdir/tokenizer/            the run's tokenizer, when it saved one

`resolved_config` and `load_run_params` are what `jaxalign export`, `generate`,
iterative rounds and continual stages read; `starting_params` decides the
parameters a run starts from (a LoRA run's frozen base, which it merges into).
Below train/loop (which writes runs) and above train/build (which assembles the
state the checkpoint is read into).
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import losses, paths, sharding
from jaxalign.models import hf, hf_config, lora, quant
from jaxalign.rewards import model as reward_model
from jaxalign.train import build as build_lib
from jaxalign.train import optim


@dataclasses.dataclass
class RunResult:
  """What `train` returns: where the run is, its last step and its last logged metrics."""
  workdir: str
  final_step: int
  last_metrics: dict[str, float]
  stopped_by_signal: bool = False
  signal_name: str = ""      # "SIGTERM" or "SIGINT" when stopped by a signal
  # Stopped by the signal in a pass before training (no step run, no checkpoint saved):
  # where, and what was kept ("during the reference log-probs pass, ...").
  stopped_in_pass: str = ""
  already_complete: bool = False   # the workdir's run had already reached total_steps


checkpoint_dir = ckpt.checkpoint_dir   # where init_from's checks (config.py) read it too


def starting_params(abstract, *, init_from: str, hf_dir: str, model_cfg):
  """The parameters a run starts from, decided here only: init_from's checkpoint (a
  run directory or checkpoint step dir), else the HF checkpoint in `hf_dir`, else
  None (the seeded random init). `abstract`: their abstract tree, with shardings.

  A full fine-tune starts its params from them (a resumed run from its own
  checkpoint instead); a LoRA run always takes them as its frozen base.
  """
  if init_from:
    return ckpt.restore_params(checkpoint_dir(init_from), abstract)
  if hf_dir:
    return hf.load_state(hf_dir, model_cfg, abstract)
  return None


def saved_layout(saved: dict[str, Any]) -> bool | None:
  """model.scan_layers of a run's saved config (its record): the layer layout its
  checkpoints hold (False for one saved before the layers were scanned, which
  has no key); None when the record holds no bool there."""
  model = saved.get("model") or {}
  overrides = model.get("overrides") or {}
  value = overrides.get("scan_layers", model.get("scan_layers", False))
  return value if isinstance(value, bool) else None


def _in_saved_layout(workdir: str, model_cfg):
  """`model_cfg` in the layer layout of `workdir`'s latest checkpoint, as its record
  says: the caller's config may say "auto", resolved elsewhere, or the run may
  have kept the layout of a checkpoint it resumed (train/resume.py)."""
  directory = checkpoint_dir(workdir)
  if not paths.isdir(directory):   # restore_params says so; nothing is created here
    return model_cfg
  checkpointer = ckpt.Checkpointer(directory, every=1, keep=1)
  try:
    step = checkpointer.latest_step()
    scan = None if step is None else saved_layout(checkpointer.restore_config(step))
  finally:
    checkpointer.close()
  if scan is None or scan == model_cfg.scan_layers:
    return model_cfg
  return dataclasses.replace(model_cfg, scan_layers=scan)


@dataclasses.dataclass
class _Restored:
  """A run's latest checkpoint as restored, nothing merged: `params` (a LoRA run's
  adapters, the deployed module's under OFS-DPO) and `frozen` (a LoRA run's base, as
  stored: quantized when lora.base_dtype says so)."""
  graphdef: nnx.GraphDef
  params: nnx.State
  frozen: nnx.State
  model_cfg: Any
  lora_cfg: lora.LoraConfig


def _restore_run(workdir: str, config: ml_collections.ConfigDict, mesh, *, model_cfg,
                 hf_dir: str | None) -> _Restored:
  hf_dir = config_lib.hf_model_dir(config) if hf_dir is None else hf_dir
  if model_cfg is None:
    model_cfg = config_lib.model_config(config, hf_dir=hf_dir)
  model_cfg = _in_saved_layout(workdir, model_cfg)
  mesh = mesh or sharding.make_mesh(config.mesh.shape)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  tx, _ = optim.make_optimizer(lr=1.0, warmup_steps=1, total_steps=2)
  lora_cfg = lora.config_from(config.get("lora"))
  modules = losses.get(config.loss.name).modules if lora_cfg.enabled else ()
  graphdef, abstract_state, _, init_fn = build_lib.build_model_and_state(
      model_cfg, tx, mesh, rules, seed=config.seed, keep_reference=False,
      lora_config=lora_cfg, modules=modules,
      scalar_head=reward_model.has_scalar_head(losses.get(config.loss.name)))
  init_frozen = jax.jit(lambda: init_fn().frozen,
                        out_shardings=jax.tree.map(lambda a: a.sharding, abstract_state.frozen))
  with jax.set_mesh(mesh):
    params = ckpt.restore_params(checkpoint_dir(workdir), abstract_state.params)
    if lora_cfg.enabled:
      # The base the run adapted (never the seeded init as well: one copy of it).
      frozen = starting_params(abstract_state.frozen, init_from=config.init_from,
                               hf_dir=hf_dir, model_cfg=model_cfg)
      frozen = init_frozen() if frozen is None else frozen
      params = params[modules[0]] if modules else params
    else:
      frozen = init_frozen()
  return _Restored(graphdef, params, frozen, model_cfg, lora_cfg)


def load_run_params(workdir: str, config: ml_collections.ConfigDict, mesh=None, *,
                    model_cfg=None, hf_dir: str | None = None):
  """(graphdef, params, frozen) of the latest checkpoint of a finished run.

  `config`: the run's record (its saved config, or a RunSpec's `config`);
  `model_cfg` / `hf_dir`: its ModelConfig and model.hf_path directory when the
  caller has them resolved (a RunSpec's), else derived from `config`; the layer
  layout is always the one the checkpoint's own record names.
  A LoRA run's model comes back merged: the base graph and base + adapter
  weights (OFS-DPO: the fast module, the one deployed), with nothing frozen (a
  quantized base, lora.base_dtype: its dequantized weights + adapters, in
  model.param_dtype; the whole merged model is then on the devices at once:
  `export_checkpoint` merges one tensor at a time instead); a reward-model run's,
  the rewards.model.RewardModel (backbone and scalar head).
  """
  run = _restore_run(workdir, config, mesh, model_cfg=model_cfg, hf_dir=hf_dir)
  if not run.lora_cfg.enabled:
    return run.graphdef, run.params, run.frozen
  base = run.frozen
  if run.lora_cfg.base_dtype != "none":   # a quantized base: merged into its float weights
    base = jax.jit(functools.partial(quant.dequantize_state,
                                     dtype=run.model_cfg.param_dtype))(base)
  merged = jax.jit(functools.partial(lora.merge, scale=run.lora_cfg.scale))(base, run.params)
  return lora.base_graphdef(run.model_cfg), merged, nnx.State({})


def resolved_config(workdir: str) -> dict[str, Any]:
  """The config saved with a run's latest checkpoint."""
  checkpointer = ckpt.Checkpointer(paths.join(workdir, "checkpoints"), every=1, keep=1)
  try:
    return checkpointer.restore_config(checkpointer.latest_step())
  finally:
    checkpointer.close()


def export_checkpoint(run_dir: str, out_dir: str, *, architecture: str | None = None,
                      mesh=None, max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
                      dtype: str | None = None) -> str:
  """Exports the latest checkpoint of the jaxalign run in `run_dir` (see `models.hf.export`).

  The model config comes from the resolved config saved with the checkpoint;
  the tokenizer from `run_dir/tokenizer` when present. `architecture` None:
  the architecture of the run's `config.model.hf_path` if it has one, else
  `infer_architecture`.
  """
  config = ml_collections.ConfigDict(resolved_config(run_dir))
  model_cfg = config_lib.model_config(config)
  if architecture is None:
    hf_path = config.model.get("hf_path", "") if "model" in config else ""
    if hf_path and os.path.exists(os.path.join(hf_path, "config.json")):
      architecture = hf_config.architecture_of(hf_config.read_config(hf_path))
  run = _restore_run(run_dir, config, mesh, model_cfg=model_cfg, hf_dir=None)
  # A LoRA run: its base as stored (quantized or not) and its adapters, merged by the
  # export one tensor at a time, never the whole merged model on the devices.
  if run.lora_cfg.enabled:
    params, adapters, lora_scale = run.frozen, run.params, run.lora_cfg.scale
  else:
    params, adapters, lora_scale = run.params, None, 1.0
  tok_dir = os.path.join(run_dir, "tokenizer")
  tokenizer = hf.load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
  return hf.export(params, run.model_cfg, out_dir, architecture=architecture,
                   tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, dtype=dtype,
                   adapters=adapters, lora_scale=lora_scale)
