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
     expert into a buffer of R rows (gathered as whole TPU tiles:
     moe.take_rows), runs the grouped matmuls over it (the routing weight
     scales each row's hidden activation; rows past the local groups cost
     nothing in the megablox kernel, are left unwritten and dropped) and
     scatter-adds each row to its token in the compute dtype (`_combine`);
  3. sums over "tensor" (the F-split partial sums) and reduce-scatters over
     "data", handing each device the sum over all experts for its own tokens.
Per layer and device that moves (S - 1) n D activations in and out: less than
a dropless all-to-all when S <= k (each token would be sent to up to min(S, k)
shards, k rows of D each, instead of once to each of the S - 1 others), with no
ragged collectives, so it runs on CPU meshes (tests) as on TPU.

The buffer (`dispatch_rows`): a device's experts receive n k of the group's S n
k assignments on average, but anything from 0 to all of them, so a dropless
buffer sized for every case needs S n k rows, and every op around the kernel
(the gather of the rows, the activation, the weighted scatter back, and their
gradients) touches all of them: S times the average. The buffer is therefore
R = moe_capacity_factor x n k rows (rounded up to 8): every step runs the first
R sorted assignments through it, and a device whose experts receive more than R
in a layer also runs the rest (`_overflow`: the exact S n k-row buffer with its
first R rows' weights zeroed, under a `jax.lax.cond` decided per device, no
collective inside). Dropless in every case, the same function either way; only
the cost differs. moe_capacity_factor = 0 (or R >= S n k) is the S n k buffer
alone. The overflow's cond sits in a `jax.custom_vjp` whose backward takes the
same branch and recomputes that part's forward inside it (a differentiated cond
would hand both branches' residuals out of the forward, the S n k-row ones
zero-filled), and it is written with gathers only (libtpu 0.0.42 crashes on a
bf16 scatter-add inside a conditional). `within_capacity()` (for `jaxalign
plan`'s cost probes only) traces the bounded buffer alone, so XLA's cost
analysis, which charges a conditional its dearest branch, counts the step in
which no device overflows.

Without a mesh (or with every axis of size 1) this is moe.routed_mlp itself.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxalign.models import moe as moe_lib
from jaxalign.models import quant

TOKEN_MESH_AXES = ("data", "fsdp")
EXPERT_MESH_AXIS = "data"
HIDDEN_MESH_AXIS = "tensor"
ROW_MULTIPLE = 8                   # the bounded buffer's rows are a multiple of this

# Set by `within_capacity()`: trace the bounded buffer alone (cost probes).
_BOUNDED_ONLY = [False]


@contextlib.contextmanager
def within_capacity():
  """Trace the expert-parallel MLP with its bounded buffer alone, no exact fallback.

  For `jaxalign plan`'s cost probes only: the program then drops the assignments
  past the buffer of a device that overflows, so it is never what trains; its
  XLA cost is that of the step in which no device overflows (XLA's cost analysis
  charges a `lax.cond` its dearest branch, the S n k-row fallback).
  """
  _BOUNDED_ONLY.append(True)
  try:
    yield
  finally:
    _BOUNDED_ONLY.pop()


def dispatch_rows(*, shards: int, tokens: int, k: int, capacity_factor: float
                  ) -> tuple[int, int | None]:
  """(rows of the exact buffer, rows of the bounded one or None) on one device.

  Args:
    shards: S, the data shards the tokens are gathered over (1: no gather).
    tokens: n, the tokens of one device.
    k: experts per token.
    capacity_factor: the bounded buffer in units of the average share n k; 0: none.

  The bounded buffer exists when it is smaller than the exact one (S n k rows).
  """
  full = shards * tokens * k
  if capacity_factor <= 0:
    return full, None
  rows = -(-math.ceil(capacity_factor * tokens * k) // ROW_MULTIPLE) * ROW_MULTIPLE
  return full, (rows if rows < full else None)


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
               implementation: str = "ragged_dot", capacity_factor: float = 0.0
               ) -> jax.Array:
  """moe.routed_mlp, expert-parallel over the mesh set by `jax.set_mesh`.

  Args:
    x: [N, D] tokens (split over the batch axes).
    gate, up: [E, D, F]; down: [E, F, D] (experts over data, F over tensor): float
      arrays, or a quantized base's `quant.Blocks` (codes and scales in the weight's
      axis order), which enter the shard_map as they are stored, so what the mesh
      moves (the FSDP gather over "fsdp") is codes, and each device dequantizes its
      own experts' part right before the grouped matmuls, in x's dtype.
    weights: [N, k] routing weights; experts: [N, k] int expert ids.
    activation: the gate's nonlinearity.
    implementation: the grouped-matmul kernel (jaxalign.models.grouped_matmul).
    capacity_factor: the bounded buffer's rows in units of a device's average
      share n k (module docstring); 0: the exact S n k-row buffer alone.

  Returns:
    [N, D] in x's dtype, equal to moe.routed_mlp on one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(int(s) == 1 for s in mesh.shape.values()):
    gate, up, down = (quant.materialize(w, x.dtype) for w in (gate, up, down))
    return moe_lib.routed_mlp(x, gate, up, down, weights, experts, activation,
                              implementation=implementation)
  n_experts, hidden = gate.shape[0], gate.shape[2]
  plan = layout(mesh, tokens=x.shape[0], experts=n_experts, hidden=hidden)
  tok = plan["tokens"] or None
  exp, hid = plan["experts"], plan["hidden"]

  def local(x, gate, up, down, weights, experts):
    # This device's experts (whole blocks of a quantized base: config validation).
    gate, up, down = (quant.materialize(w, x.dtype) for w in (gate, up, down))
    if plan["gather"]:
      shards = jax.lax.axis_size(exp)
      x, weights, experts = (jax.lax.all_gather(a, exp, axis=0, tiled=True)
                             for a in (x, weights, experts))
      ids = experts - jax.lax.axis_index(exp) * gate.shape[0]
      full, bounded = dispatch_rows(shards=shards, tokens=x.shape[0] // shards,
                                    k=experts.shape[1], capacity_factor=capacity_factor)
      w, token, inverse, group_sizes = _sorted_assignments(weights, ids, gate.shape[0])
      y = _rows_mlp(x, gate, up, down, w, token, group_sizes, activation, implementation,
                    bounded or full)
      if bounded and not _BOUNDED_ONLY[-1]:
        y = y.astype(jnp.float32) + _overflow(x, gate, up, down, w, token, inverse,
                                              group_sizes, activation, implementation,
                                              bounded)
      y = y.astype(x.dtype)
      # Summed in the compute dtype (bf16 at scale: half the bytes of float32); a
      # token's sum has at most k nonzero terms, one per shard holding its experts.
      y = jax.lax.psum_scatter(y, exp, scatter_dimension=0, tiled=True)
    else:
      ids = experts
      if exp is not None:
        local_experts = gate.shape[0]
        ids = experts - jax.lax.axis_index(exp) * local_experts
        mine = (ids >= 0) & (ids < local_experts)
        ids = jnp.where(mine, ids, local_experts)     # past every group: sorted last, zero
        weights = jnp.where(mine, weights, 0)
      y = moe_lib.routed_mlp(x, gate, up, down, weights, ids, activation,
                             implementation=implementation)
      if exp is not None:
        y = jax.lax.psum(y, exp)
    if hid is not None:
      y = jax.lax.psum(y, hid)
    return y

  token_spec = P(tok, None)
  spec_of = lambda w, spec: jax.tree.map(lambda _: spec, w)   # Blocks: codes and scale
  in_specs = (token_spec, spec_of(gate, P(exp, None, hid)), spec_of(up, P(exp, None, hid)),
              spec_of(down, P(exp, hid, None)), token_spec, token_spec)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=token_spec,
                       check_vma=False)(x, gate, up, down, weights, experts)


def _sorted_assignments(weights, ids, n_local):
  """The group's assignments sorted by local expert, others' last.

  Args:
    weights: [M, k]; ids: [M, k] int local expert ids (outside 0..n_local - 1:
      another shard's expert, which contributes nothing here).

  Returns:
    w: [M k] the weight of each sorted assignment (0 for another shard's); token:
    [M k] int32 its token; inverse: [M k] int32 the sorted position of flat
    assignment j (token j // k, slot j % k); group_sizes: [n_local] int32
    assignments per local expert.
  """
  k = ids.shape[1]
  mine = (ids >= 0) & (ids < n_local)
  flat = jnp.where(mine, ids, n_local).reshape(-1)                 # [M k], n_local: not here
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  group_sizes = jnp.zeros((n_local,), jnp.int32).at[flat].add(1)
  return (jnp.where(mine, weights, 0).reshape(-1)[order], order // k, inverse, group_sizes)


def _expert_rows(xs, gate, up, down, group_sizes, activation, implementation):
  """[rows, D] rows sorted by expert -> each row through its expert's gated MLP
  (moe.expert_mlp)."""
  return moe_lib.expert_mlp(xs, gate, up, down, group_sizes, activation,
                            implementation=implementation)


def _rows_mlp(x, gate, up, down, w, token, group_sizes, activation, implementation, rows):
  """The local experts' share of moe.routed_mlp over the first `rows` sorted
  assignments (`_sorted_assignments`): a buffer of `rows` rows.

  Args:
    x: [M, D] the group's tokens; gate, up: [E_l, D, F]; down: [E_l, F, D].
    w, token: [M k] sorted weights and tokens; group_sizes: [E_l].
    rows: the buffer's rows; the assignments past it are left to `_overflow`.

  Returns:
    [M, D] in x's dtype: sum over each token's first-`rows` local assignments of
    weight x expert(x) (`_combine`).
  """
  token, w = token[:rows], w[:rows]                                  # [rows]
  group_sizes = jnp.diff(jnp.minimum(jnp.cumsum(group_sizes), rows), prepend=0)
  # Rows past the local groups (others' assignments, or none): the kernel leaves
  # them unwritten (zero_tail=False spares a pass over [rows, D] that would zero
  # them), so they get no weight and reach neither the output nor a gradient.
  valid = jnp.arange(rows) < jnp.sum(group_sizes)
  w = jnp.where(valid, w, 0)
  xs = checkpoint_name(moe_lib.take_rows(x, token, valid), "moe_rows")  # [rows, D] sorted
  ys = moe_lib.expert_mlp(xs, gate, up, down, group_sizes, activation,
                          implementation=implementation, row_weights=w,
                          zero_tail=False)                          # weighted rows
  return _combine(ys, token, valid, x.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine(ys, token, valid, m):
  """[m, D] in ys's dtype: row r of ys [R, D] summed onto token[r], the rows where
  valid [R] is set (the others may hold anything, NaN included).

  Summed in ys's dtype, as transformers' Qwen3-MoE and Mixtral sum their experts'
  outputs (index_add_ in the model dtype): a float32 sum would write the rows in
  float32 first, twice their bytes. Its own VJP so that the backward gathers the
  output's gradient in ys's dtype as whole tiles (moe.take_rows), where the
  differentiated scatter-add would gather it as [R, D] rows (in float32 when the
  sum was: XLA counts 6.4 GB against 1.6 GB for R = 81,920 rows of 2048 on a v5p
  chip). The routing weights are already in the rows (moe.expert_mlp)."""
  target = jnp.where(valid, token, m)                                # m: dropped
  return jnp.zeros((m, ys.shape[1]), ys.dtype).at[target].add(ys, mode="drop")


def _combine_fwd(ys, token, valid, m):
  return _combine(ys, token, valid, m), (token, valid)


def _combine_bwd(m, residuals, grad):
  token, valid = residuals
  return (moe_lib.take_rows(grad, token), np.zeros(token.shape, jax.dtypes.float0),
          np.zeros(valid.shape, jax.dtypes.float0))


_combine.defvjp(_combine_fwd, _combine_bwd)


# The assignments past the bounded buffer. Inside a lax.cond (taken when a device's
# experts receive more than `skip` assignments) and written with gathers only, both
# ways: libtpu 0.0.42's compiler crashes (SIGSEGV in SortedScatterEmitter) on a bf16
# step with a scatter-add inside a conditional branch; the custom VJP keeps the
# scatters a differentiated gather would make out of it, and hands no residual out
# of the forward's cond (a differentiated cond hands out every branch's residuals).
@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _overflow(x, gate, up, down, w, token, inverse, group_sizes, activation, implementation,
              skip):
  """[M, D] float32: the sum over the sorted assignments from position `skip` on (all
  of the exact buffer's M k rows computed), zeros when there are none."""
  return jax.lax.cond(
      jnp.sum(group_sizes) <= skip,
      lambda *a: jnp.zeros((x.shape[0], x.shape[1]), jnp.float32),
      functools.partial(_overflow_rows, activation=activation, implementation=implementation,
                        skip=skip),
      x, gate, up, down, w, token, inverse, group_sizes)


def _overflow_rows(x, gate, up, down, w, token, inverse, group_sizes, *, activation,
                   implementation, skip):
  m, d = x.shape
  w = jnp.where(jnp.arange(w.size) >= skip, w, 0)                    # [M k]
  ys = _expert_rows(x[token], gate, up, down, group_sizes, activation, implementation)
  yw = ys.astype(jnp.float32) * w[:, None].astype(jnp.float32)       # [M k, D] sorted
  return yw[inverse].reshape(m, -1, d).sum(axis=1)                   # token order


def _overflow_fwd(x, gate, up, down, w, token, inverse, group_sizes, activation,
                  implementation, skip):
  y = _overflow(x, gate, up, down, w, token, inverse, group_sizes, activation, implementation,
                skip)
  return y, (x, gate, up, down, w, token, inverse, group_sizes)


def _overflow_bwd(activation, implementation, skip, residuals, grad):
  x, gate, up, down, w, token, inverse, group_sizes = residuals
  m, d = x.shape

  def grads(x, gate, up, down, w, token, inverse, group_sizes, grad):
    keep = jnp.arange(w.size) >= skip
    ys, pullback = jax.vjp(
        lambda xs, a, b, c: _expert_rows(xs, a, b, c, group_sizes, activation, implementation),
        x[token], gate, up, down)
    g_rows = grad[token]                                             # [M k, D] sorted
    dw = jnp.where(keep, jnp.sum(ys.astype(jnp.float32) * g_rows, axis=-1), 0)
    dys = (g_rows * jnp.where(keep, w, 0)[:, None]).astype(ys.dtype)
    dxs, dgate, dup, ddown = pullback(dys)
    # x[token]'s transpose as a gather: a token's rows sit at its slots' positions.
    dx = dxs.astype(jnp.float32)[inverse].reshape(m, -1, d).sum(axis=1)
    return dx.astype(x.dtype), dgate, dup, ddown, dw.astype(w.dtype)

  def zeros(x, gate, up, down, w, *_):
    return tuple(jnp.zeros_like(a) for a in (x, gate, up, down, w))

  out = jax.lax.cond(jnp.sum(group_sizes) <= skip, zeros, grads,
                     x, gate, up, down, w, token, inverse, group_sizes, grad)
  return (*out, None, None, None)


_overflow.defvjp(_overflow_fwd, _overflow_bwd)
