"""The Hugging Face model families jaxalign imports and exports: one row each.

A row holds everything that differs between families: config.json's names, the
ModelConfig switches the family fixes, which optional features it can express
and how its config.json spells them. `hf_config` maps config.json <-> ModelConfig
by these rows alone; `hf` maps tensors by the ModelConfig switches alone (every
family here uses the Llama tensor names, with Gemma's sandwich-norm names where
post_norms is set), so adding a family with those names is one row of FAMILIES.
Mixture-of-experts families (ModelConfig.n_experts > 0) add an `Experts` entry:
how their config.json and checkpoints spell the routed experts.

Gemma3 is the text model (Gemma3ForCausalLM), where local and global layers
share one rope or the local ones use their own unscaled base.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxalign.models.transformer import ModelConfig

# ModelConfig switches each family fixes: set on import, required on export.
SWITCHES = ("qkv_bias", "qk_norm", "norm_offset", "embed_scale", "post_norms")
# Optional ModelConfig fields (None: off) a family may express (Family.options).
OPTIONS = ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
           "local_rope_theta", "sliding_window")


@dataclasses.dataclass(frozen=True)
class Experts:
  """How one mixture-of-experts family spells its routed experts.

  Expert j of layer i is model.layers.i.<block>.experts.j.<gate|up|down>.weight
  ([F, D], [F, D], [D, F]) and the router model.layers.i.<block>.gate.weight
  [E, D] on the hub and in what transformers' save_pretrained writes (which
  transformers 5 fuses on load into mlp.experts.gate_up_proj [E, 2F, D] and
  mlp.experts.down_proj [E, D, F]: the fused form a checkpoint saved with
  save_original_format=False holds).

  Attributes:
    count_key: config.json key of the number of experts.
    block: the MoE module's name under model.layers.i.
    gate, up, down: the per-expert projection names.
    dense_size_key: config.json key of the expert hidden size when the family
      keeps a separate one (Qwen3-MoE's moe_intermediate_size, intermediate_size
      being its dense MLP's); None: intermediate_size is the experts' size.
    norm_topk_key: config.json key of "renormalize the top-k probabilities" and
      its default; None: the family always renormalizes (Mixtral's softmax over
      the top-k logits is that function).
  """
  count_key: str
  block: str
  gate: str
  up: str
  down: str
  dense_size_key: str | None = None
  norm_topk_key: tuple[str, bool] | None = None


def _no_keys(config: ModelConfig) -> dict[str, Any]:
  del config
  return {}


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF causal-LM architecture.

  Attributes:
    architecture: config.json "architectures"[0].
    model_type: config.json "model_type" (finds the family when "architectures" is absent).
    tie_embeddings: tie_word_embeddings when config.json leaves it out.
    qkv_bias, qk_norm, norm_offset, embed_scale, post_norms: the SWITCHES'
      values. qkv_bias is also HF's attention_bias (q/k/v biases, no o bias).
    activation: the MLP activation export writes (import reads what config.json says).
    activation_key: the config.json key of the activation; import falls back
      to "hidden_act".
    options: the OPTIONS this family expresses; any other must be None on export
      and is not read on import.
    sliding_period: with "sliding_window" in options, per-layer windows
      (config.json "layer_types"; without it every sliding_period-th layer is
      full, the rest slide, or config.json's "sliding_window_pattern"); None:
      one window on every layer.
    refused: config.json booleans this family has and the Transformer lacks.
    extra: config.json keys export adds for this family's loaders.
    experts: a mixture-of-experts family's expert spelling (its ModelConfig has
      n_experts > 0); None: a dense family (n_experts == 0).
  """
  architecture: str
  model_type: str
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_offset: bool = False
  embed_scale: bool = False
  post_norms: bool = False
  activation: str = "silu"
  activation_key: str = "hidden_act"
  options: tuple[str, ...] = ()
  sliding_period: int | None = None
  refused: tuple[str, ...] = ()
  extra: Callable[[ModelConfig], dict[str, Any]] = _no_keys
  experts: Experts | None = None

  def __post_init__(self):
    unknown = sorted(set(self.options) - set(OPTIONS))
    if unknown:
      raise ValueError(f"{self.architecture}: unknown options {unknown}; have {OPTIONS}")


_GEMMA_OPTIONS = ("query_pre_attn_scalar", "final_logit_softcap", "sliding_window")

FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    Family("LlamaForCausalLM", "llama",  # incl. Llama 3.1's "llama3" rope scaling
           extra=lambda c: {"mlp_bias": False, "pretraining_tp": 1}),
    Family("MistralForCausalLM", "mistral", options=("sliding_window",)),
    Family("Qwen2ForCausalLM", "qwen2", qkv_bias=True, refused=("use_sliding_window",),
           extra=lambda c: {"use_sliding_window": False, "sliding_window": None,
                            "max_window_layers": c.n_layers}),
    Family("Qwen3ForCausalLM", "qwen3", qk_norm=True, refused=("use_sliding_window",),
           extra=lambda c: {"use_sliding_window": False, "sliding_window": None,
                            "max_window_layers": c.n_layers}),
    Family("Gemma2ForCausalLM", "gemma2", tie_embeddings=True, norm_offset=True,
           embed_scale=True, post_norms=True, activation="gelu_tanh",
           activation_key="hidden_activation", sliding_period=2,
           options=(*_GEMMA_OPTIONS, "attn_logit_softcap")),
    # transformers' Gemma3 has attn_logit_softcapping but never applies it (released
    # configs set it null): no attn_logit_softcap, to match the reference, not the key.
    Family("Gemma3ForCausalLM", "gemma3_text", tie_embeddings=True, qk_norm=True,
           norm_offset=True, embed_scale=True, post_norms=True, activation="gelu_tanh",
           activation_key="hidden_activation", sliding_period=6,
           options=(*_GEMMA_OPTIONS, "local_rope_theta"),
           extra=lambda c: {"attn_logit_softcapping": None}),
    # Every layer sparse: decoder_sparse_step 1 and no mlp_only_layers (hf_config).
    Family("Qwen3MoeForCausalLM", "qwen3_moe", qk_norm=True, refused=("use_sliding_window",),
           experts=Experts("num_experts", "mlp", "gate_proj", "up_proj", "down_proj",
                           dense_size_key="moe_intermediate_size",
                           norm_topk_key=("norm_topk_prob", False)),
           extra=lambda c: {"use_sliding_window": False, "sliding_window": None,
                            "max_window_layers": c.n_layers, "decoder_sparse_step": 1,
                            "mlp_only_layers": []}),
    # router_jitter_noise: training-time input noise the Transformer lacks.
    Family("MixtralForCausalLM", "mixtral", options=("sliding_window",),
           refused=("router_jitter_noise",),
           experts=Experts("num_local_experts", "block_sparse_moe", "w1", "w3", "w2"),
           extra=lambda c: {"router_jitter_noise": 0.0}),
)}


def family(architecture: str) -> Family:
  """The row of `architecture`.

  Raises:
    ValueError naming `architecture` and the supported ones.
  """
  if architecture not in FAMILIES:
    raise ValueError(f"unsupported architecture {architecture!r}; "
                     f"supported: {sorted(FAMILIES)}")
  return FAMILIES[architecture]


def expressing(option: str) -> list[str]:
  """The architectures whose rows list `option` (for error messages)."""
  return [f.architecture for f in FAMILIES.values() if option in f.options]
