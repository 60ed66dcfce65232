"""One Flax NNX decoder-only transformer for Llama / Qwen2 / Qwen3 / Mistral / Gemma2.

The module tree and parameter shapes map 1:1 onto the Hugging Face checkpoints
(a weight import is a reshape/transpose per tensor, never a rewrite):

  HF name                                     here                          shape
  model.embed_tokens.weight [V, D]            embed.embedding               [V, D]
  layers.i.input_layernorm.weight             layers[i].attn_norm.scale     [D]
  layers.i.self_attn.q_proj.weight [H*Dh, D]  layers[i].attn.q              [D, H, Dh]
  layers.i.self_attn.k_proj.weight [KV*Dh, D] layers[i].attn.k              [D, KV, Dh]
  layers.i.self_attn.v_proj.weight            layers[i].attn.v              [D, KV, Dh]
  layers.i.self_attn.{q,k,v}_proj.bias        layers[i].attn.{q,k,v}_bias   [H|KV, Dh]
  layers.i.self_attn.o_proj.weight [D, H*Dh]  layers[i].attn.o              [H, Dh, D]
  layers.i.self_attn.{q,k}_norm.weight        layers[i].attn.{q,k}_norm     [Dh]
  layers.i.post_attention_layernorm (Llama)   layers[i].mlp_norm.scale      [D]
  Gemma2: post_attention_layernorm            layers[i].post_attn_norm      [D]
          pre_feedforward_layernorm           layers[i].mlp_norm            [D]
          post_feedforward_layernorm          layers[i].post_mlp_norm       [D]
  layers.i.mlp.{gate,up}_proj.weight [F, D]   layers[i].mlp.{gate,up}       [D, F]
  layers.i.mlp.down_proj.weight [D, F]        layers[i].mlp.down            [F, D]
  model.norm.weight                           final_norm.scale              [D]
  lm_head.weight [V, D] (untied only)         lm_head                       [D, V]

With ``n_experts`` E > 0 (Qwen3-MoE, Mixtral) ``layers[i].mlp`` is a `MoeMLP`:
``router`` [D, E], ``gate`` / ``up`` [E, D, F], ``down`` [E, F, D] (F = moe_d_ff);
its routing math is in jaxalign.models.moe, and the forward can report the router
statistics behind the load-balancing and z losses (``router_stats``).

With ``scan_layers`` (the ModelConfig default; a recipe's model.scan_layers
"auto" chooses per platform and depth, `auto_scan_layers`) the blocks are
stacked: ``layers[j]`` is one Block whose parameters have a leading ``layers``
axis of G = n_layers // P entries, entry g holding layer g*P + j, where P is
the smallest period of the per-layer differences (1 for Llama/Qwen/Mistral, 2
for Gemma 2's local/global pairs, 6 for Gemma 3's 5 local : 1 global). The
forward is one ``lax.scan`` over the G groups, so XLA compiles one group body
instead of n_layers copies; layers past G*P (n_layers not a multiple of P) are
plain blocks in ``tail``. With ``scan_layers=False`` ``layers[i]`` is layer i,
unrolled (faster steps on CPU; same logits and gradients, see `stack_layers` /
`unstack_layers`). A seed gives the same model in both layouts: stacked entry g
is drawn with the keys layer g*P + j draws when unrolled (`_UnrolledOrderKeys`),
so the switch never changes a run.

Every parameter carries logical axis names (``out_sharding`` metadata); under
``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules(rules)`` variables are
sharded eagerly at construction. The forward has no per-op sharding: meshes use
``AxisType.Auto`` and XLA propagates from the parameters and inputs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxalign.models import attention as attention_lib
from jaxalign.models import context as context_lib
from jaxalign.models import expert_parallel
from jaxalign.models import grouped_matmul as grouped_matmul_lib
from jaxalign.models import moe as moe_lib
from jaxalign.models import quant


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")
# The activations tagged with jax.ad_checkpoint.checkpoint_name in the forward;
# "minimal" saves exactly these (projection outputs) and recomputes the rest.
# (A MoeMLP tags its grouped gate/up/down outputs with the same mlp_* names, its
# router logits as "router_logits" and, on a mesh, its rows sorted by expert as
# "moe_rows": saved, they spare the backward a second gather of the tokens.)
SAVED_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down",
               "router_logits", "moe_rows")


def normalize_remat(value) -> str:
  """A remat setting as a policy name; raises ValueError naming the valid ones."""
  if value is True:
    return "full"
  if value is False or value is None:
    return "none"
  if not isinstance(value, str) or value not in REMAT_POLICIES:
    raise ValueError(f"remat={value!r}; want one of {REMAT_POLICIES} (or True/False)")
  return value


def remat_policy(name: str, *, moe: bool = False):
  """The jax.checkpoint policy of a remat name (None: save nothing, i.e. "full").

  moe: the model has routed experts, whose grouped matmuls (lax.ragged_dot) the
  dots policies do not count as dots: "dots" and "dots_no_batch" then save them too
  (by their checkpoint names), as they save a dense MLP's matmuls.
  """
  cp = jax.checkpoint_policies
  name = normalize_remat(name)
  policy = {"full": None, "dots": cp.dots_saveable,
            "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
            "minimal": cp.save_only_these_names(*SAVED_NAMES)}[name]
  if moe and name in ("dots", "dots_no_batch"):
    policy = cp.save_from_both_policies(
        policy, cp.save_only_these_names("mlp_gate", "mlp_up", "mlp_down", "moe_rows"))
  return policy


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and architecture switches of one decoder-only transformer.

  The defaults are the "tiny" preset. Flags name the family they come from:
  qkv_bias (Qwen2), qk_norm (Qwen3), norm_offset / embed_scale / post_norms /
  softcaps / query_pre_attn_scalar / gelu_tanh (Gemma2), sliding_window
  (Mistral, Gemma2), rope_scaling (Llama 3.1 "llama3" type, or "linear"),
  local_rope_theta (Gemma3: sliding layers use their own unscaled rope).
  """
  vocab_size: int = 32
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 16
  d_ff: int = 128
  max_seq_len: int = 64
  rope_theta: float = 10000.0
  # {"factor", "low_freq_factor", "high_freq_factor",
  #  "original_max_position_embeddings"} of the Llama 3.1 "llama3" rope type
  # (no "rope_type" key), or {"rope_type": "linear", "factor"}: positions / factor.
  rope_scaling: dict[str, Any] | None = None
  # Rope base of the sliding-window layers, unscaled (Gemma3's
  # rope_local_base_freq); None: every layer uses rope_theta and rope_scaling.
  local_rope_theta: float | None = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_offset: bool = False
  embed_scale: bool = False
  post_norms: bool = False
  activation: str = "silu"
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  # Per layer "full" | "sliding"; None: all "full" (with sliding_window set and
  # layer_types None every layer slides, as Mistral).
  layer_types: tuple[str, ...] | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Rematerialization policy of each block (or scanned group of blocks):
  # "none" | "full" | "dots" | "dots_no_batch" | "minimal" (REMAT_POLICIES);
  # True / False are read as "full" / "none".
  remat: str = "none"
  # One lax.scan over stacked layers (True) or a Python loop over layers (False);
  # the two have different parameter layouts (see the module docstring). A
  # recipe's model.scan_layers may also be "auto", resolved to one of the two
  # before a ModelConfig is made (`auto_scan_layers`).
  scan_layers: bool = True
  # Nested rematerialization of the layer scan (scanned layers, remat not "none"):
  # the G scanned groups run as this many checkpointed stages of G / stages groups
  # each, so the backward keeps stages + G / stages layer inputs instead of G, for
  # one more forward of the layers. 1: one scan (each group's input kept).
  remat_stages: int = 1
  # Attention kernel: "auto" | "xla" | "cudnn" | "splash" (jaxalign.models.attention).
  attention: str = "auto"
  # Mixture of experts (Qwen3-MoE, Mixtral): n_experts > 0 makes every block's MLP a
  # `MoeMLP` of n_experts SwiGLU experts of hidden size moe_d_ff (None: d_ff), each
  # token routed to its experts_per_token (top-k) best (jaxalign.models.moe). 0: dense.
  n_experts: int = 0
  experts_per_token: int = 2
  moe_d_ff: int | None = None
  # Renormalize the top-k routing probabilities (Qwen3-MoE norm_topk_prob; Mixtral's
  # softmax over the top-k logits is the same function).
  moe_norm_topk: bool = True
  # Router losses added to the training loss (TRL's router_aux_loss_coef): the
  # load-balancing aux loss and the router z-loss, over real tokens (moe.router_losses).
  router_aux_loss_coef: float = 0.0
  router_z_loss_coef: float = 0.0
  # Grouped-matmul kernel of the experts: "auto" | "ragged_dot" | "megablox"
  # (jaxalign.models.grouped_matmul: megablox on TPU, ragged_dot elsewhere).
  moe_kernel: str = "auto"
  # Experts split over "data" (jaxalign.models.expert_parallel): a device sorts its
  # experts' assignments into a buffer of moe_capacity_factor x its average share of
  # rows, and runs a layer through the exact worst-case buffer (data shards x that
  # share) when its experts receive more. Dropless either way; the factor sets only
  # the cost (how often the dear branch runs). 0: the worst-case buffer always.
  moe_capacity_factor: float = 1.25

  def __post_init__(self):
    attention_lib.check_implementation(self.attention)
    grouped_matmul_lib.check_implementation(self.moe_kernel)
    object.__setattr__(self, "remat", normalize_remat(self.remat))
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"scan_layers={self.scan_layers!r}; want True or False")
    if (isinstance(self.remat_stages, bool) or not isinstance(self.remat_stages, int)
        or self.remat_stages < 1):
      raise ValueError(f"remat_stages={self.remat_stages!r}; want an int >= 1")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                       f"n_kv_heads={self.n_kv_heads}")
    if self.activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"activation={self.activation!r}; want 'silu' or 'gelu_tanh'")
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.n_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries, "
                         f"n_layers={self.n_layers}")
      bad = set(self.layer_types) - {"full", "sliding"}
      if bad:
        raise ValueError(f"layer_types: unknown {sorted(bad)}; want 'full'|'sliding'")
      if "sliding" in self.layer_types and self.sliding_window is None:
        raise ValueError("layer_types has 'sliding' layers but sliding_window is None")
    problem = moe_problem(self)
    if problem is not None:
      raise FieldError(*problem)

  @property
  def is_moe(self) -> bool:
    return self.n_experts > 0

  @property
  def expert_d_ff(self) -> int:
    """Each expert's hidden size (moe_d_ff, or d_ff when that is None)."""
    return self.d_ff if self.moe_d_ff is None else self.moe_d_ff

  def __hash__(self):
    # rope_scaling is a dict; hash a frozen view so configs can be static.
    items = self.to_dict()
    if items["rope_scaling"] is not None:
      items["rope_scaling"] = tuple(sorted(items["rope_scaling"].items()))
    if items["layer_types"] is not None:
      items["layer_types"] = tuple(items["layer_types"])
    return hash(tuple(sorted(items.items())))

  def window_of(self, layer: int) -> int | None:
    """Sliding window of layer `layer`, None for full attention."""
    if self.sliding_window is None:
      return None
    if self.layer_types is None or self.layer_types[layer] == "sliding":
      return self.sliding_window
    return None

  def layer_period(self) -> int:
    """Smallest P with layer i configured as layer i + P (window and rope) for all i."""
    windows = [self.window_of(i) for i in range(self.n_layers)]
    for period in range(1, self.n_layers):
      if all(windows[i] == windows[i + period] for i in range(self.n_layers - period)):
        return period
    return max(self.n_layers, 1)

  def scan_groups(self) -> tuple[int, int, int]:
    """(period P, scanned groups G, unrolled tail layers) of the scanned layout."""
    period = self.layer_period()
    groups = self.n_layers // period
    return period, groups, self.n_layers - groups * period

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if d["layer_types"] is not None:
      d["layer_types"] = list(d["layer_types"])
    if d["rope_scaling"] is not None:
      d["rope_scaling"] = dict(d["rope_scaling"])
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
    d = dict(d)
    if d.get("layer_types") is not None:
      d["layer_types"] = tuple(d["layer_types"])
    return cls(**d)

  def num_params(self) -> int:
    """Parameter count (for presets and planning): every expert counted."""
    return self._count_params(self.n_experts)

  def num_active_params(self) -> int:
    """Parameters one token uses: those of num_params with only experts_per_token
    experts per MoE layer (the router counted whole); num_params for a dense model."""
    return self._count_params(self.experts_per_token if self.is_moe else 0)

  def _count_params(self, experts: int) -> int:
    """Parameter count with `experts` experts per MoE layer."""
    D, H, KV, Dh, F, V = (self.d_model, self.n_heads, self.n_kv_heads,
                          self.head_dim, self.d_ff, self.vocab_size)
    attn = D * H * Dh * 2 + D * KV * Dh * 2
    attn += (H + 2 * KV) * Dh if self.qkv_bias else 0
    attn += 2 * Dh if self.qk_norm else 0
    mlp = (D * self.n_experts + experts * 3 * D * self.expert_d_ff if self.is_moe
           else 3 * D * F)
    block = attn + mlp + D * (4 if self.post_norms else 2)
    return V * D * (1 if self.tie_embeddings else 2) + self.n_layers * block + D


class FieldError(ValueError):
  """A ModelConfig field with an invalid value; `field` names it."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def moe_problem(c: ModelConfig) -> tuple[str, str] | None:
  """(field, what is wrong) for the first invalid mixture-of-experts field, else None."""
  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  if not is_int(c.n_experts) or c.n_experts < 0:
    return "n_experts", f"must be an int >= 0 (0: a dense MLP), got {c.n_experts!r}"
  for key in ("router_aux_loss_coef", "router_z_loss_coef"):
    v = getattr(c, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
      return key, f"must be a finite number >= 0, got {v!r}"
  if not isinstance(c.moe_norm_topk, bool):
    return "moe_norm_topk", f"must be True or False, got {c.moe_norm_topk!r}"
  v = c.moe_capacity_factor
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
    return "moe_capacity_factor", (f"must be a finite number >= 0 (0: the worst-case "
                                   f"buffer always), got {v!r}")
  if not c.n_experts:
    return None
  if not is_int(c.experts_per_token) or not 1 <= c.experts_per_token <= c.n_experts:
    return "experts_per_token", (f"must be an int in 1..n_experts={c.n_experts}, got "
                                 f"{c.experts_per_token!r}")
  if c.moe_d_ff is not None and (not is_int(c.moe_d_ff) or c.moe_d_ff < 1):
    return "moe_d_ff", f"must be a positive int or None (= d_ff), got {c.moe_d_ff!r}"
  return None


# model.scan_layers="auto" (jaxalign.config) scans on TPU and GPU, where the scan
# is what keeps a deep model's compile short (docs/performance.md: 4.5x on the
# 8B recipe), and on any other platform (CPU) from this many layers on; below
# it the layers are unrolled: on CPU the scanned step runs 12-35% slower and saves
# at most ~1.3 s of compile there; from 16 layers on the unrolled compile is ~2x
# the scanned one's and grows ~0.3 s per layer (4x at 32; bench/compile_time.py
# --devices cpu, docs/performance.md "Scan where it pays").
SCAN_MIN_LAYERS_CPU = 16
_SCAN_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")


def auto_scan_layers(platform: str, n_layers: int) -> tuple[bool, str]:
  """(scan_layers for "auto" on `platform` with `n_layers` layers, why, in words)."""
  if platform in _SCAN_PLATFORMS:
    return True, f"{platform}, {n_layers} layers"
  scan = n_layers >= SCAN_MIN_LAYERS_CPU
  return scan, (f"{platform}, {n_layers} layers "
                f"{'>=' if scan else '<'} {SCAN_MIN_LAYERS_CPU}")


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    # ~100M Llama-shaped: 100.1M with tied embeddings.
    "100m": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                        n_kv_heads=4, head_dim=64, d_ff=2048, max_seq_len=2048,
                        norm_eps=1e-5, tie_embeddings=True),
    # meta-llama/Llama-3.1-8B (Llama-3-8B has the same shapes, no rope scaling).
    "llama3-8b": ModelConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, d_ff=14336, max_seq_len=131072, rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        norm_eps=1e-5),
    # Qwen/Qwen2.5-7B.
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        head_dim=128, d_ff=18944, max_seq_len=32768, rope_theta=1000000.0,
        norm_eps=1e-6, qkv_bias=True),
    # google/gemma-2-9b.
    "gemma2-9b": ModelConfig(
        vocab_size=256000, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8,
        head_dim=256, d_ff=14336, max_seq_len=8192, rope_theta=10000.0,
        norm_eps=1e-6, tie_embeddings=True, norm_offset=True, embed_scale=True,
        post_norms=True, activation="gelu_tanh", query_pre_attn_scalar=256.0,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
        layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(42))),
}


def preset(name: str) -> ModelConfig:
  """The ModelConfig registered under `name` in PRESETS."""
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; have {sorted(PRESETS)}")
  return PRESETS[name]


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str | None, ...],
           dtype, stack: int | None = None) -> nnx.Param:
  """A Param carrying logical axis names; sharded eagerly when a mesh is set.

  stack: G stacked layers: the value gets a leading axis of G, named "layers".
  """
  key = rngs.params()
  if stack is not None:
    shape, names = (stack, *shape), ("layers", *names)
  if stack is not None and jnp.shape(key) == (stack,):   # one key per stacked layer
    value = jax.vmap(lambda k: init(k, shape[1:], dtype))(key)
  else:
    value = init(key, shape, dtype)
  # Flax shards eagerly by default and then insists on a mesh; without one the
  # names are kept as metadata only (get_partition_spec still reads them).
  has_mesh = not jax.sharding.get_abstract_mesh().empty
  return nnx.Param(value, out_sharding=names, eager_sharding=has_mesh)


def _normal(stddev: float):
  return jax.nn.initializers.normal(stddev)


def _project(module: nnx.Module, name: str, equation: str, x: jax.Array,
             tag: str) -> jax.Array:
  """x times the weight `module.<name>`, plus the delta of its LoRA adapter if any.

  Every adaptable projection (q, k, v, o, gate, up, down) goes through here;
  jaxalign.models.lora attaches an adapter as the attribute `<name>_lora`. A
  weight of a quantized base (jaxalign.models.quant) is dequantized here, per layer.
  """
  weight = getattr(module, name)
  if isinstance(weight, quant.QuantizedWeight):   # a quantized frozen base (QLoRA)
    w = weight.dequantize(module.dtype)
  else:
    w = weight[...].astype(module.dtype)
  y = _matmul_2d(equation, x, w) if attention_lib.current_platform() == "cpu" else None
  y = jnp.einsum(equation, x, w) if y is None else y
  adapter = getattr(module, name + "_lora", None)
  y = y if adapter is None else y + adapter(x).astype(y.dtype)
  return checkpoint_name(y, tag)     # what the "minimal" remat policy saves


def _matmul_2d(equation: str, x: jax.Array, w: jax.Array) -> jax.Array | None:
  """einsum(equation, x, w) as one 2-D matmul, or None where the equation is not of
  the form "<lead><c>,<c><out>-><lead><out>" (x's trailing dims c contracted with
  w's leading ones).

  For XLA:CPU: the einsum's dot contracts over x's leading dims [B, T] in the weight
  gradient, and the CPU backend canonicalizes that by copying the activation (or its
  gradient) into a transposed layout first -- an elementwise pass per projection
  (the gated MLP's silu backward fused with it was ~15% of a CPU DPO step, issue
  29). Flattening [B, T, ...] to rows first leaves a plain matrix product whose
  transposes the matmul kernel takes as flags. Same products and sums, so the same
  values; on TPU/GPU (and TPU plans) the einsum runs as before.
  """
  lhs, rest = equation.split(",")
  rhs, out = rest.split("->")
  n = sum(1 for c in rhs if c in lhs)
  contract = rhs[:n]
  if not (n and lhs.endswith(contract) and out == lhs[:-n] + rhs[n:]):
    return None
  lead = x.shape[:x.ndim - n]
  k = math.prod(x.shape[x.ndim - n:])
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(lead + w.shape[n:])


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in float32.

  Llama/Qwen: y = w * norm(x) (w init 1). Gemma (offset): y = (1 + w) * norm(x)
  (w init 0), with the scale applied in float32 as HF does.
  """

  def __init__(self, dim: int, *, eps: float, offset: bool, dtype, param_dtype,
               rngs: nnx.Rngs, stack: int | None = None):
    init = jax.nn.initializers.zeros if offset else jax.nn.initializers.ones
    self.scale = _param(rngs, init, (dim,), ("norm",), param_dtype, stack)
    self.eps = eps
    self.offset = offset
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> jax.Array:
  """[Dh/2] float32 inverse frequencies, with the configured scaling.

  local=True: those of the sliding-window layers when `local_rope_theta` is set
  (unscaled, from that base).
  """
  dim = config.head_dim
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  if local and config.local_rope_theta is not None:
    return 1.0 / (config.local_rope_theta ** exponents)
  inv_freq = 1.0 / (config.rope_theta ** exponents)
  rs = config.rope_scaling
  if rs is None:
    return inv_freq
  if rs.get("rope_type", "llama3") == "linear":
    return inv_freq / rs["factor"]
  factor = rs["factor"]
  low, high = rs["low_freq_factor"], rs["high_freq_factor"]
  old_len = rs["original_max_position_embeddings"]
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout.

  Args:
    x: [B, T, N, Dh] queries or keys.
    positions: [B, T] int positions.
    inv_freq: [Dh/2] float32.

  Returns:
    [B, T, N, Dh] in x's dtype (rotation computed in float32).
  """
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq        # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]       # [B, T, 1, Dh]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with rope, optional q/k norm, bias, softcap, window."""

  def __init__(self, config: ModelConfig, *, window: int | None, rngs: nnx.Rngs,
               stack: int | None = None):
    c = config
    pd, self.dtype = jnp.dtype(c.param_dtype), jnp.dtype(c.dtype)
    D, H, KV, Dh = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    std = 0.02
    param = lambda init, shape, names: _param(rngs, init, shape, names, pd, stack)
    self.q = param(_normal(std), (D, H, Dh), ("embed", "heads", "head_dim"))
    self.k = param(_normal(std), (D, KV, Dh), ("embed", "kv_heads", "head_dim"))
    self.v = param(_normal(std), (D, KV, Dh), ("embed", "kv_heads", "head_dim"))
    self.o = param(_normal(std), (H, Dh, D), ("heads", "head_dim", "embed"))
    self.stack = stack    # leading layers axis of every parameter (None: one layer)
    zeros = jax.nn.initializers.zeros
    if c.qkv_bias:
      self.q_bias = param(zeros, (H, Dh), ("heads", "head_dim"))
      self.k_bias = param(zeros, (KV, Dh), ("kv_heads", "head_dim"))
      self.v_bias = param(zeros, (KV, Dh), ("kv_heads", "head_dim"))
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    if c.qk_norm:
      norm = lambda: RMSNorm(Dh, eps=c.norm_eps, offset=c.norm_offset,
                             dtype=self.dtype, param_dtype=pd, rngs=rngs, stack=stack)
      self.q_norm, self.k_norm = norm(), norm()
    else:
      self.q_norm = self.k_norm = None
    self.n_rep = H // KV
    self.scale = (c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None
                  else Dh) ** -0.5
    self.softcap = c.attn_logit_softcap
    self.window = window
    self.implementation = c.attention

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array,
               inv_freq: jax.Array, cache: tuple | None = None,
               segment_ids: jax.Array | None = None, part_ids: jax.Array | None = None):
    """x: [B, T, D]; positions: [B, T]; key_mask: [B, T] bool. Returns [B, T, D].

    segment_ids: [B, T] int >= 0 (packed sequences): no attention across segments.
    part_ids: [B, T] int (with segment_ids): 0 prompt, r response r; a response
      sees its segment's prompt and itself (attention.attention).

    With ``cache = (k [B, S, KV, Dh], v, index [] int32)`` the T new keys and
    values are written at slots index..index+T-1, queries attend to every
    cache slot up to their own, ``key_mask`` is [B, S] over the cache slots,
    and the result is ``([B, T, D], (new_k, new_v))``.
    """
    dt = self.dtype
    q = _project(self, "q", "btd,dhk->bthk", x, "q_proj")
    k = _project(self, "k", "btd,dgk->btgk", x, "k_proj")
    v = _project(self, "v", "btd,dgk->btgk", x, "v_proj")
    if self.q_bias is not None:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    q_offset = 0
    if cache is not None:
      k_cache, v_cache, q_offset = cache
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), q_offset, 1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), q_offset, 1)
    # Without a context axis (or with a cache) context.attention is attention.attention.
    out = context_lib.attention(
        q, k, v, scale=self.scale, softcap=self.softcap, window=self.window,
        key_mask=key_mask, q_offset=q_offset if cache is not None else None,
        q_segment_ids=segment_ids, kv_segment_ids=segment_ids, part_ids=part_ids,
        implementation=self.implementation)                            # [B, T, H, Dh]
    out = _project(self, "o", "bthk,hkd->btd", out, "o_proj")
    if cache is not None:
      return out, (k, v)
    return out


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    pd = jnp.dtype(config.param_dtype)
    D, F = config.d_model, config.d_ff
    self.gate = _param(rngs, _normal(0.02), (D, F), ("embed", "mlp"), pd, stack)
    self.up = _param(rngs, _normal(0.02), (D, F), ("embed", "mlp"), pd, stack)
    self.down = _param(rngs, _normal(0.02), (F, D), ("mlp", "embed"), pd, stack)
    self.stack = stack
    self.activation = config.activation
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    g = _project(self, "gate", "...d,df->...f", x, "mlp_gate")
    u = _project(self, "up", "...d,df->...f", x, "mlp_up")
    return _project(self, "down", "...f,fd->...d", _activation(self.activation)(g) * u,
                    "mlp_down")


def _activation(name: str):
  """The gate nonlinearity of an MLP: silu (SwiGLU) or tanh-approximated gelu (Gemma)."""
  if name == "silu":
    return jax.nn.silu
  return lambda g: jax.nn.gelu(g, approximate=True)


class MoeMLP(nnx.Module):
  """Routed experts (Qwen3-MoE / Mixtral): each token's top-k gated MLPs, weighted.

  router: [D, E]; gate, up: [E, D, F]; down: [E, F, D] (F = moe_d_ff). Dropless:
  tokens are sorted by expert and each expert's group goes through one grouped
  matmul (jaxalign.models.moe.routed_mlp), whatever the load. With a quantized base
  (lora.base_dtype) gate, up and down are quant.QuantizedWeights; the router stays
  float.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    pd = jnp.dtype(config.param_dtype)
    D, E, F = config.d_model, config.n_experts, config.expert_d_ff
    self.router = _param(rngs, _normal(0.02), (D, E), ("embed", None), pd, stack)
    self.gate = _param(rngs, _normal(0.02), (E, D, F), ("expert", "embed", "mlp"), pd, stack)
    self.up = _param(rngs, _normal(0.02), (E, D, F), ("expert", "embed", "mlp"), pd, stack)
    self.down = _param(rngs, _normal(0.02), (E, F, D), ("expert", "mlp", "embed"), pd, stack)
    self.stack = stack
    self.k = config.experts_per_token
    self.norm_topk = config.moe_norm_topk
    self.moe_kernel = config.moe_kernel
    self.capacity_factor = float(config.moe_capacity_factor)
    self.activation = config.activation
    self.dtype = jnp.dtype(config.dtype)

  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [..., D] -> ([..., D], router stats over the tokens where token_mask [...]
    is set (all when None): moe.router_stats)."""
    lead, d = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, d)                                            # [N, D]
    logits = checkpoint_name(jnp.einsum("nd,de->ne", flat, self.router[...].astype(self.dtype),
                                        preferred_element_type=jnp.float32),
                             "router_logits")                          # [N, E] float32
    weights, experts = moe_lib.route(logits, self.k, self.norm_topk)
    # A quantized base's experts go in as codes and scales, dequantized per device
    # inside expert parallelism, right before the grouped matmuls.
    gate, up, down = (w.blocks() if isinstance(w, quant.QuantizedWeight)
                      else w[...].astype(self.dtype) for w in (self.gate, self.up, self.down))
    y = expert_parallel.routed_mlp(
        flat, gate, up, down, weights, experts, _activation(self.activation),
        implementation=self.moe_kernel, capacity_factor=self.capacity_factor)
    mask = None if token_mask is None else token_mask.reshape(-1)
    return y.reshape(*lead, d), moe_lib.router_stats(logits, experts, mask)


class Block(nnx.Module):
  """Pre-norm decoder block; Gemma2's post-norms ("sandwich") when configured."""

  def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs,
               stack: int | None = None):
    """Layer `layer`'s block; with `stack`, G such layers (layer, layer + P, ...) stacked."""
    c = config
    norm = lambda: RMSNorm(c.d_model, eps=c.norm_eps, offset=c.norm_offset,
                           dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                           rngs=rngs, stack=stack)
    self.attn_norm = norm()
    self.attn = Attention(c, window=c.window_of(layer), rngs=rngs, stack=stack)
    self.post_attn_norm = norm() if c.post_norms else None
    self.mlp_norm = norm()
    self.mlp = (MoeMLP if c.is_moe else MLP)(c, rngs=rngs, stack=stack)
    self.post_mlp_norm = norm() if c.post_norms else None

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array,
               inv_freq: jax.Array, cache: tuple | None = None,
               segment_ids: jax.Array | None = None, part_ids: jax.Array | None = None,
               token_mask: jax.Array | None = None, with_stats: bool = False):
    """[B, T, D] -> [B, T, D]; with a cache (see Attention) also the new (k, v).

    with_stats: return (out, router stats) instead, the stats over the tokens
    where token_mask [B, T] is set (moe.router_stats; {} for a dense MLP).
    """
    new_kv = None
    h = self.attn(self.attn_norm(x), positions, key_mask, inv_freq, cache=cache,
                  segment_ids=segment_ids, part_ids=part_ids)
    if cache is not None:
      h, new_kv = h
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    stats = {}
    if isinstance(self.mlp, MoeMLP):
      h, stats = self.mlp(self.mlp_norm(x), token_mask)
    else:
      h = self.mlp(self.mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    out = (x + h, new_kv) if cache is not None else x + h
    return (out, stats) if with_stats else out


def _fold_dropout_keys(module: nnx.Module, layer: jax.Array) -> None:
  """Gives each LoRA adapter of one scanned group its own dropout key per group.

  Stacked adapters share one `index`; folding in the group index keeps their
  dropout masks independent across layers, as unrolled adapters' are.
  """
  for _, m in nnx.iter_modules(module):
    key = getattr(m, "dropout_key", None)
    if key is not None:
      m.dropout_key = nnx.data(jax.random.fold_in(key, layer))


class Embed(nnx.Module):
  """Token embedding table [V, D]."""

  def __init__(self, vocab_size: int, d_model: int, *, stddev: float, param_dtype,
               rngs: nnx.Rngs):
    self.embedding = _param(rngs, _normal(stddev), (vocab_size, d_model),
                            ("vocab", "embed"), param_dtype)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for S slots; slots < index are filled.

  Real tokens of a row are contiguous (left-padded prompt, then generated
  tokens), so a row's rope position is the number of real tokens before it.
  """
  k: jax.Array               # [L, B, S, KV, Dh] compute dtype, layer-major
  v: jax.Array               # [L, B, S, KV, Dh]
  mask: jax.Array            # [B, S] bool: slot holds a real token
  index: jax.Array           # [] int32: next slot to write


class _CountDraws:
  """Stands in for Rngs to count the keys one Block draws (traced, nothing computed)."""

  def __init__(self):
    self.draws = 0

  def params(self):
    self.draws += 1
    return jax.random.key(0)


class _UnrolledOrderKeys:
  """Stands in for Rngs while the stacked Block of period slot `slot` is built: its
  p-th draw is the [groups] keys that layers g * period + slot (g < groups) make as
  their p-th draw in the unrolled layout, which draws layer after layer from
  `stream` starting at count `start`, `per_layer` keys each."""

  def __init__(self, stream, start, *, per_layer: int, period: int, slot: int, groups: int):
    self._key, self._draw = stream.key[...], 0
    self._first = start + (jnp.arange(groups, dtype=jnp.uint32) * period + slot) * per_layer

  def params(self):
    counts = self._first + self._draw
    self._draw += 1
    return jax.vmap(lambda c: jax.random.fold_in(self._key, c))(counts)


class Transformer(nnx.Module):
  """Decoder-only transformer; see the module docstring for the HF mapping."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    pd = jnp.dtype(c.param_dtype)
    self.embed = Embed(c.vocab_size, c.d_model, stddev=1.0 if c.tie_embeddings else 0.02,
                       param_dtype=pd, rngs=rngs)
    if c.scan_layers:
      period, groups, tail = c.scan_groups()
      counter = _CountDraws()
      jax.eval_shape(lambda: Block(c, 0, rngs=counter) and None)
      stream, start = rngs.params, rngs.params.count[...]
      self.layers = nnx.List([
          Block(c, j, stack=groups, rngs=_UnrolledOrderKeys(
              stream, start, per_layer=counter.draws, period=period, slot=j, groups=groups))
          for j in range(period)])
      stream.count[...] = start + groups * period * counter.draws   # as if drawn unrolled
      self.tail = nnx.List([Block(c, groups * period + t, rngs=rngs) for t in range(tail)])
    else:
      self.layers = nnx.List([Block(c, i, rngs=rngs) for i in range(c.n_layers)])
      self.tail = nnx.List([])
    self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, offset=c.norm_offset,
                              dtype=jnp.dtype(c.dtype), param_dtype=pd, rngs=rngs)
    if c.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = _param(rngs, _normal(0.02), (c.d_model, c.vocab_size),
                            ("embed", "vocab"), pd)

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               part_ids: jax.Array | None = None,
               router_stats: dict | None = None) -> jax.Array:
    """Hidden states after the final norm.

    Args:
      tokens: [B, T] int token ids.
      attention_mask: [B, T] bool/int, 1 for real tokens (left or right padding).
      positions: [B, T] int rope positions; default cumsum(attention_mask) - 1,
        clipped at 0, so a sequence's first real token is position 0.
      segment_ids: [B, T] int >= 0: tokens attend only within their segment
        (packed sequences; give their positions too). None: one segment per row.
      part_ids: [B, T] int, with segment_ids (packed shared prompts): 0 on a
        segment's prompt, r > 0 on its response r, which attends to the prompt
        and to itself only.
      router_stats: when a dict and the model has experts, filled with the
        router statistics of this forward, summed over the layers and the real
        tokens (attention_mask set): jaxalign.models.moe.router_stats' keys,
        for moe.router_losses. A dense model leaves it empty.

    Returns:
      [B, T, D] in the compute dtype. Rows at padding positions are finite but
      meaningless.
    """
    key_mask = attention_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(key_mask.astype(jnp.int32), axis=-1) - 1, 0)
    # Context parallelism: the sequence in the load-balanced order between here and
    # the output (context.balance; a no-op without a context axis).
    balance = lambda x: None if x is None else context_lib.balance(x)
    tokens, key_mask, positions = balance(tokens), balance(key_mask), balance(positions)
    segment_ids, part_ids = balance(segment_ids), balance(part_ids)
    x = context_lib.constrain_sequence(self._embed(tokens))            # [B, T, D]
    x, _, stats = self._run_layers(x, positions, key_mask, segment_ids=segment_ids,
                                   part_ids=part_ids, token_mask=key_mask)
    if router_stats is not None:
      router_stats.update(stats)
    x = context_lib.constrain_sequence(self.final_norm(x))
    return context_lib.constrain_sequence(context_lib.unbalance(x))

  def _run_layers(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array, *,
                  segment_ids: jax.Array | None = None,
                  part_ids: jax.Array | None = None,
                  cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                  token_mask: jax.Array | None = None):
    """Every block in order: a lax.scan over the stacked groups, then the tail.

    Args:
      x: [B, T, D]; positions: [B, T]; key_mask: [B, T] (or [B, S] with a cache).
      cache: (k [L, B, S, KV, Dh], v, index) to decode with (no remat then).
      token_mask: [B, T] the real tokens of x, over which the router statistics
        are summed (None: all).

    Returns:
      (x [B, T, D], (new_k, new_v) [L, B, S, KV, Dh] or None, router stats summed
      over the layers: {} for a dense model).
    """
    c = self.config
    policy = None if cache is not None else c.remat
    inv_freqs = self._layer_inv_freqs()

    def run_block(block, x, inv_freq, kv):
      """(x, kv or None, router stats) after one block."""
      if kv is None:
        x, stats = block(x, positions, key_mask, inv_freq, segment_ids=segment_ids,
                         part_ids=part_ids, token_mask=token_mask, with_stats=True)
        return x, None, stats
      (x, kv), stats = block(x, positions, key_mask, inv_freq, cache=(*kv, cache[2]),
                             token_mask=token_mask, with_stats=True)
      return x, kv, stats

    def checkpointed(fn):
      if policy in (None, "none"):
        return fn
      # prevent_cse=False is safe inside lax.scan (what jax recommends there).
      return jax.checkpoint(fn, policy=remat_policy(policy, moe=c.is_moe),
                            prevent_cse=not c.scan_layers)

    new_k, new_v, all_stats = [], [], []
    def unrolled(block, i, x):
      """Layer i as its own block (rematerialized alone)."""
      graphdef_i, state_i = nnx.split(block)
      kv = None if cache is None else (cache[0][i], cache[1][i])
      run = checkpointed(lambda state, x, kv: run_block(nnx.merge(graphdef_i, state), x,
                                                         inv_freqs[i], kv))
      x, kv, stats = run(state_i, x, kv)
      all_stats.append(stats)
      if kv is not None:
        new_k.append(kv[0][None])
        new_v.append(kv[1][None])
      return x

    if not c.scan_layers:
      for i, block in enumerate(self.layers):
        x = unrolled(block, i, x)
      return (x, (None if cache is None else (jnp.concatenate(new_k), jnp.concatenate(new_v))),
              moe_lib.add_stats(*all_stats))

    period, groups, tail = c.scan_groups()
    graphdef, stacked, rest = nnx.split(self.layers, nnx.Param, ...)

    def group(stacked_g, x, g, kv_g):
      blocks = nnx.merge(graphdef, stacked_g, rest)
      _fold_dropout_keys(blocks, g)
      out_k, out_v, stats = [], [], []
      for j, block in enumerate(blocks):
        x, kv, stats_j = run_block(block, x, inv_freqs[j], None if kv_g is None
                                   else (kv_g[0][j], kv_g[1][j]))
        stats.append(stats_j)
        if kv is not None:
          out_k.append(kv[0])
          out_v.append(kv[1])
      return x, ((None if kv_g is None else (jnp.stack(out_k), jnp.stack(out_v))),
                 moe_lib.add_stats(*stats))

    group = checkpointed(group)

    def body(x, xs):
      stacked_g, g, kv_g = xs
      return group(stacked_g, x, g, kv_g)

    kv_groups = None
    if cache is not None:
      shape = (groups, period) + cache[0].shape[1:]
      kv_groups = (cache[0][:groups * period].reshape(shape),
                   cache[1][:groups * period].reshape(shape))
    stages = c.remat_stages
    if stages > 1 and cache is None and policy != "none":
      if groups % stages:
        raise ValueError(f"remat_stages={stages} does not divide the {groups} scanned "
                         "layer groups")
      # Nested remat: an outer scan over checkpointed stages of groups // stages groups.
      staged = jax.tree.map(lambda a: a.reshape(stages, groups // stages, *a.shape[1:]),
                            (stacked, jnp.arange(groups)))
      def stage(x, xs):
        x, (_, stats) = jax.lax.scan(lambda x, xs_g: body(x, (*xs_g, None)), x, xs)
        return x, jax.tree.map(lambda a: a.sum(axis=0), stats)
      x, group_stats = jax.lax.scan(jax.checkpoint(stage, prevent_cse=False), x, staged)
      kv_out = None
    else:
      x, (kv_out, group_stats) = jax.lax.scan(body, x,
                                              (stacked, jnp.arange(groups), kv_groups))
    all_stats.append(jax.tree.map(lambda a: a.sum(axis=0), group_stats))
    if kv_out is not None:
      new_k.append(kv_out[0].reshape((groups * period,) + cache[0].shape[1:]))
      new_v.append(kv_out[1].reshape((groups * period,) + cache[1].shape[1:]))
    for t, block in enumerate(self.tail):
      x = unrolled(block, groups * period + t, x)
    stats = moe_lib.add_stats(*all_stats)
    if cache is None:
      return x, None, stats
    if len(new_k) == 1:
      return x, (new_k[0], new_v[0]), stats
    return x, (jnp.concatenate(new_k), jnp.concatenate(new_v)), stats

  def _embed(self, tokens: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, T, D] embeddings in the compute dtype."""
    c = self.config
    dt = jnp.dtype(c.dtype)
    x = self.embed.embedding[...][tokens].astype(dt)
    if c.embed_scale:
      # HF Gemma rounds the normalizer to the activation dtype first.
      x = x * jnp.asarray(c.d_model ** 0.5, dtype=dt)
    return x

  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty KVCache of `length` slots for `batch` rows."""
    c = self.config
    shape = (c.n_layers, batch, length, c.n_kv_heads, c.head_dim)
    return KVCache(k=jnp.zeros(shape, jnp.dtype(c.dtype)), v=jnp.zeros(shape, jnp.dtype(c.dtype)),
                   mask=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

  def _layer_inv_freqs(self) -> list[jax.Array]:
    """Each layer's rope inverse frequencies (sliding layers may have their own)."""
    c = self.config
    inv_freq, local = rope_inv_freq(c), rope_inv_freq(c, local=True)
    return [local if c.window_of(i) is not None else inv_freq for i in range(c.n_layers)]

  def decode(self, tokens: jax.Array, attention_mask: jax.Array,
             cache: KVCache, router_stats: dict | None = None) -> tuple[jax.Array, KVCache]:
    """Appends T tokens to `cache` and returns their hidden states (inference only).

    Prefill is one call with the left-padded prompts on an empty cache; each
    decode step is a call with T = 1. The hidden states equal `__call__`'s on
    the whole sequence so far (up to float rounding).

    Args:
      tokens: [B, T] int ids, written at cache slots index..index+T-1.
      attention_mask: [B, T] bool/int, 1 for real tokens. Padding may only
        come before a row's first real token (left padding).
      cache: from `init_cache` or a previous `decode`; needs index + T <= S.
      router_stats: when a dict, filled as `__call__`'s, over the T new tokens
        where attention_mask is set.

    Returns:
      hidden: [B, T, D] after the final norm.
      cache: with the new keys and values, index advanced by T.
    """
    new_mask = attention_mask.astype(bool)
    seen = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]      # [B, 1]
    positions = jnp.maximum(seen + jnp.cumsum(new_mask.astype(jnp.int32), axis=-1) - 1, 0)
    key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, new_mask, cache.index, 1)
    x = self._embed(tokens)                                            # [B, T, D]
    x, (new_k, new_v), stats = self._run_layers(x, positions, key_mask,
                                                cache=(cache.k, cache.v, cache.index),
                                                token_mask=new_mask)
    if router_stats is not None:
      router_stats.update(stats)
    cache = KVCache(k=new_k, v=new_v, mask=key_mask, index=cache.index + tokens.shape[1])
    return self.final_norm(x), cache

  def next_token_logits(self, hidden: jax.Array) -> jax.Array:
    """[B, D] hidden -> [B, V] float32 logits, final softcap applied.

    Contracts with the tied embedding as stored ([V, D]), so a decode loop
    does not transpose (copy) the table at every step as `head_weight()` would.
    """
    if self.lm_head is None:
      w, eq = self.embed.embedding[...], "bd,vd->bv"
    else:
      w, eq = self.lm_head[...], "bd,dv->bv"
    logits = jnp.einsum(eq, hidden, w.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return _softcap(logits, self.config.final_logit_softcap)

  def head_weight(self) -> jax.Array:
    """[D, V] output projection (the embedding transposed when tied)."""
    if self.lm_head is None:
      return self.embed.embedding[...].T
    return self.lm_head[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, V] float32 logits, final softcap applied.

    Materializes full logits: for tests and small vocabularies only; training
    uses jaxalign.logprobs.
    """
    w = self.head_weight().astype(hidden.dtype)
    logits = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
    return _softcap(logits, self.config.final_logit_softcap)


def init_model(config: ModelConfig, seed: int) -> Transformer:
  """A randomly initialized Transformer (sharded if built under a mesh + rules)."""
  return Transformer(config, rngs=nnx.Rngs(params=seed))


def partition_specs(config: ModelConfig, rules) -> Any:
  """Each parameter's PartitionSpec under logical-axis `rules`, from an abstract model
  (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  with nnx.logical_axis_rules(tuple(rules)):
    return nnx.get_partition_spec(nnx.state(abstract, nnx.Param))


def _layer_slots(config: ModelConfig) -> list[tuple[str, int, int | None]]:
  """Where layer i lives in the scanned layout: (list name, entry, stacked index)."""
  period, groups, tail = config.scan_groups()
  slots = [("layers", i % period, i // period) for i in range(groups * period)]
  return slots + [("tail", t, None) for t in range(tail)]


def stack_layers(config: ModelConfig, tree: dict) -> dict:
  """Unrolled params (a pure dict, `nnx.to_pure_dict`) -> the scanned layout's.

  Anything under a layer (base weights, LoRA adapters) moves with it; other
  entries are kept. `config.scan_layers` itself is not read.
  """
  period, groups, tail = config.scan_groups()
  layers = tree["layers"]
  out = {k: v for k, v in tree.items() if k not in ("layers", "tail")}
  out["layers"] = {j: jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[layers[g * period + j] for g in range(groups)])
                   for j in range(period)}
  if tail:   # (an empty list has no entry in a pure dict)
    out["tail"] = {t: layers[groups * period + t] for t in range(tail)}
  return out


def unstack_layers(config: ModelConfig, tree: dict) -> dict:
  """The inverse of `stack_layers`: scanned params -> one entry per layer."""
  out = {k: v for k, v in tree.items() if k not in ("layers", "tail")}
  layers = {}
  for i, (name, entry, index) in enumerate(_layer_slots(config)):
    sub = tree[name][entry]
    layers[i] = sub if index is None else jax.tree.map(lambda x, g=index: x[g], sub)
  out["layers"] = layers
  return out


def convert_layout(model: Transformer, *, scan_layers: bool) -> Transformer:
  """The same model in the scanned or the unrolled layout (base parameters only:
  LoRA adapters are left out; move them with `stack_layers` on a pure dict)."""
  config = dataclasses.replace(model.config, scan_layers=scan_layers)
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  tree = nnx.to_pure_dict(nnx.state(model, base))
  if model.config.scan_layers:
    tree = unstack_layers(model.config, tree)
  if scan_layers:
    tree = stack_layers(config, tree)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graphdef, state)
