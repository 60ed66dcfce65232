"""Hugging Face interop: safetensors <-> Transformer parameters, both directions.

config.json <-> ModelConfig is `hf_config` (by the rows of `families.FAMILIES`);
this module maps the tensors, by the ModelConfig switches alone (with routed
experts, those switches pick the family whose expert names it uses).

Every parameter is a fixed relayout of one HF tensor (the table in
jaxalign/models/transformer.py): the HF tensor is reshaped into a "view" (one HF
axis may split into several, e.g. [H*Dh] -> [H, Dh]) and the view transposed
into our axis order. A stacked parameter (scanned layers [G, ...]; experts
[E, ...], from the hub's one tensor per expert) stacks such relayouts, and
import also reads transformers 5's fused expert tensors (two parameters from
one). Import reads, for each device, only the HF rows its shard
needs, straight from the memory-mapped safetensors files; export streams one
tensor at a time into safetensors files (a LoRA or QLoRA base with its adapters:
each merged, and dequantized, just before it is fetched: models/merged.py). Neither
ever holds the whole model in one host buffer, nor export the merged one on the devices.

  model, model_cfg = from_pretrained("path/to/Llama-3.1-8B", mesh=mesh)
  export(model, model_cfg, "out/", architecture="LlamaForCausalLM", tokenizer=tok)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxalign import errors
from jaxalign.sharding import DEFAULT_RULES
from jaxalign.models.families import Experts, family
from jaxalign.models import merged, quant
from jaxalign.models.hf_config import config_from_hf, config_to_hf, infer_architecture, read_config
from jaxalign.models.transformer import ModelConfig, Transformer

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size ("5GB")


# ---------------------------------------------------------------------------
# Parameter <-> tensor mapping


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one HF tensor (or one part of it) becomes one parameter.

  groups[j]: sizes of the view axes HF axis j splits into (their product is
  the HF size); take: (view axis, index) pairs fixing view axes (the parameter
  is that part of the tensor: transformers' fused gate_up_proj holds two);
  perm: our axis i is the perm[i]-th of the view axes left.
  """
  name: str
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  take: tuple[tuple[int, int], ...] = ()

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.groups)

  @property
  def _free(self) -> list[int]:
    """The view axes not fixed by `take`, in view order."""
    fixed = {axis for axis, _ in self.take}
    return [v for v in range(sum(len(g) for g in self.groups)) if v not in fixed]

  @property
  def shape(self) -> tuple[int, ...]:
    view = [s for g in self.groups for s in g]
    return tuple(view[self._free[p]] for p in self.perm)

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    """Our full array -> the HF tensor."""
    if self.take:
      raise ValueError(f"{self.name}: a part of a tensor is read, never written")
    return np.transpose(value, np.argsort(self.perm)).reshape(self.hf_shape)

  def read(self, tensor, index: tuple[slice, ...]) -> np.ndarray:
    """Our array's block `index`, reading only the HF rows it needs.

    Args:
      tensor: a safetensors slice (or any array) indexable by HF-axis slices.
      index: one slice per our axis (as make_array_from_callback passes).
    """
    view_sizes = [s for g in self.groups for s in g]
    view_slices: list[slice] = [slice(None)] * len(view_sizes)
    for axis, sl in enumerate(index):
      view_slices[self._free[self.perm[axis]]] = sl
    for axis, i in self.take:
      view_slices[axis] = slice(i, i + 1)
    view_slices = [slice(*sl.indices(n)) for sl, n in zip(view_slices, view_sizes)]
    hf_index, post_index, block_shape = [], [], []
    v = 0
    for g in self.groups:
      outer, inner = view_slices[v], view_slices[v + 1:v + len(g)]
      stride = math.prod(g[1:])
      # Whole rows of the outer view axis; inner view axes cut after reading.
      hf_index.append(slice(outer.start * stride, outer.stop * stride))
      block_shape += [outer.stop - outer.start, *g[1:]]
      post_index += [slice(None), *inner]
      v += len(g)
    block = np.asarray(tensor[tuple(hf_index)]).reshape(block_shape)[tuple(post_index)]
    block = block.reshape([block.shape[v] for v in self._free])   # drops the fixed axes
    return np.transpose(block, self.perm)


@dataclasses.dataclass(frozen=True)
class _Stacked:
  """A parameter [G, ...] stacked from several HF tensors: entry g is layouts[g].

  A scanned parameter stacks layers; an expert parameter ([E, ...]) stacks
  the per-expert tensors; a scanned expert parameter [G, E, ...] nests the two.
  """
  layouts: tuple["_Layout | _Stacked", ...]

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.layouts), *self.layouts[0].shape)

  def leaves(self) -> list[tuple[tuple[int, ...], _Layout]]:
    """(entry index path, HF tensor layout) of every HF tensor, in order."""
    return [((g, *path), one) for g, lay in enumerate(self.layouts)
            for path, one in _leaves(lay)]

  def read(self, tensors, index: tuple[slice, ...]) -> np.ndarray:
    """Our array's block `index`, reading only the entries (and rows) it needs.

    Args:
      tensors: nested like `layouts`: tensors[g] is entry g's tensor (or list).
      index: one slice per our axis.
    """
    entries = range(*index[0].indices(len(self.layouts)))
    return np.stack([self.layouts[g].read(tensors[g], index[1:]) for g in entries])

  def map(self, fn) -> list:
    """`fn` of each HF tensor layout, nested like `layouts`."""
    return [lay.map(fn) if isinstance(lay, _Stacked) else fn(lay) for lay in self.layouts]


def _leaves(lay: _Layout | _Stacked) -> list[tuple[tuple[int, ...], _Layout]]:
  """(entry index path, HF tensor layout) of the HF tensors of one parameter."""
  return lay.leaves() if isinstance(lay, _Stacked) else [((), lay)]


def _experts(c: ModelConfig) -> Experts:
  """The expert spelling of the MoE family whose switches `c` has (the closest one
  where none has them all: the shapes are the same, and export refuses it)."""
  return family(infer_architecture(c)).experts


def _mlp_layouts(c: ModelConfig, p: str, fused: bool) -> dict[tuple, _Layout | _Stacked]:
  """Layer p's MLP parameters -> HF tensor layouts: the dense MLP, or the router and
  the experts. Per-expert tensors (the hub's, save_pretrained's): a parameter
  [E, ...] stacks expert j's tensor as entry j. `fused` (transformers 5's own
  layout, save_pretrained(save_original_format=False)): mlp.experts.gate_up_proj
  [E, 2F, D] holds gate (rows :F) and up, mlp.experts.down_proj is [E, D, F]."""
  D = c.d_model
  if c.n_experts == 0:
    F = c.d_ff
    return {
        ("mlp", "gate"): _Layout(p + "mlp.gate_proj.weight", ((F,), (D,)), (1, 0)),
        ("mlp", "up"): _Layout(p + "mlp.up_proj.weight", ((F,), (D,)), (1, 0)),
        ("mlp", "down"): _Layout(p + "mlp.down_proj.weight", ((D,), (F,)), (1, 0)),
    }
  E, F, ex = c.n_experts, c.expert_d_ff, _experts(c)
  if fused:
    gate_up = lambda half: _Layout(p + "mlp.experts.gate_up_proj", ((E,), (2, F), (D,)),
                                   (0, 2, 1), take=((1, half),))
    return {
        ("mlp", "router"): _Layout(p + "mlp.gate.weight", ((E,), (D,)), (1, 0)),
        ("mlp", "gate"): gate_up(0),
        ("mlp", "up"): gate_up(1),
        ("mlp", "down"): _Layout(p + "mlp.experts.down_proj", ((E,), (D,), (F,)), (0, 2, 1)),
    }
  b = f"{p}{ex.block}."
  per_expert = lambda name, *groups: _Stacked(tuple(
      _Layout(f"{b}experts.{j}.{name}.weight", groups, (1, 0)) for j in range(E)))
  return {
      ("mlp", "router"): _Layout(b + "gate.weight", ((E,), (D,)), (1, 0)),
      ("mlp", "gate"): per_expert(ex.gate, (F,), (D,)),
      ("mlp", "up"): per_expert(ex.up, (F,), (D,)),
      ("mlp", "down"): per_expert(ex.down, (D,), (F,)),
  }


def _layer_layouts(c: ModelConfig, i: int, fused: bool = False
                   ) -> dict[tuple, _Layout | _Stacked]:
  """Layer i's parameter paths (within its Block) -> HF tensor layouts (`fused`:
  transformers 5's fused experts, see `_mlp_layouts`)."""
  D, H, KV, Dh = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
  same = lambda name, *shape: _Layout(name, tuple((s,) for s in shape),
                                      tuple(range(len(shape))))
  p = f"model.layers.{i}."
  a = p + "self_attn."
  lay = {
      ("attn", "q"): _Layout(a + "q_proj.weight", ((H, Dh), (D,)), (2, 0, 1)),
      ("attn", "k"): _Layout(a + "k_proj.weight", ((KV, Dh), (D,)), (2, 0, 1)),
      ("attn", "v"): _Layout(a + "v_proj.weight", ((KV, Dh), (D,)), (2, 0, 1)),
      ("attn", "o"): _Layout(a + "o_proj.weight", ((D,), (H, Dh)), (1, 2, 0)),
      ("attn_norm", "scale"): same(p + "input_layernorm.weight", D),
      **_mlp_layouts(c, p, fused),
  }
  if c.qkv_bias:
    for n, heads in (("q", H), ("k", KV), ("v", KV)):
      lay[("attn", f"{n}_bias")] = _Layout(a + f"{n}_proj.bias", ((heads, Dh),), (0, 1))
  if c.qk_norm:
    lay[("attn", "q_norm", "scale")] = same(a + "q_norm.weight", Dh)
    lay[("attn", "k_norm", "scale")] = same(a + "k_norm.weight", Dh)
  if c.post_norms:  # Gemma's sandwich names
    lay[("post_attn_norm", "scale")] = same(p + "post_attention_layernorm.weight", D)
    lay[("mlp_norm", "scale")] = same(p + "pre_feedforward_layernorm.weight", D)
    lay[("post_mlp_norm", "scale")] = same(p + "post_feedforward_layernorm.weight", D)
  else:
    lay[("mlp_norm", "scale")] = same(p + "post_attention_layernorm.weight", D)
  return lay


def _layouts(c: ModelConfig, fused: bool = False) -> dict[tuple, _Layout | _Stacked]:
  """Our flat-state path -> the HF tensor layout (or, for a stacked parameter, one
  layout per entry: per layer when scanned, per expert), for every parameter of
  `c` (`fused`: transformers 5's fused experts, import only)."""
  D, V = c.d_model, c.vocab_size
  same = lambda name, *shape: _Layout(name, tuple((s,) for s in shape),
                                      tuple(range(len(shape))))
  out: dict[tuple, _Layout | _Stacked] = {
      ("embed", "embedding"): same("model.embed_tokens.weight", V, D),
      ("final_norm", "scale"): same("model.norm.weight", D)}
  if not c.tie_embeddings:
    out[("lm_head",)] = _Layout("lm_head.weight", ((V,), (D,)), (1, 0))
  if not c.scan_layers:
    for i in range(c.n_layers):
      out.update({("layers", i, *k): v for k, v in _layer_layouts(c, i, fused).items()})
    return out
  period, groups, tail = c.scan_groups()
  for j in range(period):
    per_layer = [_layer_layouts(c, g * period + j, fused) for g in range(groups)]
    out.update({("layers", j, *k): _Stacked(tuple(lay[k] for lay in per_layer))
                for k in per_layer[0]})
  for t in range(tail):
    out.update({("tail", t, *k): v
                for k, v in _layer_layouts(c, groups * period + t, fused).items()})
  return out


# ---------------------------------------------------------------------------
# Import


def param_shapes(config: ModelConfig) -> dict[tuple, tuple[int, ...]]:
  """Our flat-state path -> shape of every parameter of a Transformer of `config`
  (what an abstract model holds, without building one)."""
  return {key: lay.shape for key, lay in _layouts(config).items()}


# Bytes per element of the safetensors dtypes (the format's own names).
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                "BOOL": 1}


def read_header(file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Tensor name -> (dtype, shape) from a safetensors file's header, reading no tensor.

  The format: 8 bytes (little-endian header length N), N bytes of JSON
  {name: {"dtype", "shape", "data_offsets": [begin, end]}} with offsets counted
  from the end of the header, then the data.

  Raises:
    ValueError naming the file (and the tensor): a truncated file (a tensor's
    bytes end past the file's end), a header that is not JSON, an entry whose
    byte count does not match its shape and dtype.
  """
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
    if n is None or 8 + n > size:
      raise ValueError(f"{file}: truncated, or not a safetensors file ({size} bytes): its "
                       "header does not fit")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
    raise ValueError(f"{file}: not a safetensors file (its header is not JSON: {e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{file}: not a safetensors file (its header is not a JSON object)")
  data_bytes = size - 8 - n
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
      begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{file}: tensor {name!r} has a malformed header entry") from None
    if end > data_bytes:
      raise ValueError(f"{file}: truncated: tensor {name!r} ends at byte {8 + n + end}, "
                       f"the file has {size} bytes")
    if dtype not in _ST_ITEMSIZE:
      raise ValueError(f"{file}: tensor {name!r} has an unknown dtype {dtype!r}")
    if end - begin != math.prod(shape) * _ST_ITEMSIZE[dtype]:
      raise ValueError(f"{file}: tensor {name!r} spans {end - begin} bytes, its shape "
                       f"{shape} of {dtype} needs {math.prod(shape) * _ST_ITEMSIZE[dtype]}")
    out[name] = (dtype, shape)
  return out


def _headers(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Tensor name -> (file, shape) of the checkpoint in `path`, from the headers alone
  (model.safetensors, or the shards model.safetensors.index.json lists)."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
  elif os.path.exists(single):
    weight_map, files = None, ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
  found = {}
  for name in files:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{index}: lists {name}, which is not in {path}")
    found.update({t: (file, shape) for t, (_, shape) in read_header(file).items()})
  for tensor, name in (weight_map or {}).items():
    if found.get(tensor, (None,))[0] != os.path.join(path, name):
      raise ValueError(f"{index}: maps {tensor!r} to {name}, whose header lacks it")
  return found


def _fused(names) -> bool:
  """Whether a checkpoint's tensor names hold transformers 5's fused experts."""
  return any(n.endswith(".mlp.experts.gate_up_proj") for n in names)


def check_weights(path: str, config: ModelConfig) -> None:
  """Checks the safetensors headers in `path` against the tensors `config` needs,
  reading only the headers (a few KB per file), not one tensor.

  Raises:
    FileNotFoundError: no weights (or a shard the index lists is absent).
    ValueError naming the file and tensor: a truncated or malformed file; a tensor
      `config` needs that is missing or of another shape (expected and found);
      a tensor the model has no place for.
  """
  found = _headers(path)
  wanted = [one for lay in _layouts(config, _fused(found)).values()
            for _, one in _leaves(lay)]
  for one in wanted:
    if one.name not in found:
      raise ValueError(f"{path}: missing tensor {one.name!r}")
    file, shape = found[one.name]
    if shape != one.hf_shape:
      raise ValueError(f"{file}: tensor {one.name!r} has shape {shape}, but the model "
                       f"config wants {one.hf_shape}")
  extra = sorted(n for n in set(found) - {one.name for one in wanted}
                 if not n.endswith(_IGNORED_SUFFIXES)
                 and not (n == "lm_head.weight" and config.tie_embeddings))
  if extra:
    raise ValueError(f"{path}: tensors with no place in the model: {extra[:8]}"
                     + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))


def _weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file holding it."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {k: os.path.join(path, f) for k, f in weight_map.items()}
  if os.path.exists(single):
    from safetensors import safe_open
    with safe_open(single, framework="numpy") as f:
      return {k: single for k in f.keys()}
  raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def abstract_model(config: ModelConfig, *, mesh=None, rules=DEFAULT_RULES):
  """(graphdef, abstract state with shardings): a Transformer with nothing allocated.

  With `mesh`, each leaf's sharding comes from its logical axis names under
  `rules`; without, everything sits on the first device.
  """
  if mesh is None:
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, state)
  else:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
      model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
      graphdef, state = nnx.split(model)
      specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, P))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       state, shardings)
  return graphdef, state


def _value(leaf):
  """An nnx Variable's value (a bare array or ShapeDtypeStruct as it is)."""
  return leaf.get_value() if hasattr(leaf, "get_value") else leaf


def load_state(path: str, config: ModelConfig, abstract_state):
  """The parameters of the HF checkpoint in `path`, placed per `abstract_state`.

  Each device's block is read from the memory-mapped safetensors files
  (`safe_open(..., framework="numpy").get_slice`) and cast to the abstract
  dtype; a process touches only the rows of its own devices' blocks.

  Args:
    path: directory with model.safetensors or model.safetensors.index.json.
    config: the ModelConfig `abstract_state` was built from.
    abstract_state: nnx.State of jax.ShapeDtypeStruct with `.sharding` set
      (from `abstract_model`, or the params of a train state).

  Raises:
    ValueError naming the HF tensor when one is missing, has the wrong shape,
    or the checkpoint holds a tensor this model has no place for, or the file
    when it is truncated (`check_weights`).
  """
  from safetensors import safe_open

  check_weights(path, config)   # a truncated or misshapen file: one line naming it
  files = _weight_files(path)
  layouts = _layouts(config, _fused(files))
  flat = nnx.to_flat_state(abstract_state)
  used = set()
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, framework="numpy"))
               for f in sorted(set(files.values()))}
    def tensor_of(lay: _Layout):
      if lay.name not in files:
        raise ValueError(f"{path}: missing tensor {lay.name!r}")
      used.add(lay.name)
      tensor = handles[files[lay.name]].get_slice(lay.name)
      if tuple(tensor.get_shape()) != lay.hf_shape:
        raise ValueError(f"{path}: tensor {lay.name!r} has shape {tuple(tensor.get_shape())}, "
                         f"the config wants {lay.hf_shape}")
      return tensor

    values = {}
    by_key = dict(flat)
    for key, leaf in flat:
      if quant.is_quantized_path(key) and key[:-1] in layouts:
        if key[-1] == "codes":   # a quantized base (QLoRA): codes and scales together
          scale_key = key[:-1] + ("scale",)
          values[key], values[scale_key] = _place_quantized(
              layouts[key[:-1]], tensor_of, _value(leaf), _value(by_key[scale_key]),
              quant.BLOCK_AXIS[key[-2]])
        continue
      if key not in layouts:
        raise ValueError(f"no HF tensor for parameter {'.'.join(map(str, key))}")
      lay = layouts[key]
      abstract = _value(leaf)
      tensors = lay.map(tensor_of) if isinstance(lay, _Stacked) else tensor_of(lay)
      values[key] = _place(tensors, lay, abstract)
    extra = sorted(n for n in set(files) - used
                   if not n.endswith(_IGNORED_SUFFIXES)
                   and not (n == "lm_head.weight" and config.tie_embeddings))
    if extra:
      raise ValueError(f"{path}: tensors with no place in the model: {extra[:8]}"
                       + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
  return nnx.from_flat_state([(k, leaf.replace(values[k]) if hasattr(leaf, "replace")
                               else values[k]) for k, leaf in flat])


def _place(tensors, lay: _Layout | _Stacked, abstract: jax.ShapeDtypeStruct) -> jax.Array:
  """One global array built from per-device blocks of `tensors` (one HF tensor, or
  for a stacked parameter the nested list of them: a block reads only its entries)."""
  blocks: dict[tuple, np.ndarray] = {}  # replicated blocks are read once

  def block(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in blocks:
      blocks[key] = lay.read(tensors, index).astype(abstract.dtype)
    return blocks[key]

  return jax.make_array_from_callback(abstract.shape, abstract.sharding, block)


def _place_quantized(lay, tensor_of, codes: jax.ShapeDtypeStruct,
                     scale: jax.ShapeDtypeStruct, axis: int) -> tuple[jax.Array, jax.Array]:
  """(codes, scale) global arrays of one HF tensor quantized on load (models/quant.py).

  Each device's block of codes (or scales) maps to a block of the float weight
  (whole quantization blocks along the block `axis`: codes and scales shard alike);
  that float block alone is read from the file and quantized on the host, once for
  both arrays. The float weight is never whole in host memory.
  """
  fmt = quant.format_of(codes.dtype)
  a = axis % len(codes.shape)
  n = codes.shape[a] * (2 if fmt == "nf4" else 1)         # the float weight's block axis
  block = n // scale.shape[a]
  tensors = lay.map(tensor_of) if isinstance(lay, _Stacked) else tensor_of(lay)
  read = lambda index: lay.read(tensors, index)
  done: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

  def part(which: int, per: int, shape):
    def block_of(index):
      key = [s.indices(size)[:2] for s, size in zip(index, shape)]
      lo, hi = key[a]
      key[a] = (lo * per, hi * per)
      key = tuple(key)
      if key not in done:
        if (hi - lo) * per % block:
          name = lay.name if isinstance(lay, _Layout) else lay.leaves()[0][1].name
          raise ValueError(f"{name}: a device holds a part of a quantization block of "
                           f"{block} (mesh and block disagree)")
        w = read(tuple(slice(b, e) for b, e in key)).astype(np.float32)
        done[key] = quant.quantize(w, fmt, block=block, axis=axis, xp=np)
      return done[key][which]
    return block_of

  per_code = n // codes.shape[a]
  return (jax.make_array_from_callback(codes.shape, codes.sharding,
                                       part(0, per_code, codes.shape)),
          jax.make_array_from_callback(scale.shape, scale.sharding,
                                       part(1, block, scale.shape)))


def resolve_path(path_or_name: str) -> str:
  """A local checkpoint directory; a hub name is fetched once into huggingface_hub's cache.

  Only configs, safetensors weights and tokenizer files are fetched (never code).
  """
  if os.path.isdir(path_or_name):
    return path_or_name
  if path_or_name.startswith(("/", ".", "~")) or path_or_name.count("/") > 1:
    raise FileNotFoundError(f"{path_or_name} is not a directory (nor a hub name 'org/model')")
  from huggingface_hub import snapshot_download
  return snapshot_download(path_or_name, allow_patterns=[
      "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])


def from_pretrained(path: str, *, mesh=None, rules=DEFAULT_RULES,
                    dtype: str | None = None,
                    scan_layers: bool = True) -> tuple[Transformer, ModelConfig]:
  """A Transformer with the weights of the HF checkpoint directory `path`.

  Args:
    path: a directory with config.json and safetensors weights, or a hub name
      (downloaded through huggingface_hub's cache).
    mesh: place each parameter sharded on it per the logical-axis `rules`;
      None: everything on the first device.
    rules: logical axis name -> mesh axes (jaxalign.sharding.DEFAULT_RULES).
    dtype: parameter and compute dtype (e.g. "bfloat16"); None: float32.
    scan_layers: the stacked (scanned) parameter layout, or one entry per layer.

  Returns:
    (model, model_config).
  """
  path = resolve_path(path)
  config = dataclasses.replace(config_from_hf(read_config(path)), scan_layers=scan_layers)
  if dtype is not None:
    config = dataclasses.replace(config, dtype=str(np.dtype(dtype)),
                                 param_dtype=str(np.dtype(dtype)))
  graphdef, abstract = abstract_model(config, mesh=mesh, rules=rules)
  state = load_state(path, config, abstract)
  return nnx.merge(graphdef, state), config


def load_tokenizer(path: str):
  """The tokenizer (and chat template) saved in `path`, via transformers."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


# ---------------------------------------------------------------------------
# Export


def _host_value(x) -> np.ndarray:
  """A full host copy of one (possibly sharded, multi-process) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _write_safetensors(path: str, names: Sequence[str], shapes, dtypes, fetch) -> None:
  """Writes one safetensors file, fetching and writing one tensor at a time."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dt in zip(names, shapes, dtypes):
    size = math.prod(shape) * np.dtype(dt).itemsize
    header[name] = {"dtype": _ST_NAMES[np.dtype(dt)], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(len(raw).to_bytes(8, "little"))
      f.write(raw)
      for name, shape, dt in zip(names, shapes, dtypes):
        value = np.ascontiguousarray(fetch(name), dtype=dt)
        if value.shape != tuple(shape):
          raise ValueError(f"{name}: shape {value.shape}, expected {tuple(shape)}")
        f.write(value.tobytes())
        del value   # not held while the next one is fetched (on CPU: a view of its buffer)
    os.replace(tmp, path)
  except BaseException as e:   # no partial file stays behind, whatever stopped it
    _remove_quietly(tmp)
    if isinstance(e, OSError):   # disk full, read-only: name the file (f.write does not)
      raise errors.write_failure(path, e) from e
    raise


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:   # never created
    pass


def _write_json_atomic(path: str, obj: Any) -> None:
  """`path` written whole (temp file + rename) or not at all; OutputWriteError naming it."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)
  except OSError as e:
    _remove_quietly(tmp)
    raise errors.write_failure(path, e) from e


def _hf_order(name: str) -> tuple:
  """Sort key: embeddings, then layer by layer (numerically), then the rest."""
  if name.startswith("model.layers."):
    layer, rest = name[len("model.layers."):].split(".", 1)
    return (1, int(layer), rest)
  return (0 if "embed" in name else 2, 0, name)


def _tensors_by_name(flat: dict[tuple, Any], config: ModelConfig
                     ) -> dict[str, tuple[_Layout, Any, tuple[int, ...]]]:
  """HF name -> (layout, our parameter (`merged.weights`' value), its entry in a
  stacked parameter or ()), in HF order (layer by layer).

  Raises:
    ValueError listing the parameters `flat` lacks or has beyond `config`.
  """
  layouts = _layouts(config)
  missing = sorted(".".join(map(str, k)) for k in set(layouts) - set(flat))
  unknown = sorted(".".join(map(str, k)) for k in set(flat) - set(layouts))
  if missing or unknown:
    raise ValueError(f"params do not match the config: missing {missing}, unknown {unknown}")
  by_name = {}
  for key, lay in layouts.items():
    by_name.update({x.name: (x, flat[key], path) for path, x in _leaves(lay)})
  return dict(sorted(by_name.items(), key=lambda kv: _hf_order(kv[0])))


def _shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
  """Consecutive runs of names of at most max_shard_bytes (a bigger tensor: alone)."""
  shards: list[list[str]] = [[]]
  shard_bytes = 0
  for name, size in sizes.items():
    if shards[-1] and shard_bytes + size > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(name)
    shard_bytes += size
  return shards


def _clear_weights(out_dir: str) -> None:
  """Creates out_dir, removing a previous export's shards and config.json (with new
  weights they would confuse loaders; an interrupted export must not look complete)."""
  try:
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):
      if (stale.endswith((".safetensors", ".safetensors.tmp"))
          or stale in ("model.safetensors.index.json", "config.json")):
        os.remove(os.path.join(out_dir, stale))
  except OSError as e:   # a read-only or unusable directory
    raise errors.write_failure(out_dir, e) from e


def _write_configs(out_dir: str, hf_config: dict[str, Any], tokenizer) -> None:
  """The tokenizer's files, generation_config.json, then config.json, the last file an
  export writes (its special ids go into both configs)."""
  if tokenizer is not None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if getattr(tokenizer, key, None) is not None:
        hf_config[key] = getattr(tokenizer, key)
    try:
      tokenizer.save_pretrained(out_dir)
    except OSError as e:
      raise errors.write_failure(f"{out_dir} (tokenizer files)", e) from e
  _write_json_atomic(os.path.join(out_dir, "generation_config.json"),
                     {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if k in hf_config})
  _write_json_atomic(os.path.join(out_dir, "config.json"), hf_config)


def export(params_state_or_model, model_config: ModelConfig, out_dir: str, *,
           architecture: str | None = None, tokenizer=None,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           dtype: str | None = None, adapters=None, lora_scale: float = 1.0) -> str:
  """Writes a transformers-loadable checkpoint directory.

  Tensors are fetched to the host one at a time (a stacked parameter: one layer's or
  expert's slice), each merged on the devices just before (`merged.weights`): a
  quantized projection (QLoRA's stored base) is written dequantized, in
  model_config.param_dtype; with `adapters`, W + lora_scale * A @ B. The merged model
  is never whole on the devices (the stored base, the adapters and one slice are), and
  the host holds the tensor being written.

  Args:
    params_state_or_model: a Transformer, or its nnx.State of parameters (a LoRA
      run's: the base, quantized or not, as stored).
    model_config: the ModelConfig of those parameters.
    out_dir: created if needed (safetensors files already there are removed);
      gets config.json, model.safetensors (or
      model-0000k-of-0000n.safetensors + model.safetensors.index.json when
      the weights exceed max_shard_bytes) and the tokenizer's files.
    architecture: one of families.FAMILIES; None: `hf_config.infer_architecture`.
    tokenizer: a transformers tokenizer to save beside the weights.
    max_shard_bytes: largest safetensors file (a bigger single tensor gets a
      file of its own).
    dtype: cast the weights to this dtype (e.g. "bfloat16"); None: as stored.
    adapters: LoRA adapters (nnx.State or nested dict, …/<name>_lora/{lora_a, lora_b})
      merged into the weights they target; None: none.
    lora_scale: alpha / rank of those adapters.

  Returns:
    out_dir. In a multi-process run every process must call this; process 0 writes.
  """
  if isinstance(params_state_or_model, nnx.Module):
    state = nnx.state(params_state_or_model, nnx.Param)
  else:
    state = params_state_or_model
  hf_config = config_to_hf(model_config, architecture or infer_architecture(model_config))
  if dtype is not None:
    hf_config["torch_dtype"] = str(np.dtype(dtype))
  params = merged.weights(state, adapters, scale=lora_scale, dtype=model_config.param_dtype)
  by_name = _tensors_by_name(params, model_config)
  out_dtype = lambda value: np.dtype(dtype or value.dtype)
  sizes = {name: math.prod(lay.hf_shape) * out_dtype(leaf).itemsize
           for name, (lay, leaf, _) in by_name.items()}
  shards = _shards(sizes, max_shard_bytes)

  def fetch(name):
    lay, value, entry = by_name[name]
    # A stacked parameter: gather only entry's slice (a layer's, an expert's) to the host.
    return lay.to_hf(_host_value(merged.take(value, entry)))

  is_writer = jax.process_index() == 0
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  if not is_writer:  # other processes join the gathers of non-addressable arrays
    for names in shards:
      for n in names:
        fetch(n)
    return out_dir
  written: list[str] = []
  try:
    _clear_weights(out_dir)
    for file, names in zip(files, shards):
      _write_safetensors(
          os.path.join(out_dir, file), names, [by_name[n][0].hf_shape for n in names],
          [out_dtype(by_name[n][1]) for n in names], fetch)
      written.append(os.path.join(out_dir, file))
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(sizes.values())},
               "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
      _write_json_atomic(os.path.join(out_dir, "model.safetensors.index.json"), index)
      written.append(os.path.join(out_dir, "model.safetensors.index.json"))
    _write_configs(out_dir, hf_config, tokenizer)
  except errors.OutputWriteError as e:   # disk full, read-only: leave nothing loadable
    for path in written:
      _remove_quietly(path)
    raise errors.OutputWriteError(
        f"{e}; export not completed: {out_dir} holds no weights and no config.json from "
        f"it") from e
  return out_dir
