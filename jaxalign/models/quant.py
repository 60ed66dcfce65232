"""A quantized frozen base for LoRA (QLoRA, Dettmers et al. 2023): int8 and NF4 weights.

`config.lora.base_dtype` = "int8" | "nf4" stores every projection weight of the
frozen base (q, k, v, o, gate, up, down) as codes plus one float32 scale per block
of `BLOCK` consecutive entries along the weight's LAST axis; embeddings, the output
head and the norms stay in model.param_dtype (as QLoRA and bitsandbytes keep them).
`transformer._project` dequantizes a weight right before its matmul (a per-layer
temporary inside the scan), so the adapters and their optimizer state are as
without quantization and only the stored base shrinks:

  format  codes                               bytes / weight entry (codes + scales)
  int8    int8, round(w / s), s = absmax/127  1 + 4/64 = 1.0625
  nf4     4-bit index of the nearest of the   0.5 + 4/64 = 0.5625
          16 NormalFloat levels of w / absmax
          (two per uint8: even entry in the high nibble)

Blocks run along the last axis (the output axis of every projection but `o`, whose
last axis is d_model) so codes and scales keep the weight's logical axis names and
shard by the same rules: a chip holds the codes and scales of its own part of the
weight (the plan counts the real per-chip bytes). The axis must be a multiple of
BLOCK (config validation checks the model's shapes).

The quantizers are written here, not taken from qwix (evaluated: qwix 0.1.8 imports
and runs with jax 0.10.2 / flax 0.12.8): qwix's model-level API rewrites the
module's params and brings its own LoRA params, which would replace this project's
adapters, their sharding names and the Hugging Face mapping; its array API
(qwix.quantize) is jax-only, while the import quantizes each device's block on the
host with numpy, and must give the same codes as a jitted quantization on device;
qwix stores NF4 as jnp.uint4, whose memory layout is backend-dependent, where two
codes per uint8 are half a byte everywhere. The arithmetic is twenty lines; the one
function `quantize` serves numpy (import) and jax (init, tests) alike.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMATS = ("int8", "nf4")
BLOCK = 64                                    # entries per scale (QLoRA's block size)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")

# The 16 NormalFloat levels (QLoRA, Appendix E; bitsandbytes' NF4 table): quantiles
# of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# A normalized entry takes level i when it lies in (midpoint[i-1], midpoint[i]].
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / np.float32(2)
_INV_127 = np.float32(1 / 127)
_CODE_DTYPES = {"int8": np.dtype(np.int8), "nf4": np.dtype(np.uint8)}


def normalize_format(value: Any) -> str:
  """A base_dtype setting as "none" | "int8" | "nf4"; ValueError on anything else."""
  if value in (None, "", "none"):
    return "none"
  if value not in FORMATS:
    raise ValueError(f"{value!r}; want one of {('none',) + FORMATS} (or '')")
  return value


def format_of(codes_dtype) -> str:
  """The format whose codes have this dtype (int8: "int8", uint8: "nf4")."""
  for fmt, dt in _CODE_DTYPES.items():
    if np.dtype(codes_dtype) == dt:
      return fmt
  raise ValueError(f"no quantized format stores its codes as {codes_dtype}")


def stored_shapes(shape: tuple[int, ...], fmt: str, block: int = BLOCK):
  """(codes shape, scale shape) of a weight of `shape` quantized in `fmt`."""
  *lead, n = shape
  return (*lead, n // 2 if fmt == "nf4" else n), (*lead, n // block)


def quantize(w, fmt: str, *, block: int = BLOCK, xp=jnp):
  """Blockwise absmax quantization of `w` along its last axis.

  Args:
    w: [..., N] float array (numpy or jax), N a multiple of `block` (of 2 for nf4).
    fmt: "int8" or "nf4".
    block: entries per scale.
    xp: numpy or jax.numpy: the same float32 operations in either, so the host
      import and a jitted quantization give the same codes.

  Returns:
    codes: [..., N] int8 (int8), or [..., N/2] uint8 (nf4, two 4-bit level
      indices per byte, the even entry in the high nibble).
    scale: [..., N/block] float32: absmax / 127 (int8), absmax (nf4).
  """
  *lead, n = w.shape
  if n % block:
    raise ValueError(f"last axis {n} is not a multiple of the block {block}")
  blocks = xp.reshape(xp.asarray(w).astype(xp.float32), (*lead, n // block, block))
  absmax = xp.max(xp.abs(blocks), axis=-1)                          # [..., N/block]
  if fmt == "int8":
    # A product, not absmax / 127: XLA turns a division by a constant into this
    # product, so the host (numpy) must compute the same one.
    scale = absmax * xp.float32(_INV_127)
    safe = xp.where(scale > 0, scale, xp.float32(1))               # an all-zero block
    q = xp.clip(xp.round(blocks / safe[..., None]), -127, 127)
    return xp.reshape(q.astype(xp.int8), (*lead, n)), scale
  if fmt != "nf4":
    raise ValueError(f"unknown quantized format {fmt!r}; want one of {FORMATS}")
  safe = xp.where(absmax > 0, absmax, xp.float32(1))
  x = blocks / safe[..., None]                                      # [..., N/b, b] in [-1, 1]
  # Nearest level by the midpoints (count of midpoints below x; ties go down).
  idx = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), x, side="left").astype(xp.uint8)
  idx = xp.reshape(idx, (*lead, n // 2, 2))
  return (idx[..., 0] << 4) | idx[..., 1], absmax


def dequantize(codes, scale, fmt: str, dtype=jnp.float32) -> jax.Array:
  """The float weight [..., N] of `quantize`'s (codes, scale), in `dtype`.

  The block size is read from the shapes (N / scale.shape[-1]).
  """
  if fmt == "nf4":
    hi, lo = codes >> 4, codes & 0xF
    idx = jnp.stack([hi, lo], axis=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    # Selects, not a gather from the table: elementwise, so XLA fuses the whole
    # dequantization into one pass feeding the matmul (a gather would materialize
    # int32 indices of the whole weight).
    values = jnp.zeros(idx.shape, jnp.float32)
    for i, level in enumerate(NF4_LEVELS.tolist()):
      if level != 0.0:
        values = jnp.where(idx == i, jnp.float32(level), values)
  elif fmt == "int8":
    values = codes.astype(jnp.float32)
  else:
    raise ValueError(f"unknown quantized format {fmt!r}; want one of {FORMATS}")
  *lead, n = values.shape
  nb = scale.shape[-1]
  w = values.reshape(*lead, nb, n // nb) * scale[..., None].astype(jnp.float32)
  return w.reshape(*lead, n).astype(dtype)


def error_bound(fmt: str, scale) -> Any:
  """The largest |w - dequantize(quantize(w))| the format allows per block, from its scale:
  half a step (s / 2) for int8; half the widest gap between adjacent NF4 levels
  (between 0.7230 and 1) times the block's absmax for nf4."""
  if fmt == "int8":
    return scale / 2
  return scale * float(np.max(np.diff(NF4_LEVELS)) / 2)


class QuantizedWeight(nnx.Module):
  """A frozen projection weight stored quantized: codes and scales, two nnx.Params
  carrying the float weight's logical axis names (and its leading "layers" axis
  when scanned), so they shard, stack and scan as the float weight would."""

  def __init__(self, codes: jax.Array, scale: jax.Array, *, fmt: str, dtype,
               names: tuple[str | None, ...] | None):
    has_mesh = not jax.sharding.get_abstract_mesh().empty
    meta = {} if names is None else dict(out_sharding=names, eager_sharding=has_mesh)
    self.codes = nnx.Param(codes, **meta)
    self.scale = nnx.Param(scale, **meta)
    self.fmt = fmt
    self.dtype = jnp.dtype(dtype)       # the float weight's dtype (model.param_dtype)

  @property
  def shape(self) -> tuple[int, ...]:
    """The float weight's shape."""
    *lead, n = self.codes.shape
    return (*lead, 2 * n if self.fmt == "nf4" else n)

  def dequantize(self, dtype=None) -> jax.Array:
    return dequantize(self.codes[...], self.scale[...], self.fmt, dtype or self.dtype)


def quantize_model(model: nnx.Module, fmt: str, *, block: int = BLOCK) -> nnx.Module:
  """Replaces every projection weight (PROJECTIONS, an nnx.Param not yet quantized) of
  `model` by its QuantizedWeight (in place); returns `model`. Call it where the model
  was built (same mesh and logical-axis rules), before adapters are attached or after."""
  if normalize_format(fmt) == "none":
    return model
  for _, module in list(nnx.iter_modules(model)):
    for name in PROJECTIONS:
      weight = getattr(module, name, None)
      if not isinstance(weight, nnx.Param) or isinstance(weight, nnx.LoRAParam):
        continue
      codes, scale = quantize(weight[...], fmt, block=block)
      names = weight.get_metadata().get("out_sharding")
      setattr(module, name, QuantizedWeight(codes, scale, fmt=fmt, dtype=weight.dtype,
                                            names=None if names is None else tuple(names)))
  return model


def is_quantized_path(path: tuple) -> bool:
  """A flat-state path that is one half of a QuantizedWeight (…, <projection>, codes|scale)."""
  return len(path) >= 2 and path[-1] in ("codes", "scale") and path[-2] in PROJECTIONS


def dequantize_state(state: nnx.State, dtype) -> nnx.State:
  """A base state with each QuantizedWeight's (codes, scale) replaced by the float weight
  at the weight's own path, in `dtype`: the unquantized model's parameter state (what
  `lora.merge` folds adapters into for export)."""
  flat = dict(nnx.to_flat_state(state))
  out = []
  for path, leaf in flat.items():
    if not is_quantized_path(path):
      out.append((path, leaf))
    elif path[-1] == "codes":
      codes = leaf.get_value()
      scale = flat[path[:-1] + ("scale",)].get_value()
      w = dequantize(codes, scale, format_of(codes.dtype), dtype)
      out.append((path[:-1], leaf.replace(w)))
  return nnx.from_flat_state(out)
