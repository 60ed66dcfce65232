"""LoRA adapters on the Transformer's projections (Hu et al. 2021).

A targeted projection y = x W (W: [d_in..., d_out...]) becomes

  y = x W + (alpha / rank) * dropout(x) A B,   A: [d_in, r] random, B: [r, d_out] zero,

with the input and output axes of W flattened (q: [D] -> [H*Dh], o: [H*Dh] -> [D]),
so A @ B reshapes to W's shape and `merge` adds it to the base weight. A and B
are `nnx.LoRAParam`s, a Param subclass: splitting the model with that filter
(`jaxalign.train.state.split_model`) puts only the adapters in the trainable
params and the whole base in `frozen`. They carry logical axis names (A:
(in, "lora_rank"), B: ("lora_rank", out), where a flattened H*Dh axis keeps the
name "heads"/"kv_heads": heads-major, so the split over heads is unchanged) and
are sharded by the same rules as the base.

Adapters are attached after the base model is built (`add_adapters`), as the
attribute `<name>_lora` of the Attention/MLP module owning weight `<name>`;
the forward adds their delta in one place (`transformer._project`). The model
with adapters switched off is the base graph: `base_graphdef` merged with the
frozen base params alone (no copy of the weights).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import quant, transformer

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_TARGETS = _ATTENTION = ("q", "k", "v", "o")
# name -> (number of input axes of W, logical name of the flattened input,
#          logical name of the flattened output).
_AXES = {
    "q": (1, "embed", "heads"), "k": (1, "embed", "kv_heads"),
    "v": (1, "embed", "kv_heads"), "o": (2, "heads", "embed"),
    "gate": (1, "embed", "mlp"), "up": (1, "embed", "mlp"), "down": (1, "mlp", "embed"),
}
SUFFIX = "_lora"
# Folded into the model seed for A's init, so the base init is unchanged.
_INIT_STREAM = 0x10A


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapter settings (config.lora). rank 0: no adapters."""
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q", "k", "v", "o")
  # How the frozen base's projection weights are stored: "none" (model.param_dtype),
  # "int8" or "nf4" (QLoRA; jaxalign.models.quant).
  base_dtype: str = "none"
  # The adapters' dtype: "" = the base weight's (model.param_dtype).
  param_dtype: str = ""

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "base_dtype", quant.normalize_format(self.base_dtype))

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def config_from(c) -> LoraConfig:
  """LoraConfig from a config's `lora` section (absent in old configs: off)."""
  if c is None:
    return LoraConfig()
  return LoraConfig(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout),
                    targets=tuple(c.targets), base_dtype=c.get("base_dtype", "") or "none",
                    param_dtype=c.get("param_dtype", "") or "")


class LoRA(nnx.Module):
  """One adapter pair on a weight with `in_ndim` input axes and output shape `out_shape`."""

  def __init__(self, d_in: int, out_shape: tuple[int, ...], *, in_ndim: int,
               names: tuple[str, str], config: LoraConfig, index: int, key: jax.Array,
               param_dtype, stack: int | None = None):
    d_out = int(np.prod(out_shape))
    has_mesh = not jax.sharding.get_abstract_mesh().empty
    # Stacked (scanned) layers: a leading "layers" axis, sliced off by the scan.
    lead, lead_names = ((), ()) if stack is None else ((stack,), ("layers",))
    # PEFT's default: kaiming-uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)).
    bound = 1.0 / np.sqrt(d_in)
    a = jax.random.uniform(key, (*lead, d_in, config.rank), param_dtype, -bound, bound)
    self.lora_a = nnx.LoRAParam(a, out_sharding=(*lead_names, names[0], "lora_rank"),
                                eager_sharding=has_mesh)
    self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, config.rank, d_out), param_dtype),
                                out_sharding=(*lead_names, "lora_rank", names[1]),
                                eager_sharding=has_mesh)
    self.in_ndim = in_ndim
    self.out_shape = tuple(out_shape)
    self.scale = config.scale
    self.dropout = config.dropout
    self.index = index            # folds the dropout key: each adapter its own mask
    self.dropout_key = None       # set per forward by `set_dropout_key`; None: no dropout

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., d_in...] (the projection's input) -> [..., out_shape...] delta.

    Inside the layer scan the adapter holds one layer's A [d_in, r], B [r, d_out].
    """
    lead = x.shape[:x.ndim - self.in_ndim]
    h = x.reshape(*lead, -1)                                           # [..., d_in]
    if self.dropout > 0 and self.dropout_key is not None:
      key = jax.random.fold_in(self.dropout_key, self.index)
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(h.dtype)
    h = h @ self.lora_a[...].astype(x.dtype)                           # [..., r]
    d = (h @ self.lora_b[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)
    return d.reshape(*lead, *self.out_shape)


def add_adapters(model: nnx.Module, config: LoraConfig, *, seed: int) -> nnx.Module:
  """Attaches an adapter to every targeted projection of `model` (in place); returns it.

  Must run where the model was built (same mesh and logical-axis rules) so the
  adapters are sharded like the base.
  """
  if not config.enabled:
    return model
  base_key = jax.random.fold_in(jax.random.PRNGKey(seed), _INIT_STREAM)
  index = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, transformer.Attention):
      names = [t for t in config.targets if t in _ATTENTION]
    elif isinstance(module, transformer.MLP):
      names = [t for t in config.targets if t not in _ATTENTION]
    elif isinstance(module, transformer.MoeMLP):
      names = [t for t in config.targets if t not in _ATTENTION]
      if names:   # config validation refuses these first (lora.targets)
        raise ValueError(f"LoRA targets {names} on a mixture-of-experts MLP: adapters on "
                         f"the experts are not supported; target {_ATTENTION}")
      continue
    else:
      continue
    stack = module.stack       # scanned layers: one adapter pair per stacked layer
    for name in names:
      weight = getattr(module, name)
      in_ndim, in_name, out_name = _AXES[name]
      shape = weight.shape if stack is None else weight.shape[1:]
      setattr(module, name + SUFFIX, LoRA(
          int(np.prod(shape[:in_ndim])), shape[in_ndim:], in_ndim=in_ndim,
          names=(in_name, out_name), config=config, index=index,
          key=jax.random.fold_in(base_key, index),
          param_dtype=jnp.dtype(config.param_dtype or weight.dtype), stack=stack))
      index += 1
  return model


def has_adapters(model: nnx.Module) -> bool:
  return any(isinstance(m, LoRA) for _, m in nnx.iter_modules(model))


def set_dropout_key(model: nnx.Module, key: jax.Array | None) -> None:
  """Gives every adapter of a merged model the dropout key of this forward."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LoRA):
      module.dropout_key = None if key is None else nnx.data(key)


def base_model(model_cfg, *, seed: int, base_dtype: str = "none") -> transformer.Transformer:
  """The base Transformer a LoRA run adapts: its projections quantized per `base_dtype`
  ("none": as built). Build it under the run's mesh and rules to shard it."""
  return quant.quantize_model(transformer.Transformer(model_cfg, rngs=nnx.Rngs(seed)),
                              base_dtype)


def base_graphdef(model_cfg, base_dtype: str = "none") -> nnx.GraphDef:
  """The graph of the model without adapters: merged with the frozen base params
  alone it is the reference (adapters switched off). Call it outside `jax.set_mesh`.
  `base_dtype`: the base's storage (LoraConfig.base_dtype), as the run's frozen holds it."""
  abstract = nnx.eval_shape(lambda: base_model(model_cfg, seed=0, base_dtype=base_dtype))
  return nnx.split(abstract, nnx.Param, ...)[0]


def _delta(a: jax.Array, b: jax.Array) -> jax.Array:
  """A @ B ([..., d_in, r] @ [..., r, d_out]) in float32 at HIGHEST precision, in A's dtype."""
  return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(a.dtype)


def _fold(w: jax.Array, delta, scale: float) -> jax.Array:
  """W + scale * delta (reshaped onto W), added in float32, in W's dtype."""
  d = jnp.asarray(delta, jnp.float32).reshape(w.shape)
  return (w.astype(jnp.float32) + jnp.float32(scale) * d).astype(w.dtype)


def merged_weight(w: jax.Array, lora_a: jax.Array, lora_b: jax.Array, *,
                  scale: float) -> jax.Array:
  """One weight with its adapter folded in, W + scale * A @ B: `merge`'s arithmetic
  for one weight, or one slice of a stacked one (A [d_in, r], B [r, d_out] of the
  same slice); the export merges slice by slice with it (models/merged.py)."""
  return _fold(w, _delta(lora_a, lora_b), scale)


def lora_delta(adapter, *, lora_keys: tuple[str, str] = ("lora_a", "lora_b")):
  """What a LoRA adapter adds to the base weights: each {a, b} pair -> a @ b.

  Walks nested mappings; a mapping holding both `lora_keys` (a: [..., d_in, r],
  b: [..., r, d_out], as Flax's LoRA) becomes {"delta": a @ b} ([..., d_in,
  d_out], leading axes such as scanned layers broadcast); other leaves are kept
  (already additive, e.g. biases or full-parameter deltas).
  """
  a_key, b_key = lora_keys
  if hasattr(adapter, "items"):   # dict, nnx.State and other mappings
    if a_key in adapter and b_key in adapter:
      delta = _delta(jnp.asarray(adapter[a_key]), jnp.asarray(adapter[b_key]))
      rest = {k: lora_delta(v, lora_keys=lora_keys) for k, v in adapter.items()
              if k not in lora_keys}
      return {"delta": delta, **rest}
    return {k: lora_delta(v, lora_keys=lora_keys) for k, v in adapter.items()}
  if isinstance(adapter, (list, tuple)):
    return type(adapter)(lora_delta(v, lora_keys=lora_keys) for v in adapter)
  return adapter


_SPACES = ("delta", "factors")


def cofs_combine(
    domain_adapters: Sequence,
    weights: jax.Array | Sequence[float],
    *,
    space: str = "delta",
    lora_keys: tuple[str, str] = ("lora_a", "lora_b"),
):
  """COFS-DPO: linear combination sum_t w_t theta_F^(t) of per-domain fast adapters.

  Args:
    domain_adapters: T pytrees with one structure, domain t's (best) fast
      adapter after training on it.
    weights: [T] combination weights w_t (how to choose them is not
      established: fixed, or searched on held-out data by the caller).
    space: "delta" (default, a jaxalign choice): linear in what each adapter
      adds to the base, sum_t w_t a_t @ b_t per LoRA pair (see `lora_delta`);
      the result holds {"delta": ...} in place of each pair, to merge into the
      base weights. "factors": every leaf combined as is (A and B separately),
      an adapter of the input's structure whose delta (sum w a)(sum w b) is
      bilinear in the weights.
    lora_keys: the names of the LoRA factor pair in "delta" space.

  Returns:
    the combined pytree; one-hot weights e_t give domain t's adapter ("factors")
    or its delta ("delta") exactly. Leaves keep their dtype (float32 compute).
  """
  if space not in _SPACES:
    raise ValueError(f"space must be one of {_SPACES}, got {space!r}")
  num_domains = len(domain_adapters)
  if num_domains == 0:
    raise ValueError("cofs_combine needs at least one adapter")
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (num_domains,):
    raise ValueError(f"weights must have shape ({num_domains},), got {weights.shape}")
  if space == "delta":
    domain_adapters = [lora_delta(a, lora_keys=lora_keys) for a in domain_adapters]

  def combine(*leaves):
    out = sum(weights[t] * jnp.asarray(leaf, jnp.float32) for t, leaf in enumerate(leaves))
    return out.astype(jnp.result_type(leaves[0]))

  return jax.tree.map(combine, *domain_adapters)


def _pure(tree) -> Any:
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def adapter_deltas(adapters) -> dict:
  """{..., "<name>_lora": {"delta": A @ B [d_in, d_out]}} (unscaled) of an adapter state."""
  return lora_delta(_pure(adapters))


def merge_deltas(base, deltas, *, scale: float) -> nnx.State:
  """Base params + scale * delta reshaped onto each adapted weight.

  Args:
    base: nnx.State of the base Params (the `frozen` of a LoRA state).
    deltas: nested dict with {"delta": [d_in, d_out]} under each "<name>_lora"
      (from `adapter_deltas`, or `cofs_combine(..., space="delta")`).
    scale: alpha / rank.

  Returns:
    an nnx.State of the base's structure: the merged model's parameters.
  """
  flat_deltas = {}

  def walk(node, path):
    if isinstance(node, dict):
      if "delta" in node:
        flat_deltas[path] = node["delta"]
      for k, v in node.items():
        if k != "delta":
          walk(v, path + (k,))
  walk(_pure(deltas), ())

  out, used = [], set()
  for path, leaf in nnx.to_flat_state(base):
    adapter_path = path[:-1] + (str(path[-1]) + SUFFIX,)
    if adapter_path in flat_deltas:
      used.add(adapter_path)
      leaf = leaf.replace(_fold(leaf.get_value(), flat_deltas[adapter_path], scale))
    out.append((path, leaf))
  unused = sorted(".".join(map(str, p)) for p in set(flat_deltas) - used)
  if unused:
    raise ValueError(f"adapters with no base weight: {unused}")
  return nnx.from_flat_state(out)


def merge(base, adapters, *, scale: float) -> nnx.State:
  """The base params with each adapter folded in: W + scale * A @ B (float32, HIGHEST)."""
  return merge_deltas(base, adapter_deltas(adapters), scale=scale)


# ---------------------------------------------------------------------------
# Adapter-only files (a stored module: COFS-DPO's per-domain fast adapters).


def save_adapters(path: str, adapters) -> str:
  """Writes an adapter state (Orbax, no pickle) to the new directory `path`."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, _pure(adapters), force=True)
  return path


def load_adapters(path: str, abstract_adapters):
  """Reads `save_adapters`' directory into the structure and shardings of `abstract_adapters`."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.lora.init_adapters: {path} is not a directory")
  target = _pure(abstract_adapters)
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
      target)
  with ocp.StandardCheckpointer() as ckptr:
    pure = ckptr.restore(path, target)
  if isinstance(abstract_adapters, nnx.State):
    state = jax.tree.map(lambda x: x, abstract_adapters)
    nnx.replace_by_pure_dict(state, pure)
    return state
  return pure


def combine(domain_adapters: Sequence, weights, *, space: str = "delta"):
  """COFS-DPO's linear combination of stored adapters, as a delta tree for `merge_deltas`."""
  combined = cofs_combine([_pure(a) for a in domain_adapters], weights, space=space)
  return combined if space == "delta" else lora_delta(combined)
