"""The one place a run's train state, optimizer and jitted steps are assembled.

`build(spec, mesh)` turns a resolved config (config.resolve's RunSpec) into
everything the device side of a run needs, with nothing allocated yet: the model
graph, the abstract state and its shardings, the optimizer (one per LoRA module
for OFS-DPO), the jitted train step and the jitted held-out eval step.
`jaxalign train` (train/loop.py) and `jaxalign plan` (plan.py) both call it, so
what is planned is what runs: a LoRA recipe plans the adapters' step, an
OFS-DPO recipe the two modules and their optimizers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxalign import config as config_lib
from jaxalign import losses, sharding
from jaxalign.models import lora, transformer
from jaxalign.rewards import model as reward_model
from jaxalign.train import optim, state as state_lib, step as step_lib


@dataclasses.dataclass(frozen=True)
class Built:
  """What `build` assembles for one run (see the module docstring)."""
  mesh: jax.sharding.Mesh
  rules: tuple
  model_cfg: Any                    # transformer.ModelConfig
  spec: losses.LossSpec
  lora_cfg: lora.LoraConfig
  modules: tuple[str, ...]          # the loss's LoRA modules (OFS-DPO: fast, slow)
  frozen_ref: bool                  # the reference is computed in the step
  precompute_ref: bool              # the reference is a precomputed batch column
  ref_sync: tuple[int, float] | None  # TR-DPO (every, alpha)
  keep_reference: bool              # the state carries a reference copy (ref_params)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  graphdef: nnx.GraphDef
  abstract_state: Any               # TrainState of ShapeDtypeStructs with shardings
  state_shardings: Any
  init_fn: Callable                 # () -> the step-0 TrainState (jit it with the shardings)
  batch_sharding: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding
  step_fn: Callable                 # jitted (state, batch) -> (state, metrics), state donated
  eval_fn: Callable                 # jitted (state, batch) -> metrics, no gradients

  @property
  def saved_part(self) -> Callable:
    """state -> what a checkpoint holds: a LoRA run's base always comes from the
    config's source (seed, init_from or model.hf_path), never from the checkpoint."""
    if self.lora_cfg.enabled:
      return lambda s: s.replace(frozen=None)
    return lambda s: s


def build_model_and_state(model_cfg, tx, mesh, rules, *, seed: int, keep_reference: bool,
                          init_loss_state=None, lora_config: lora.LoraConfig | None = None,
                          modules: tuple[str, ...] = (), scalar_head: bool = False):
  """(graphdef, abstract_state, state_shardings, init_fn) with nothing allocated yet.

  With `lora_config` enabled the model carries adapters: params are the
  adapters ({name: adapters} per `modules`), frozen the base. With `scalar_head`
  (a reward-model loss) the model is rewards.model.RewardModel: params
  {backbone, head, bias}.
  """
  def make_model():
    if scalar_head:
      return reward_model.RewardModel(model_cfg, rngs=nnx.Rngs(seed))
    model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(seed))
    if lora_config is not None and lora_config.enabled:
      lora.add_adapters(model, lora_config, seed=seed)
    return model

  def init_fn():
    with nnx.logical_axis_rules(tuple(rules)):
      model = make_model()
    loss_state = init_loss_state() if init_loss_state is not None else None
    return state_lib.create_state(model, tx, seed=seed, keep_reference=keep_reference,
                                  loss_state=loss_state, modules=modules)[1]

  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
    abstract_model = nnx.eval_shape(make_model)
    graphdef, _, _ = state_lib.split_model(abstract_model)
    abstract_state = jax.eval_shape(init_fn)
  shardings = sharding.state_shardings(abstract_state, mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  return graphdef, abstract_state, shardings, init_fn


def initial_state(init_fn, tx, shardings, params=None, *, keep_reference: bool,
                  part: str | None = None):
  """The step-0 TrainState, sharded; with `params`, built around them.

  The random parameters `init_fn` would make are unused when `params` is given,
  so XLA drops them: no random copy of a large model is ever allocated.
  `part`: `params` are that entry of the model's params only (a reward model's
  "backbone"); the rest keeps its seeded init.
  """
  if params is None:
    return jax.jit(init_fn, out_shardings=shardings)()

  def from_params(p):
    state = init_fn()
    if part is not None:
      whole = state.params
      whole[part] = p
      p = whole
    return state.replace(params=p, opt_state=tx.init(p),
                         ref_params=jax.tree.map(jnp.copy, p) if keep_reference else None)

  return jax.jit(from_params, out_shardings=shardings)(params)


def build(config: config_lib.RunSpec | ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
          model_cfg=None) -> Built:
  """State, optimizer and jitted steps of the run `config` describes, on `mesh`.

  Args:
    config: a RunSpec (config.resolve for the mesh's device count: its ModelConfig
      is used as resolved), or a validated recipe.
    mesh: the run's mesh (sharding.make_mesh, or plan's multi-slice mesh).
    model_cfg: a plain config's ModelConfig when the caller already has it
      (config.model_config reads model.hf_path's config.json otherwise).
  """
  model_cfg = config_lib.model_config(config) if model_cfg is None else model_cfg
  config = config_lib.config_of(config)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  spec = losses.get(config.loss.name)
  lora_cfg = lora.config_from(config.get("lora"))
  modules = spec.modules
  frozen_ref = spec.needs_ref and config.reference.mode == "frozen"
  precompute_ref = spec.needs_ref and config.reference.mode == "precompute"
  # TR-DPO reference sync (train/ref_sync.py); validate() allows it with "frozen" only.
  sync_steps = config.reference.get("sync_steps", 0)
  ref_sync = ((sync_steps, float(config.reference.sync_alpha))
              if frozen_ref and sync_steps else None)
  if modules:
    tx, schedule = optim.modules_optimizer_from_config(
        config.optim, total_steps=config.total_steps, modules=modules)
  else:
    tx, schedule = optim.optimizer_from_config(config.optim, total_steps=config.total_steps)
  # With LoRA a frozen reference is the base with adapters off: no copy of it
  # (a synced one is the base plus a reference copy of the adapters).
  keep_reference = frozen_ref and (not lora_cfg.enabled or ref_sync is not None)
  graphdef, abstract_state, state_shardings, init_fn = build_model_and_state(
      model_cfg, tx, mesh, rules, seed=config.seed, keep_reference=keep_reference,
      init_loss_state=spec.init_state, lora_config=lora_cfg, modules=modules,
      scalar_head=reward_model.has_scalar_head(spec))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  ref_graphdef = (lora.base_graphdef(model_cfg)
                  if lora_cfg.enabled and frozen_ref and ref_sync is None else None)
  loss_call = step_lib.make_loss_call(spec, config.loss.hparams.to_dict())
  step_fn = step_lib.jit_train_step(
      graphdef=graphdef, tx=tx, schedule=schedule, loss_call=loss_call,
      chunk_size=config.logprob_chunk_size, accum_steps=config.optim.grad_accum_steps,
      skip_nonfinite=config.skip_nonfinite, state_shardings=state_shardings,
      batch_sharding=batch_sharding, replicated=replicated, ref_graphdef=ref_graphdef,
      modules=modules, module_lr_scales=optim.module_lr_scales(config.optim, modules),
      lora_dropout=lora_cfg.enabled and lora_cfg.dropout > 0, ref_sync=ref_sync)
  eval_fn = step_lib.jit_eval_step(
      graphdef=graphdef, loss_call=loss_call, chunk_size=config.logprob_chunk_size,
      state_shardings=state_shardings, batch_sharding=batch_sharding, replicated=replicated,
      ref_graphdef=ref_graphdef, modules=modules)
  return Built(mesh=mesh, rules=rules, model_cfg=model_cfg, spec=spec, lora_cfg=lora_cfg,
               modules=modules, frozen_ref=frozen_ref, precompute_ref=precompute_ref,
               ref_sync=ref_sync, keep_reference=keep_reference, tx=tx, schedule=schedule,
               graphdef=graphdef, abstract_state=abstract_state,
               state_shardings=state_shardings, init_fn=init_fn,
               batch_sharding=batch_sharding, replicated=replicated, step_fn=step_fn,
               eval_fn=eval_fn)
