"""The one place a run's train state, optimizer and jitted steps are assembled.

`build(spec, mesh)` turns a resolved config (config.resolve's RunSpec) into
everything the device side of a run needs, with nothing allocated yet: the model
graph, the abstract state and its shardings, the optimizer (one per LoRA module
for OFS-DPO), the jitted train step and the jitted held-out eval step.
`jaxalign train` (train/loop.py) and `jaxalign plan` (plan.py) both call it, so
what is planned is what runs: a LoRA recipe plans the adapters' step, an
OFS-DPO recipe the two modules and their optimizers. Tests and benches reach it
through `build_config(config, devices)`, so what they check or time is that step too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import optax
from flax import nnx

from jaxalign import config as config_lib
from jaxalign import sharding
from jaxalign.models import lora, transformer
from jaxalign.rewards import model as reward_model
from jaxalign.train import optim, state as state_lib, step as step_lib


@dataclasses.dataclass(frozen=True)
class Built:
  """What `build` assembles for one run: the device side, nothing the spec already says."""
  run_spec: config_lib.RunSpec      # what it was built from (model, loss, LoRA, reference)
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  graphdef: nnx.GraphDef
  abstract_state: Any               # TrainState of ShapeDtypeStructs with shardings
  state_shardings: Any
  init_fn: Callable                 # () -> the step-0 TrainState (jit it with the shardings)
  batch_sharding: jax.sharding.NamedSharding
  step_fn: Callable                 # jitted (state, batch) -> (state, metrics), state donated
  eval_fn: Callable                 # jitted (state, batch) -> metrics, no gradients

  @property
  def flops_terms(self) -> dict[str, Any]:
    """What the model-FLOPs count (flops.model_flops) needs beyond the ModelConfig, the
    same for `jaxalign plan` and the run's perf/ metrics: a frozen reference in the
    step, LoRA (the base gets no weight gradient), the adapters one policy pass trains
    and the passes (OFS-DPO: one per module)."""
    spec = self.run_spec
    passes = max(1, len(spec.modules))
    trainable = sum(int(math.prod(a.shape)) for a in jax.tree.leaves(self.abstract_state.params))
    lora_on = spec.lora_cfg.enabled
    return dict(frozen_reference=spec.frozen_ref, lora=lora_on, policy_passes=passes,
                adapter_params=trainable // passes if lora_on else 0)

  @property
  def saved_part(self) -> Callable:
    """state -> what a checkpoint holds: a LoRA run's base always comes from the
    config's source (seed, init_from or model.hf_path), never from the checkpoint."""
    if self.run_spec.lora_cfg.enabled:
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
    if lora_config is not None and lora_config.enabled:
      # The frozen base, quantized when lora.base_dtype says so, then the adapters.
      model = lora.base_model(model_cfg, seed=seed, base_dtype=lora_config.base_dtype)
      return lora.add_adapters(model, lora_config, seed=seed)
    return transformer.Transformer(model_cfg, rngs=nnx.Rngs(seed))

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


def build(spec: config_lib.RunSpec, mesh: jax.sharding.Mesh) -> Built:
  """State, optimizer and jitted steps of the run `spec` describes, on `mesh`.

  Args:
    spec: the resolved run (config.resolve for the mesh's device count).
    mesh: the run's mesh (sharding.make_mesh, or plan's multi-slice mesh).
  """
  modules = spec.modules
  if modules:
    tx, schedule = optim.modules_optimizer_from_config(
        spec.optim, total_steps=spec.total_steps, modules=modules)
  else:
    tx, schedule = optim.optimizer_from_config(spec.optim, total_steps=spec.total_steps)
  graphdef, abstract_state, state_shardings, init_fn = build_model_and_state(
      spec.model_cfg, tx, mesh, spec.rules, seed=spec.seed, keep_reference=spec.keep_reference,
      init_loss_state=spec.loss.init_state, lora_config=spec.lora_cfg, modules=modules,
      scalar_head=reward_model.has_scalar_head(spec.loss))
  batch_sharding = sharding.batch_sharding(mesh, spec.rules)
  replicated = sharding.replicated(mesh)
  # With LoRA a frozen reference is the base with adapters off: no copy of it
  # (a synced one is the base plus a reference copy of the adapters).
  ref_graphdef = (lora.base_graphdef(spec.model_cfg, spec.lora_cfg.base_dtype)
                  if spec.lora_cfg.enabled and spec.frozen_ref and spec.ref_sync is None
                  else None)
  loss_call = step_lib.make_loss_call(spec.loss, dict(spec.hparams),
                                      token_metrics=bool(spec.config.get("token_metrics", True)))
  step_fn = step_lib.jit_train_step(
      graphdef=graphdef, tx=tx, schedule=schedule, loss_call=loss_call,
      chunk_size=spec.logprob_chunk_size, accum_steps=spec.optim.grad_accum_steps,
      skip_nonfinite=spec.skip_nonfinite, state_shardings=state_shardings,
      batch_sharding=batch_sharding, replicated=replicated, ref_graphdef=ref_graphdef,
      modules=modules, module_lr_scales=optim.module_lr_scales(spec.optim, modules),
      lora_dropout=spec.lora_cfg.enabled and spec.lora_cfg.dropout > 0,
      ref_sync=spec.ref_sync)
  eval_fn = step_lib.jit_eval_step(
      graphdef=graphdef, loss_call=loss_call, chunk_size=spec.logprob_chunk_size,
      state_shardings=state_shardings, batch_sharding=batch_sharding, replicated=replicated,
      ref_graphdef=ref_graphdef, modules=modules)
  return Built(run_spec=spec, mesh=mesh, tx=tx, graphdef=graphdef,
               abstract_state=abstract_state, state_shardings=state_shardings,
               init_fn=init_fn, batch_sharding=batch_sharding, step_fn=step_fn,
               eval_fn=eval_fn)


def build_config(config, devices: Sequence[jax.Device] | None = None) -> Built:
  """`build` of a recipe on `devices` (default all): the train step `jaxalign train` runs.

  For tests and benches. The step-0 state is then `init.initial_state(built.run_spec,
  built, fresh=True)` under `built.mesh`.

  Args:
    config: a ConfigDict (validated and resolved here, config.resolve for
      len(devices)) or a RunSpec already resolved for that many devices.
    devices: the devices of the mesh config.mesh.shape describes.

  Raises:
    ConfigError: the config cannot run on that many devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  spec = config_lib.resolve(config, len(devices), platform=devices[0].platform)
  return build(spec, sharding.make_mesh(spec.mesh_shape, devices))
