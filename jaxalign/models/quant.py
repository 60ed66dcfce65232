"""A quantized frozen base for LoRA (QLoRA, Dettmers et al. 2023): int8 and NF4 weights.

`config.lora.base_dtype` = "int8" | "nf4" stores every projection weight of the
frozen base (q, k, v, o, gate, up, down; in a mixture-of-experts model gate, up and
down are the routed experts' stacked [E, D, F] / [E, F, D] weights) as codes plus one
float32 scale per block of `BLOCK` consecutive entries along the weight's BLOCK AXIS
(`BLOCK_AXIS`: its last input axis, the one the matmul contracts last); embeddings,
the output head, the norms and an MoE model's router stay in model.param_dtype (as
QLoRA and bitsandbytes keep them). `transformer._project` dequantizes a weight right
before its matmul (a per-layer temporary inside the scan), the MoE layer its experts'
right before the grouped matmuls (inside expert parallelism's shard_map, each device
its own experts: `Blocks`), so the adapters and their optimizer state are as without
quantization and only the stored base shrinks:

  format  codes                               bytes / weight entry (codes + scales)
  int8    int8, round(w / s), s = absmax/127  1 + 4/64 = 1.0625
  nf4     4-bit index of the nearest of the   0.5 + 4/64 = 0.5625
          16 NormalFloat levels of w / absmax
          (two per uint8: entry j of a block's first half in the high nibble,
          entry j of its second half in the low one)

Why the input axis, and halves rather than neighbours: the block axis is never a
weight's last (output) axis, the one a TPU keeps in its 128-wide lanes (an expert
stack's neither: D of gate / up [E, D, F], F of down [E, F, D]). Splitting that
axis into blocks, or interleaving two codes along it, is a relayout there, and XLA
answered it by copying every stacked weight's codes into a transposed layout once per
step (4 GiB of temporaries per chip for the 70B recipe on v5e-8); along a major axis
both are free reshapes. It is also the layout of bitsandbytes (blocks along a row of
a PyTorch [out, in] weight).

Codes and scales keep the weight's logical axis names and shard by the same rules: a
chip holds the codes and scales of its own part of the weight (the plan counts the
real per-chip bytes). The block axis must hold a whole number of blocks per device
(config validation checks the model's shapes against the mesh).

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

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMATS = ("int8", "nf4")
BLOCK = 64                                    # entries per scale (QLoRA's block size)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# Each projection's block axis, counted from the end (a stacked "layers" axis in front,
# or the experts' [E] axis, changes nothing): the last axis its matmul contracts. q, k,
# v [D, H, Dh] and gate, up [D, F] (experts: [E, D, F]): d_model; o [H, Dh, D]:
# head_dim; down [F, D] (experts: [E, F, D]): d_ff (moe_d_ff).
BLOCK_AXIS = {"q": -3, "k": -3, "v": -3, "o": -2, "gate": -2, "up": -2, "down": -2}

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


def stored_shapes(shape: tuple[int, ...], fmt: str, block: int = BLOCK, axis: int = -1):
  """(codes shape, scale shape) of a weight of `shape` quantized in `fmt` along `axis`."""
  a = axis % len(shape)
  n = shape[a]
  codes = (*shape[:a], n // 2 if fmt == "nf4" else n, *shape[a + 1:])
  return codes, (*shape[:a], n // block, *shape[a + 1:])


def _along(a: int, sl: slice) -> tuple:
  """An index that takes `sl` along axis `a` (and everything of the axes before it)."""
  return (slice(None),) * a + (sl,)


def quantize(w, fmt: str, *, block: int = BLOCK, axis: int = -1, xp=jnp):
  """Blockwise absmax quantization of `w` along `axis`.

  Args:
    w: float array (numpy or jax) whose `axis` is a multiple of `block` (of 2 for nf4).
    fmt: "int8" or "nf4".
    block: entries per scale.
    axis: the block axis (models' projections: BLOCK_AXIS).
    xp: numpy or jax.numpy: the same float32 operations in either, so the host
      import and a jitted quantization give the same codes.

  Returns:
    codes: int8 of w's shape (int8), or uint8 with `axis` halved (nf4: two 4-bit level
      indices per byte; within each block, entry j of the first half in the high
      nibble and entry j + block/2 in the low one).
    scale: float32, w's shape with `axis` divided by `block`: absmax / 127 (int8),
      absmax (nf4).
  """
  a = axis % w.ndim
  lead, n, rest = tuple(w.shape[:a]), w.shape[a], tuple(w.shape[a + 1:])
  if n % block:
    raise ValueError(f"axis {axis} of length {n} is not a multiple of the block {block}")
  blocks = xp.reshape(xp.asarray(w).astype(xp.float32), (*lead, n // block, block, *rest))
  absmax = xp.max(xp.abs(blocks), axis=a + 1)                     # [..., n/block, ...]
  if fmt == "int8":
    # A product, not absmax / 127: XLA turns a division by a constant into this
    # product, so the host (numpy) must compute the same one.
    scale = absmax * xp.float32(_INV_127)
    safe = xp.where(scale > 0, scale, xp.float32(1))               # an all-zero block
    q = xp.clip(xp.round(blocks / xp.expand_dims(safe, a + 1)), -127, 127)
    return xp.reshape(q.astype(xp.int8), w.shape), scale
  if fmt != "nf4":
    raise ValueError(f"unknown quantized format {fmt!r}; want one of {FORMATS}")
  safe = xp.where(absmax > 0, absmax, xp.float32(1))
  x = blocks / xp.expand_dims(safe, a + 1)                          # in [-1, 1]
  # Nearest level by the midpoints (count of midpoints below x; ties go down).
  idx = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), x, side="left").astype(xp.uint8)
  half = block // 2
  codes = (idx[_along(a + 1, slice(0, half))] << 4) | idx[_along(a + 1, slice(half, block))]
  return xp.reshape(codes, (*lead, n // 2, *rest)), absmax


def _nf4_values(idx) -> jax.Array:
  """The float32 NF4 level of each 4-bit index."""
  # Selects, not a gather from the table: elementwise, so XLA fuses the whole
  # dequantization into one pass feeding the matmul (a gather would materialize
  # int32 indices of the whole weight).
  values = jnp.zeros(idx.shape, jnp.float32)
  for i, level in enumerate(NF4_LEVELS.tolist()):
    if level != 0.0:
      values = jnp.where(idx == i, jnp.float32(level), values)
  return values


def dequantize(codes, scale, fmt: str, dtype=jnp.float32, axis: int = -1) -> jax.Array:
  """The float weight of `quantize`'s (codes, scale) along `axis`, in `dtype`.

  The block size is read from the shapes. Each half of a block is scaled in float32
  and rounded to `dtype` apart, then the halves are joined along a new axis before the
  block axis' entries: reshapes and a concatenation of major (non-lane) axes, no
  interleaving, so XLA fuses it all into the pass that writes the weight.
  """
  a = axis % codes.ndim
  lead, rest = codes.shape[:a], codes.shape[a + 1:]
  nb = scale.shape[a]
  per = codes.shape[a] // nb                                 # codes per block
  c = codes.reshape(*lead, nb, per, *rest)
  if fmt == "nf4":
    parts = (_nf4_values(c >> 4), _nf4_values(c & 0xF))
  elif fmt == "int8":
    parts = (c.astype(jnp.float32),)
  else:
    raise ValueError(f"unknown quantized format {fmt!r}; want one of {FORMATS}")
  s = jnp.expand_dims(scale.astype(jnp.float32), a + 1)
  w = [(p * s).astype(dtype) for p in parts]
  w = w[0] if len(w) == 1 else jnp.concatenate(w, axis=a + 1)   # [..., nb, block, ...]
  return w.reshape(*lead, nb * w.shape[a + 1], *rest)


def error_bound(fmt: str, scale) -> Any:
  """The largest |w - dequantize(quantize(w))| the format allows per block, from its scale:
  half a step (s / 2) for int8; half the widest gap between adjacent NF4 levels
  (between 0.7230 and 1) times the block's absmax for nf4."""
  if fmt == "int8":
    return scale / 2
  return scale * float(np.max(np.diff(NF4_LEVELS)) / 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Blocks:
  """A quantized weight's arrays as a pytree: what a function that takes weights as
  arguments (expert_parallel.routed_mlp, into its shard_map) receives in place of the
  float weight. Codes and scale have the float weight's rank and axis order, so a
  PartitionSpec of the weight fits both (whole blocks per device: config validation)
  and a device dequantizes only its own part, after the codes crossed the mesh."""
  codes: jax.Array
  scale: jax.Array
  fmt: str = dataclasses.field(metadata=dict(static=True))
  axis: int = dataclasses.field(metadata=dict(static=True))   # from the end (BLOCK_AXIS)

  @property
  def shape(self) -> tuple[int, ...]:
    """The float weight's shape."""
    shape = list(self.codes.shape)
    shape[self.axis] *= 2 if self.fmt == "nf4" else 1
    return tuple(shape)

  def dequantize(self, dtype) -> jax.Array:
    return dequantize(self.codes, self.scale, self.fmt, dtype, axis=self.axis)


def materialize(w, dtype) -> jax.Array:
  """A weight argument (a float array or `Blocks`) as a float array in `dtype`."""
  return w.dequantize(dtype) if isinstance(w, Blocks) else w.astype(dtype)


class QuantizedWeight(nnx.Module):
  """A frozen projection weight stored quantized: codes and scales, two nnx.Params
  carrying the float weight's logical axis names (and its leading "layers" axis
  when scanned), so they shard, stack and scan as the float weight would."""

  def __init__(self, codes: jax.Array, scale: jax.Array, *, fmt: str, dtype, axis: int,
               names: tuple[str | None, ...] | None):
    has_mesh = not jax.sharding.get_abstract_mesh().empty
    meta = {} if names is None else dict(out_sharding=names, eager_sharding=has_mesh)
    self.codes = nnx.Param(codes, **meta)
    self.scale = nnx.Param(scale, **meta)
    self.fmt = fmt
    self.dtype = jnp.dtype(dtype)       # the float weight's dtype (model.param_dtype)
    self.axis = axis                    # the block axis, from the end (BLOCK_AXIS)

  @property
  def shape(self) -> tuple[int, ...]:
    """The float weight's shape."""
    return self.blocks().shape

  def dequantize(self, dtype=None) -> jax.Array:
    return self.blocks().dequantize(dtype or self.dtype)

  def blocks(self) -> Blocks:
    """The codes and scales as a `Blocks` pytree (dequantized where it is used)."""
    return Blocks(self.codes[...], self.scale[...], self.fmt, self.axis)


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
      codes, scale = quantize(weight[...], fmt, block=block, axis=BLOCK_AXIS[name])
      names = weight.get_metadata().get("out_sharding")
      setattr(module, name, QuantizedWeight(codes, scale, fmt=fmt, dtype=weight.dtype,
                                            axis=BLOCK_AXIS[name],
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
      w = dequantize(codes, scale, format_of(codes.dtype), dtype, axis=BLOCK_AXIS[path[-2]])
      out.append((path[:-1], leaf.replace(w)))
  return nnx.from_flat_state(out)
