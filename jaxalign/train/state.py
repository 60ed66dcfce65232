"""The train state: one pytree holding everything a step reads and writes."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign.models import lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # [] int32
  params: nnx.State            # trainable parameters (float32 master copy)
  frozen: nnx.State            # non-trainable model variables the forward needs
  opt_state: optax.OptState
  rng: jax.Array               # [2] uint32 raw PRNG key
  num_nonfinite: jax.Array     # [] int32: steps whose loss or gradient was not finite
  ref_params: Any = None       # frozen reference copy ("frozen" reference mode), else None
  loss_state: Any = None       # running statistics of stateful losses; None otherwise


def split_model(model: nnx.Module):
  """(graphdef, params, frozen): trainable nnx.Param vs every other variable.

  With LoRA adapters attached only the adapters (nnx.LoRAParam) are trainable;
  the whole base goes to `frozen`.
  """
  if lora.has_adapters(model):
    return nnx.split(model, nnx.LoRAParam, ...)
  return nnx.split(model, nnx.Param, ...)


def create_state(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int,
                 keep_reference: bool, loss_state: Any = None, modules: tuple[str, ...] = ()
                 ) -> tuple[nnx.GraphDef, TrainState]:
  """A fresh TrainState from a built model; `keep_reference` keeps a frozen copy.

  `modules` (e.g. OFS-DPO's ("fast", "slow")): params become {name: adapters},
  identical copies of the model's adapters, one per module.
  """
  graphdef, params, frozen = split_model(model)
  if modules:
    params = {m: jax.tree.map(jnp.copy, params) for m in modules}
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen=frozen,
      opt_state=tx.init(params),
      rng=jax.random.PRNGKey(seed),
      num_nonfinite=jnp.zeros((), jnp.int32),
      # A real copy: the step donates `params`, so the reference cannot alias it.
      ref_params=jax.tree.map(jnp.copy, params) if keep_reference else None,
      loss_state=loss_state,
  )
  return graphdef, state
