"""Routing math of the mixture-of-experts MLP: pure functions of arrays, no modules.

A token's router logits [E] pick its top-k experts (`route`); the N * k
(token, expert) assignments are sorted by expert so each expert's tokens are
contiguous (`sort_by_expert`), each expert's SwiGLU runs as one grouped matmul
over its group (`grouped_matmul`, `routed_mlp`), and the outputs go back to
token order, summed with the routing weights. Dropless: every token reaches
all of its k experts, whatever the load.

Routing rules (`route`): softmax over the E logits in float32, the k largest
probabilities, renormalized to sum to one when `norm_topk` (Qwen3-MoE's
norm_topk_prob; Mixtral's softmax over its top-k logits is the same function,
since softmax is monotone and its top-k renormalized is the softmax of the
top-k logits); without it the raw probabilities (Qwen3-MoE norm_topk_prob=False).

Router losses, over real tokens only (`router_stats`, `router_losses`):
- load balancing (Switch Transformer eqs. 4-6, as transformers'
  `load_balancing_loss_func`): E * sum_e f_e * P_e, f_e the share of the
  (token, slot) assignments going to expert e counted over all k slots (so k
  at perfect balance), P_e the mean router probability of e; both pooled over
  every MoE layer's real tokens before the product, as transformers does.
- router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over real tokens and
  layers of logsumexp(logits)^2.
`router_stats` keeps the sums behind those means (additive over layers and
forwards), so a model reports one small dict however many layers it has.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxalign.models import grouped_matmul as grouped_matmul_lib

# The sums behind the router losses; each is additive over layers and forwards.
STAT_KEYS = ("tokens", "expert_counts", "expert_probs", "z_sum")


def route(router_logits: jax.Array, k: int, norm_topk: bool) -> tuple[jax.Array, jax.Array]:
  """Each token's top-k experts and their weights.

  Args:
    router_logits: [N, E] any float dtype.
    k: experts per token (1 <= k <= E).
    norm_topk: renormalize the k probabilities to sum to 1 (Qwen3-MoE
      norm_topk_prob=True, Mixtral); else the softmax probabilities as they are.

  Returns:
    weights: [N, k] float32, in decreasing order.
    experts: [N, k] int32 expert ids.
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)   # [N, E]
  weights, experts = jax.lax.top_k(probs, k)
  if norm_topk:
    weights = weights / weights.sum(axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


LANE = 128   # a TPU tile's minor dimension


def take_rows(x: jax.Array, index: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """x[index] for x [M, D] and index [R] int in [0, M): [R, D].

  Gathered as [M, D / 128, 128] when D is a multiple of 128, so that on TPU a row is
  whole tiles: a TPU array's two minor dimensions are tiled (8 x 128 for 32-bit, 16 x
  128 for bf16), so a row of a [M, D] array is 1/8 or 1/16 of each tile it touches
  and gathering it reads every one of them (XLA's cost analysis counts a [32768,
  2048] -> [81920, 2048] bf16 row gather as 3.0 GB, nine times the rows' bytes; as
  [.., 16, 128] 0.67 GB plus 0.94 GB to lay the result out as [R, D] again:
  libtpu 0.0.42, one v5p chip). Elsewhere the same values. The gradient is the
  scatter-add of the rows onto [M, D] in the [M, D] layout (where XLA counts it
  cheaper than in the three-dimensional one).

  valid: [R] bool; the gradient of x takes only the rows where it is set (the others'
  gradient rows may hold anything, NaN included: grouped_matmul's zero_tail=False).
  """
  if valid is None:
    valid = jnp.ones(index.shape, bool)
  return _gather_rows(x, index, valid)


@jax.custom_vjp
def _gather_rows(x, index, valid):
  return _take_rows(x, index)


def _take_rows(x, index):
  m, d = x.shape
  if d % LANE:
    return x[index]
  return x.reshape(m, d // LANE, LANE)[index].reshape(index.shape[0], d)


def _gather_rows_fwd(x, index, valid):
  return _take_rows(x, index), (index, valid, x.shape[0])


def _gather_rows_bwd(residuals, grad):
  index, valid, m = residuals
  target = jnp.where(valid, index, m)                                # m: dropped
  dx = jnp.zeros((m, grad.shape[1]), grad.dtype).at[target].add(grad, mode="drop")
  return dx, np.zeros(index.shape, jax.dtypes.float0), np.zeros(valid.shape, jax.dtypes.float0)


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def sort_by_expert(experts: jax.Array, n_experts: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The order that groups the N * k assignments by expert.

  Args:
    experts: [N, k] int expert ids.
    n_experts: E.

  Returns:
    order: [N * k] int32: sorted position i holds flat assignment order[i]
      (token order[i] // k, slot order[i] % k); stable, so within an expert
      tokens keep their order.
    inverse: [N * k] int32: flat assignment j sits at sorted position inverse[j].
    group_sizes: [E] int32 assignments per expert (sums to N * k).
  """
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  group_sizes = jnp.zeros((n_experts,), jnp.int32).at[flat].add(1)
  return order, inverse, group_sizes


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   implementation: str = "ragged_dot", zero_tail: bool = True) -> jax.Array:
  """Rows of `lhs` in consecutive groups, group g times rhs[g].

  Args:
    lhs: [M, K], rows sorted by group (group g: group_sizes[g] rows).
    rhs: [G, K, N] (cast to lhs's dtype).
    group_sizes: [G] int32, summing to at most M; rows past the sum give zeros.
    implementation: "auto" | "ragged_dot" | "megablox" (jaxalign.models.grouped_matmul).
    zero_tail: False: rows past the groups unspecified (grouped_matmul_lib).

  Returns:
    [M, N] in lhs's dtype.
  """
  return grouped_matmul_lib.grouped_matmul(lhs, rhs.astype(lhs.dtype), group_sizes,
                                           implementation=implementation,
                                           zero_tail=zero_tail)


def routed_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
               weights: jax.Array, experts: jax.Array,
               activation: Callable[[jax.Array], jax.Array], *,
               implementation: str = "ragged_dot") -> jax.Array:
  """sum_j weights[n, j] * down_e(act(gate_e(x_n)) * up_e(x_n)), e = experts[n, j].

  Args:
    x: [N, D] tokens in the compute dtype.
    gate, up: [E, D, F] expert weights; down: [E, F, D] (cast to x's dtype).
    weights: [N, k] routing weights; experts: [N, k] int expert ids (`route`).
    activation: the gate's nonlinearity (silu: SwiGLU).
    implementation: the grouped-matmul kernel (`grouped_matmul`).

  Expert ids >= E are dropped (sorted last, past every group: they contribute zero);
  the expert-parallel path marks the experts of other shards so.

  Returns:
    [N, D] in x's dtype.

  The N tokens are sorted as one set. MoeMLP passes every token of the forward,
  so under a mesh that splits the batch XLA gathers the routing to sort it whole
  (each device then runs every expert group: seen in the compiled HLO on 8 fake
  devices); a per-shard call (shard_map over the batch axes, as expert
  parallelism needs anyway) keeps the sort and the matmuls local.
  """
  n, k = experts.shape
  order, inverse, group_sizes = sort_by_expert(experts, gate.shape[0])
  xs = take_rows(x, order // k)                                        # [N*k, D] sorted
  ys = expert_mlp(xs, gate, up, down, group_sizes, activation, implementation=implementation)
  y = take_rows(ys, inverse).reshape(n, k, -1)                         # token order
  return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype),
                    preferred_element_type=jnp.float32).astype(x.dtype)


def expert_mlp(xs: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
               group_sizes: jax.Array, activation: Callable[[jax.Array], jax.Array], *,
               implementation: str = "ragged_dot",
               row_weights: jax.Array | None = None, zero_tail: bool = True) -> jax.Array:
  """Rows sorted by expert [R, D] -> each row through its expert's gated MLP, [R, D].

  row_weights: [R] each row's routing weight, applied to the hidden activation
  (w (act(x G) * x U) D = w (act(x G) * x U D)): there it rides in the activation's
  fusion on F-wide rows, where on the output it would be one more pass over D-wide
  rows, forward and backward (D = 2048 against F = 768 for Qwen3-30B-A3B).

  The projections are named for the remat policies ("mlp_gate", "mlp_up",
  "mlp_down"). (One grouped matmul over the gate and up weights side by side,
  [E, D, 2F], reads the rows once instead of twice, but XLA counted 1.2 GB more for
  a Qwen3-30B-A3B layer on a v5p chip: the weights' concatenation and the split of
  their gradient cost more than the read saved.)
  """
  matmul = functools.partial(grouped_matmul, group_sizes=group_sizes,
                             implementation=implementation, zero_tail=zero_tail)
  g = checkpoint_name(matmul(xs, gate), "mlp_gate")                  # [R, F]
  h = activation(g) * checkpoint_name(matmul(xs, up), "mlp_up")
  if row_weights is not None:
    h = h * row_weights[:, None].astype(h.dtype)
  return checkpoint_name(matmul(h, down), "mlp_down")                # [R, D]


def router_stats(router_logits: jax.Array, experts: jax.Array,
                 mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """The sums behind the router losses, over one layer's real tokens.

  Args:
    router_logits: [N, E].
    experts: [N, k] int, the chosen experts (`route`).
    mask: [N] bool/int, 1 for real tokens (None: all real).

  Returns:
    {"tokens": [] real tokens, "expert_counts": [E] real assignments per
    expert (summed over the k slots), "expert_probs": [E] summed softmax
    probabilities, "z_sum": [] summed logsumexp(logits)^2}, float32.
  """
  n, e = router_logits.shape
  logits = router_logits.astype(jnp.float32)
  m = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  lse = jax.nn.logsumexp(logits, axis=-1)                              # [N]
  counts = jnp.zeros((e,), jnp.float32).at[experts.reshape(-1)].add(
      jnp.repeat(m, experts.shape[1]))
  return {"tokens": m.sum(), "expert_counts": counts,
          "expert_probs": (probs * m[:, None]).sum(axis=0), "z_sum": (m * lse * lse).sum()}


def add_stats(*stats: dict | None) -> dict:
  """The sum of router-stat dicts (None and empty ones, from dense models, skipped)."""
  present = [s for s in stats if s]
  if not present:
    return {}
  return {key: sum(s[key] for s in present) for key in STAT_KEYS}


def router_losses(stats: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(load-balancing aux loss, router z-loss) of pooled `router_stats` (see the
  module docstring); 0 for a batch without real tokens.

  The aux loss is E * sum_e (counts_e / tokens) * (probs_e / tokens): with
  tokens summed over layers this is transformers' load_balancing_loss_func
  given every layer's logits and the attention mask.
  """
  tokens = jnp.maximum(stats["tokens"], 1.0)
  n_experts = stats["expert_counts"].shape[-1]
  f = jax.lax.stop_gradient(stats["expert_counts"]) / tokens
  p = stats["expert_probs"] / tokens
  return n_experts * jnp.sum(f * p), stats["z_sum"] / tokens
