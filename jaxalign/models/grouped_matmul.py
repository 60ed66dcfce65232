"""Grouped matrix multiplication of token-sorted rows by per-group weights, with a
choice of kernel.

`grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G])` multiplies the
first group_sizes[0] rows of lhs by rhs[0], the next group_sizes[1] rows by
rhs[1], and so on; rows past sum(group_sizes) give zeros. It is the expert
matmul of the mixture-of-experts MLP (jaxalign.models.moe), whose rows are the
(token, expert) assignments sorted by expert. Every implementation computes
that same function:

  ragged_dot  `jax.lax.ragged_dot`, XLA's grouped matmul; the reference, and
              what runs on CPU and GPU.
  megablox    the Pallas TPU grouped-matmul kernel
              (jax.experimental.pallas.ops.tpu.megablox): tiles of tm rows x
              tk x tn; a row tile that straddles two groups is computed once
              per group with the other group's rows masked out, and the grid
              has as many row tiles as the groups' rows need (a traced count),
              so work follows the real rows, not M. The weight gradient is its
              transposed kernel `tgmm` ([G, K, N] from lhs^T and the output
              gradient, group by group). The kernel leaves rows past
              sum(group_sizes) unwritten (NaN in interpret mode), so this
              module wraps it in its own VJP that zeroes them in the output
              and in the gradient of lhs. Off TPU it runs in Pallas interpret
              mode (slow; for tests).
  auto        megablox on TPU, ragged_dot elsewhere.
A call the kernel cannot serve falls back to ragged_dot, with one logged line
per reason: K or N not a multiple of the 128-lane tile, operands other than
float32/bfloat16 or of two dtypes.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger("jaxalign")

IMPLEMENTATIONS = ("auto", "ragged_dot", "megablox")
_AUTO = {"tpu": "megablox"}
LANE = 128                          # the kernel's K and N tiles are multiples of this
# The row tile: at most 512, since a row tile straddling two groups is computed once
# per group (the G - 1 boundaries of a call cost up to G - 1 extra tiles of work, so a
# larger tm buys fewer weight reads with more wasted FLOPs). The K and N tiles are
# chosen per call (`tiling`) to read each operand as few times as the kernel's grid
# allows within VMEM_BUDGET of the kernel's VMEM (double-buffered input and output
# blocks and the float32 accumulator; a v5p core's scoped VMEM is 16 MiB by default).
_TILES_M = (512, 256, 128)
VMEM_BUDGET = 12 * 2**20
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_logged: set[tuple[str, str]] = set()


def check_implementation(name: str) -> None:
  """Raises ValueError unless `name` is one of IMPLEMENTATIONS."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"grouped-matmul implementation {name!r}; want one of {IMPLEMENTATIONS}")


def resolve(name: str, platform: str) -> str:
  """"auto" -> the kernel for `platform` ("tpu", "gpu", "cpu"); others unchanged."""
  check_implementation(name)
  return _AUTO.get(platform, "ragged_dot") if name == "auto" else name


def choose(name: str, platform: str, *, k: int, n: int, lhs_dtype, rhs_dtype
           ) -> tuple[str, str | None]:
  """(implementation that will run, why it differs from the requested one or None).

  The one place that decides; `jaxalign plan` asks it too.
  """
  impl = resolve(name, platform)
  if impl == "ragged_dot":
    return impl, None
  if k % LANE or n % LANE:
    return "ragged_dot", (f"megablox needs the contracted and output dimensions to be "
                          f"multiples of {LANE}, got K={k}, N={n}")
  dtypes = {jnp.dtype(lhs_dtype), jnp.dtype(rhs_dtype)}
  if len(dtypes) != 1 or not dtypes <= set(_KERNEL_DTYPES):
    return "ragged_dot", (f"megablox needs float32 or bfloat16 operands of one dtype, got "
                          f"{jnp.dtype(lhs_dtype).name} x {jnp.dtype(rhs_dtype).name}")
  return "megablox", None


def _log_once(requested: str, reason: str) -> None:
  if (requested, reason) not in _logged:
    _logged.add((requested, reason))
    log.warning("moe_kernel=%s: %s; using ragged_dot for these calls", requested, reason)


def current_platform() -> str:
  """The platform being compiled for: the devices of the mesh set by `jax.set_mesh`
  (abstract TPU devices when planning), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _lane_divisors(x: int) -> list[int]:
  """The multiples of LANE dividing x (a multiple of LANE), largest first."""
  return [t for t in range(x, 0, -LANE) if x % t == 0 and t % LANE == 0]


def tiling(m: int, k: int, n: int, *, kind: str = "gmm", itemsize: int = 2
           ) -> tuple[int, int, int]:
  """(tm, tk, tn) for one kernel call of M rows, contraction K and output N.

  kind "gmm": out [M, N] = lhs [M, K] @ rhs[g] [K, N]; its grid (N tiles, row tiles, K
  tiles) reads the lhs once per N tile and one group's whole weight once per row tile,
  so the N tile is made as wide as fits (one lhs read when tn = N), then the K tile.
  kind "tgmm": out[g] [K, N] = lhs_g^T [K, rows] @ rhs_g [rows, N]; its grid (N tiles,
  K tiles, row tiles) reads the lhs once per N tile and the rhs once per K tile, so
  the (tk, tn) pair with the fewest of those reads, M K N (1/tn + 1/tk), is chosen.
  Both within VMEM_BUDGET for operands of `itemsize` bytes (float32 accumulator).
  The row tile is the largest candidate no larger than M rounded up to LANE.
  """
  rows = -(-m // LANE) * LANE
  tm = next((t for t in _TILES_M if t <= rows), LANE)
  best = None
  for tk in _lane_divisors(k):
    for tn in _lane_divisors(n):
      if kind == "gmm":
        vmem = 2 * (tm * tk + tk * tn + tm * tn) * itemsize + 4 * tm * tn
        score = (k * n / tn, -tk)                     # lhs reads, then fewer K steps
      else:
        vmem = 2 * (tm * tk + tm * tn + tk * tn) * itemsize + 4 * tk * tn
        score = (k * n * (1 / tn + 1 / tk), -tn)
      if vmem <= VMEM_BUDGET and (best is None or score < best[0]):
        best = (score, tk, tn)
  if best is None:
    return tm, LANE, LANE
  return tm, best[1], best[2]


def estimated_bytes(m: int, k: int, n: int, groups: int, *, kind: str = "gmm",
                    itemsize: int = 2) -> float:
  """The bytes megablox's own cost estimate gives one call (what XLA's cost analysis
  adds for it), with this module's tiles (`tiling`; M padded to the row tile).

  kind "gmm" ([M, K] @ [G, K, N] -> [M, N]; the lhs gradient is this with K and N
  swapped): the lhs once per N tile, one group's [K, N] weight once per row tile
  the grid can visit (M / tm + G - 1) and the output. kind "tgmm" (lhs [M, K],
  rhs [M, N] -> [G, K, N]): the lhs once per N tile, the rhs once per K tile and the
  output.
  """
  tm, tk, tn = tiling(m, k, n, kind=kind, itemsize=itemsize)
  rows = -(-m // tm) * tm
  if kind == "gmm":
    return (rows * k * (n // tn) + k * n * (rows // tm + groups - 1) + rows * n) * itemsize
  return (rows * k * (n // tn) + rows * n * (k // tk) + groups * k * n) * itemsize


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   implementation: str = "ragged_dot", zero_tail: bool = True) -> jax.Array:
  """Consecutive row groups of `lhs`, group g times rhs[g].

  Args:
    lhs: [M, K], rows sorted by group (group g: group_sizes[g] rows).
    rhs: [G, K, N].
    group_sizes: [G] int, summing to at most M; rows past the sum give zeros.
    implementation: one of IMPLEMENTATIONS ("auto" resolved per platform).
    zero_tail: False leaves the rows past sum(group_sizes) unspecified in the output
      and in the gradient of lhs (any value, NaN included: the megablox kernel does
      not write them), sparing a pass over [M, N] that zeroes them; for callers that
      drop those rows themselves. Every row a group covers is the same either way.

  Returns:
    [M, N] in lhs's dtype (float32 accumulation in every implementation).
  """
  group_sizes = group_sizes.astype(jnp.int32)
  impl, reason = choose(implementation, current_platform(), k=lhs.shape[1],
                        n=rhs.shape[2], lhs_dtype=lhs.dtype, rhs_dtype=rhs.dtype)
  if reason is not None:
    _log_once(implementation, reason)
  if impl == "megablox":
    return _megablox(lhs, rhs, group_sizes, interpret=current_platform() != "tpu",
                     zero_tail=zero_tail)
  return jax.lax.ragged_dot(lhs, rhs, group_sizes,
                            preferred_element_type=jnp.float32).astype(lhs.dtype)


def _backend():
  # The package's __init__ rebinds the name `gmm` to the custom-VJP op, so the
  # kernel module (gmm, tgmm) is reached by its full module path.
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _valid_rows(m: int, group_sizes: jax.Array) -> jax.Array:
  """[M, 1] bool: the rows some group covers."""
  return (jnp.arange(m, dtype=jnp.int32) < jnp.sum(group_sizes))[:, None]


def _megablox(lhs, rhs, group_sizes, *, interpret: bool, zero_tail: bool = True):
  m = lhs.shape[0]
  k, n = lhs.shape[1], rhs.shape[2]
  size = jnp.dtype(lhs.dtype).itemsize
  tilings = (tiling(m, k, n, itemsize=size),                # forward: [M, K] @ [K, N]
             tiling(m, n, k, itemsize=size),                # lhs gradient: [M, N] @ [N, K]
             tiling(m, k, n, kind="tgmm", itemsize=size))   # weight gradient: [K, N] per group
  tm = tilings[0][0]
  padded = -(-m // tm) * tm          # the kernel needs M to be a multiple of tm
  x = jnp.pad(lhs, ((0, padded - m), (0, 0))) if padded != m else lhs
  out = _gmm(x, rhs, group_sizes, tilings, interpret, zero_tail)
  return out[:m]


def _kernel_precision(dtype):
  """The matmul precision the kernel's body is traced under: the process default for
  float32 operands, "default" (one pass at the operands' width) for narrower ones,
  since a process-wide "highest" asks Mosaic for fp32 contractions of bf16 operands,
  which it refuses ("Bad lhs type"), as with the splash kernel."""
  if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
    return contextlib.nullcontext()
  return jax.default_matmul_precision("default")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, tilings, interpret, zero_tail):
  """tilings: (forward, lhs gradient, weight gradient), one row tile for all three."""
  with _kernel_precision(lhs.dtype):
    out = _backend().gmm(lhs, rhs, group_sizes, lhs.dtype, tilings[0], interpret=interpret)
  return jnp.where(_valid_rows(lhs.shape[0], group_sizes), out, 0) if zero_tail else out


def _gmm_fwd(lhs, rhs, group_sizes, tilings, interpret, zero_tail):
  return _gmm(lhs, rhs, group_sizes, tilings, interpret, zero_tail), (lhs, rhs, group_sizes)


def _gmm_bwd(tilings, interpret, zero_tail, residuals, grad):
  lhs, rhs, group_sizes = residuals
  backend = _backend()
  # d lhs = grad @ rhs[g]^T per group; rows past the groups are left unwritten.
  # Its contraction is over N and its output over K (tilings[1] is (tm, tN, tK)).
  with _kernel_precision(lhs.dtype):   # the backward is traced outside the forward's
    grad_lhs = backend.gmm(grad, rhs, group_sizes, lhs.dtype, tilings[1],
                           transpose_rhs=True, interpret=interpret)
    # d rhs[g] = lhs_g^T @ grad_g; tgmm masks rows outside each group itself.
    grad_rhs = backend.tgmm(lhs.swapaxes(0, 1), grad, group_sizes, rhs.dtype, tilings[2],
                            interpret=interpret)
  if zero_tail:
    grad_lhs = jnp.where(_valid_rows(lhs.shape[0], group_sizes), grad_lhs, 0)
  return grad_lhs, grad_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
