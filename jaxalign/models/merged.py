"""A LoRA model's merged weights, computed one weight (or one layer's slice) at a time.

`lora.merge` folds every adapter into the base at once, and over a quantized base
(QLoRA) it needs `quant.dequantize_state` first: the whole float model is then on the
devices, 141 GB for a 70B model, which the slice that trained it (8 x 16 GiB) cannot
hold. Export (`hf.export`) fetches one HF tensor at a time anyway, so `weights` gives
it each parameter as it is stored (a float array, or the codes and scales of a
quantized projection) with the adapter pair that targets it, and `take` computes one
tensor's float weight when it is fetched: that slice of the codes and scales
dequantized, plus scale * A @ B of that slice's adapter, in one small jitted call.
On the devices: the stored base, the adapters, and one slice's float weight.

The arithmetic is `lora.merged_weight` and `quant.dequantize`, the operations of the
whole-model path, per slice (tests/models/test_merged.py compares the files).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxalign.models import lora, quant


@dataclasses.dataclass(frozen=True, eq=False)
class Weight:
  """One parameter of the merged model, kept as stored until a slice of it is taken.

  arrays: (w,) of a float weight or (codes, scale) of a quantized one, then (A, B) of
  its adapter when it has one; every array has the parameter's leading stacked axes
  (scanned layers, experts) in front, A [..., d_in, r], B [..., r, d_out].
  """
  arrays: tuple[jax.Array, ...]
  fmt: str                  # "none" (float) | "int8" | "nf4"
  axis: int                 # a quantized weight's block axis, from the end
  dtype: np.dtype           # the merged weight's
  shape: tuple[int, ...]    # the merged weight's
  adapted: bool
  scale: float              # alpha / rank

  def take(self, entry: tuple[int, ...] = ()) -> jax.Array:
    """The merged weight's slice `entry` (indices into its leading stacked axes; ()
    for the whole of an unstacked weight), sharded as the stored slice is."""
    return self.slice_fn(len(entry))(self.arrays, jnp.asarray(entry, jnp.int32))

  def slice_fn(self, entry_ndim: int):
    """The jitted merge of one slice, (arrays, index [entry_ndim] int32) -> the merged
    slice; one compile serves every slice of every weight of this kind and shape."""
    return _slice_fn(self.fmt, self.axis, self.dtype.name, self.adapted, self.scale,
                     _slice_sharding(self.arrays[0], entry_ndim))


def take(value, entry: tuple[int, ...] = ()) -> jax.Array:
  """Slice `entry` of a `weights` value: a Weight's merged slice, an array's slice."""
  if isinstance(value, Weight):
    return value.take(entry)
  return value[entry] if entry else value


def _leaf_value(leaf):
  return leaf.get_value() if hasattr(leaf, "get_value") else leaf


def _flat(tree) -> dict[tuple, Any]:
  """Flat path -> array of an nnx.State or a nested mapping."""
  if isinstance(tree, nnx.State):
    return {path: _leaf_value(leaf) for path, leaf in nnx.to_flat_state(tree)}
  out = {}

  def walk(node, path):
    if hasattr(node, "items"):
      for k, v in node.items():
        walk(v, path + (k,))
    else:
      out[path] = _leaf_value(node)
  walk(tree, ())
  return out


def weights(base, adapters=None, *, scale: float = 1.0, dtype=None) -> dict[tuple, Any]:
  """The merged model's parameters by flat path, nothing computed yet.

  Args:
    base: nnx.State (or nested dict) of the base params, as stored: a quantized
      projection as its (…, <name>, codes) and (…, <name>, scale) pair.
    adapters: the LoRA adapters (…, <name>_lora, lora_a | lora_b), or None.
    scale: alpha / rank.
    dtype: a quantized weight's float dtype (model.param_dtype); None: float32.

  Returns:
    path -> the array as stored (a parameter with no adapter and not quantized), or a
    `Weight` (at the weight's own path, (…, <name>)); `take` gives a slice of either.

  Raises:
    ValueError naming an adapter that targets no base weight.
  """
  flat = _flat(base)
  pairs: dict[tuple, dict[str, jax.Array]] = {}
  for path, value in _flat({} if adapters is None else adapters).items():
    pairs.setdefault(path[:-1], {})[path[-1]] = value
  float_dtype = np.dtype(dtype or np.float32)
  out: dict[tuple, Any] = {}
  used = set()
  for path, value in flat.items():
    if quant.is_quantized_path(path):
      if path[-1] == "scale":
        continue
      path = path[:-1]
      arrays = (value, flat[path + ("scale",)])
      fmt, axis = quant.format_of(value.dtype), quant.BLOCK_AXIS[path[-1]]
      shape = list(value.shape)
      shape[axis] *= 2 if fmt == "nf4" else 1
      shape, w_dtype = tuple(shape), float_dtype
    else:
      arrays, fmt, axis, shape, w_dtype = (value,), "none", -1, tuple(value.shape), value.dtype
    adapter_path = path[:-1] + (str(path[-1]) + lora.SUFFIX,)
    pair = pairs.get(adapter_path)
    if pair is not None:
      used.add(adapter_path)
      arrays += (pair["lora_a"], pair["lora_b"])
    if fmt == "none" and pair is None:
      out[path] = value
    else:
      out[path] = Weight(arrays, fmt, axis, np.dtype(w_dtype), shape, pair is not None,
                         float(scale))
  unused = sorted(".".join(map(str, p)) for p in set(pairs) - used)
  if unused:
    raise ValueError(f"adapters with no base weight: {unused}")
  return out


def _slice_sharding(stored: jax.Array, n_lead: int):
  """The sharding of one slice of `stored` (its first `n_lead` axes taken): the stored
  spec without them, so the merged slice is as split over the devices as the stored
  one (None: XLA's choice, for a sharding of another kind)."""
  sharding = getattr(stored, "sharding", None)
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (stored.ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*spec[n_lead:]))
  return None


def _index(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[index[0], index[1], ...] for a traced index (one compile for every slice)."""
  for i in range(index.shape[0]):
    x = jax.lax.dynamic_index_in_dim(x, index[i], axis=0, keepdims=False)
  return x


@functools.lru_cache(maxsize=None)
def _slice_fn(fmt: str, axis: int, dtype: str, adapted: bool, scale: float, out_sharding):
  """The jitted merge of one slice: (arrays, index) -> its float weight."""
  def merged_slice(arrays, index):
    parts = [_index(x, index) for x in arrays]
    if fmt == "none":
      w = parts[0]
    else:
      w = quant.dequantize(parts[0], parts[1], fmt, jnp.dtype(dtype), axis=axis)
    if adapted:
      w = lora.merged_weight(w, parts[-2], parts[-1], scale=scale)
    return w
  return jax.jit(merged_slice, out_shardings=out_sharding)

