"""The routed-experts MLP on a device mesh: experts split over the "data" axis.

Layout (jaxalign.sharding's table: "expert" -> "data", "embed" -> "fsdp",
"mlp" -> "tensor"): the E experts are split over "data" (E / data whole
experts per data shard: expert parallelism), each expert's weights FSDP-sharded
over "fsdp" inside its data shard and split over "tensor" along the expert
hidden size F. Why "data" and not "fsdp" or a new "expert" mesh axis:
  - the experts hold nearly all of an MoE model's parameters (29.0B of
    Qwen3-30B-A3B's 30.5B) and "data" is the axis that replicates parameters in
    the dense layout; splitting the experts over it removes exactly that
    replication, while the dense weights (attention, embeddings) keep theirs;
  - "fsdp" already holds the experts' embed dimension (the weights' logical
    names are ("expert", "embed", "mlp") and Flax NNX maps each name through
    the rules independently, so "expert" -> "fsdp" would put two dimensions of
    one array on one axis);
  - a new mesh axis would change every recipe's mesh.shape for no gain: a
    mesh (data=G, fsdp=F, tensor) already is G expert groups of F-way FSDP.
With data = 1 (the default mesh (1, -1, 1)) the experts are not split: they are
FSDP-sharded over "fsdp" like dense weights and gathered per layer.

The token exchange is a gather, not an all-to-all. Tokens are split over the
batch axes ("data", "fsdp"); inside `shard_map` each device
  1. all-gathers the tokens and their routing (weights, experts) over "data":
     S = data shards x n tokens each (the expert weights arrive gathered over
     "fsdp", the FSDP all-gather of its own E / S experts only);
  2. keeps the assignments that go to its own E / S experts (the others get a
     sentinel id >= E / S that sorts them past every group), sorts them by
     expert and runs the grouped matmuls over them (rows past the local groups
     cost nothing in the megablox kernel and come out zero);
  3. sums over "tensor" (the F-split partial sums) and reduce-scatters over
     "data", handing each device the sum over all experts for its own tokens.
Per layer and device that moves (S - 1) n D activations in and out: the
volume of a dropless all-to-all when S is about k (each token is sent to up to
k shards), with no ragged collectives, so it runs on CPU meshes (tests) as on
TPU. Dropless: the sorted buffer holds every assignment of the group (S n k
rows), so no token is ever dropped; its size, not the compute, grows with S
(docs/scaling.md).

Without a mesh (or with every axis of size 1) this is moe.routed_mlp itself.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxalign.models import moe as moe_lib

TOKEN_MESH_AXES = ("data", "fsdp")
EXPERT_MESH_AXIS = "data"
HIDDEN_MESH_AXIS = "tensor"


def _split(mesh, axes: tuple[str, ...], size: int) -> tuple[str, ...]:
  """The axes of `axes` in `mesh` with more than one device, dropped from the end
  until their product divides `size`."""
  names = [a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1]
  while names and size % int(np.prod([mesh.shape[a] for a in names])):
    names.pop()
  return tuple(names)


def layout(mesh, *, tokens: int, experts: int, hidden: int) -> dict:
  """How `routed_mlp` splits one call: {"tokens": batch axes of the N tokens,
  "experts": the axis the E experts are split over or None, "hidden": the axis
  the expert hidden size F is split over or None, "gather": whether tokens are
  all-gathered over the expert axis}."""
  token_axes = _split(mesh, TOKEN_MESH_AXES, tokens)
  expert = EXPERT_MESH_AXIS if _split(mesh, (EXPERT_MESH_AXIS,), experts) else None
  hidden_axis = HIDDEN_MESH_AXIS if _split(mesh, (HIDDEN_MESH_AXIS,), hidden) else None
  return {"tokens": token_axes, "experts": expert, "hidden": hidden_axis,
          "gather": expert is not None and expert in token_axes}


def routed_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
               weights: jax.Array, experts: jax.Array,
               activation: Callable[[jax.Array], jax.Array], *,
               implementation: str = "ragged_dot") -> jax.Array:
  """moe.routed_mlp, expert-parallel over the mesh set by `jax.set_mesh`.

  Args:
    x: [N, D] tokens (split over the batch axes).
    gate, up: [E, D, F]; down: [E, F, D] (experts over data, F over tensor).
    weights: [N, k] routing weights; experts: [N, k] int expert ids.
    activation: the gate's nonlinearity.
    implementation: the grouped-matmul kernel (jaxalign.models.grouped_matmul).

  Returns:
    [N, D] in x's dtype, equal to moe.routed_mlp on one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(int(s) == 1 for s in mesh.shape.values()):
    return moe_lib.routed_mlp(x, gate, up, down, weights, experts, activation,
                              implementation=implementation)
  n_experts, hidden = gate.shape[0], gate.shape[2]
  plan = layout(mesh, tokens=x.shape[0], experts=n_experts, hidden=hidden)
  tok = plan["tokens"] or None
  exp, hid = plan["experts"], plan["hidden"]

  def local(x, gate, up, down, weights, experts):
    if plan["gather"]:
      x, weights, experts = (jax.lax.all_gather(a, exp, axis=0, tiled=True)
                             for a in (x, weights, experts))
    ids = experts
    if exp is not None:
      local_experts = gate.shape[0]
      ids = experts - jax.lax.axis_index(exp) * local_experts
      mine = (ids >= 0) & (ids < local_experts)
      ids = jnp.where(mine, ids, local_experts)     # past every group: sorted last, zero
      weights = jnp.where(mine, weights, 0)
    y = moe_lib.routed_mlp(x, gate, up, down, weights, ids, activation,
                           implementation=implementation)
    # Summed in the compute dtype (bf16 at scale: half the bytes of float32); a
    # token's sum has at most k nonzero terms, one per shard holding its experts.
    if plan["gather"]:
      y = jax.lax.psum_scatter(y, exp, scatter_dimension=0, tiled=True)
    elif exp is not None:
      y = jax.lax.psum(y, exp)
    if hid is not None:
      y = jax.lax.psum(y, hid)
    return y

  token_spec = P(tok, None)
  in_specs = (token_spec, P(exp, None, hid), P(exp, None, hid), P(exp, hid, None),
              token_spec, token_spec)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=token_spec,
                       check_vma=False)(x, gate, up, down, weights, experts)
