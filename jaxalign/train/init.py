"""The step-0 train state of a run: its starting parameters and what is built around them.

`initial_state(spec, built, fresh=...)` is the one place a run's first state is
made, sharded, before any pass over the data or any step: a full fine-tune's
params (rundir.starting_params: init_from, model.hf_path or the seed), or a LoRA
run's frozen base (the same source) with fresh adapters or lora.init_adapters.
A resumed run then overwrites the saved part from its checkpoint (train/resume.py).
"""

import jax
import jax.numpy as jnp

from jaxalign import config as config_lib
from jaxalign.models import lora
from jaxalign.rewards import model as reward_model
from jaxalign.train import build as build_lib, rundir


def initial_state(spec: config_lib.RunSpec, built: build_lib.Built, *, fresh: bool):
  """The step-0 TrainState of `spec`, sharded (call under the run's mesh).

  `fresh`: the initial policy is needed (a fresh run, or a resume whose reference
  log-probs are recomputed); otherwise a full fine-tune's params are left to the
  seed init, which the resume replaces. A LoRA base is always loaded: checkpoints
  never hold it.
  """
  abstract = built.abstract_state
  if spec.lora_cfg.enabled:
    base = _starting(spec, abstract.frozen)
    if base is None:
      state = jax.jit(built.init_fn, out_shardings=built.state_shardings)()
    else:
      # The seeded base init_fn would make is never computed (XLA drops it): no
      # random float copy of a large (or quantized: lora.base_dtype) base is made.
      state = jax.jit(lambda: built.init_fn().replace(frozen=None),
                      out_shardings=built.state_shardings.replace(frozen=None))()
      state = state.replace(frozen=base)
    return _with_init_adapters(spec, built, state) if fresh else state
  # A reward model starts its backbone from the source; its scalar head keeps the seed init.
  part = "backbone" if reward_model.has_scalar_head(spec.loss) else None
  params = (_starting(spec, abstract.params[part] if part else abstract.params)
            if fresh else None)
  return _state_around(built, params, keep_reference=spec.frozen_ref, part=part)


def _starting(spec: config_lib.RunSpec, abstract):
  return rundir.starting_params(abstract, init_from=spec.init_from, hf_dir=spec.hf_dir,
                                model_cfg=spec.model_cfg)


def _state_around(built: build_lib.Built, params, *, keep_reference: bool,
                  part: str | None = None):
  """The step-0 TrainState, sharded; with `params`, built around them.

  The random parameters `init_fn` would make are unused when `params` is given,
  so XLA drops them: no random copy of a large model is ever allocated.
  `part`: `params` are that entry of the model's params only (a reward model's
  "backbone"); the rest keeps its seeded init.
  """
  if params is None:
    return jax.jit(built.init_fn, out_shardings=built.state_shardings)()
  tx = built.tx

  def from_params(p):
    state = built.init_fn()
    if part is not None:
      whole = state.params
      whole[part] = p
      p = whole
    return state.replace(params=p, opt_state=tx.init(p),
                         ref_params=jax.tree.map(jnp.copy, p) if keep_reference else None)

  return jax.jit(from_params, out_shardings=built.state_shardings)(params)


def _with_init_adapters(spec: config_lib.RunSpec, built: build_lib.Built, state):
  """A fresh LoRA state's adapters from lora.init_adapters, when set (every module
  starts from the same stored adapter; a synced reference starts as the policy)."""
  if not spec.init_adapters:
    return state
  modules = spec.modules
  abstract = built.abstract_state.params
  adapters = lora.load_adapters(spec.init_adapters, abstract[modules[0]] if modules else abstract)
  params = {m: jax.tree.map(jnp.copy, adapters) for m in modules} if modules else adapters
  state = state.replace(params=params, opt_state=jax.jit(
      built.tx.init, out_shardings=built.state_shardings.opt_state)(params))
  if state.ref_params is not None:
    state = state.replace(ref_params=jax.tree.map(jnp.copy, params))
  return state
