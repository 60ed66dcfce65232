"""config.json <-> ModelConfig for the families of `families.FAMILIES`.

Import (`config_from_hf`) refuses what the Transformer lacks; export
(`config_to_hf`) writes a config.json that transformers (4.x and 5.x) and vLLM
load, and refuses a ModelConfig the named family cannot express. Everything
family-specific comes from the family's row.

  model_cfg = config_from_hf(read_config("path/to/Llama-3.1-8B"))
  json.dump(config_to_hf(model_cfg, infer_architecture(model_cfg)), f)
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxalign.models.families import FAMILIES, OPTIONS, SWITCHES, Family, expressing, family
from jaxalign.models.transformer import ModelConfig

# config.json activation name -> ModelConfig.activation, and the name export writes.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh"}
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
# config.json keys of the options that are one number.
_NUMBER_KEYS = {"query_pre_attn_scalar": "query_pre_attn_scalar",
                "attn_logit_softcap": "attn_logit_softcapping",
                "final_logit_softcap": "final_logit_softcapping"}
# config.json booleans no family's Transformer has (attention_bias: only as q/k/v biases).
_REFUSED = ("mlp_bias", "use_bidirectional_attention")
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def _unsupported(arch: str, feature: str) -> ValueError:
  return ValueError(f"{arch}: unsupported: {feature}")


def read_config(path: str) -> dict[str, Any]:
  """config.json of the checkpoint directory `path`."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{path} has no config.json")
  with open(config_path) as f:
    return json.load(f)


def architecture_of(hf_config: dict[str, Any]) -> str:
  """The FAMILIES architecture of a config.json dict ("architectures", else "model_type").

  Raises:
    ValueError naming the architecture when it is not one of FAMILIES.
  """
  archs = hf_config.get("architectures") or []
  if archs:
    return family(archs[0]).architecture
  model_type = hf_config.get("model_type")
  by_type = {f.model_type: a for a, f in FAMILIES.items()}
  return family(by_type.get(model_type, f"model_type={model_type!r}")).architecture


# ---------------------------------------------------------------------------
# config.json -> ModelConfig


def _scaling(arch: str, scaling: dict[str, Any] | None) -> dict[str, Any] | None:
  """ModelConfig.rope_scaling from an HF rope dict (None for the default rope)."""
  if scaling is None:
    return None
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return None
  if kind == "linear":
    return {"rope_type": "linear", "factor": float(scaling["factor"])}
  if kind != "llama3":
    raise _unsupported(arch, f"rope_type={kind!r} (have 'default', 'linear' and 'llama3')")
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in keys if k not in scaling]
  if missing:
    raise ValueError(f"{arch}: rope_scaling 'llama3' lacks {missing}")
  return {k: (int(scaling[k]) if k.startswith("original") else float(scaling[k]))
          for k in keys}


def _rope(fam: Family, hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float | None]:
  """(rope_theta, rope_scaling, local_rope_theta) from legacy keys or
  transformers>=5 `rope_parameters` (per layer type for Gemma3)."""
  arch = fam.architecture
  params = hf.get("rope_parameters")
  default_theta = float(hf.get("rope_theta", 10000.0))
  if params is not None and ("full_attention" in params or "sliding_attention" in params):
    full = params.get("full_attention") or {}
    local = params.get("sliding_attention") or {}
    if _scaling(arch, local) is not None:
      raise _unsupported(arch, f"a scaled rope on the sliding layers ({local})")
    theta = float(full.get("rope_theta", default_theta))
    return (theta, _scaling(arch, full),
            float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))))
  if params is None:
    theta, scaling = default_theta, hf.get("rope_scaling")
  else:
    theta, scaling = float(params.get("rope_theta", default_theta)), params
  local_theta = None
  if "local_rope_theta" in fam.options:  # sliding layers: own base, never scaled
    local_theta = float(hf.get("rope_local_base_freq", 10000.0))
  return theta, _scaling(arch, scaling), local_theta


def _layer_types(fam: Family, hf: dict[str, Any], n_layers: int) -> tuple[str, ...] | None:
  """Per-layer "full" | "sliding" from config.json, or the family's default period."""
  types = hf.get("layer_types")
  if types is None:
    if fam.sliding_period is None:
      return None
    period = int(hf.get("sliding_window_pattern",
                        hf.get("_sliding_window_pattern", fam.sliding_period)))
    types = ["sliding_attention" if (i + 1) % period else "full_attention"
             for i in range(n_layers)]
  bad = sorted(set(types) - set(_LAYER_TYPES))
  if bad:
    raise _unsupported(fam.architecture, f"layer types {bad}")
  return tuple(_LAYER_TYPES[t] for t in types)


def _sliding_from_hf(fam: Family, hf: dict[str, Any],
             n_layers: int) -> tuple[int | None, tuple[str, ...] | None]:
  """(sliding_window, layer_types) of the ModelConfig."""
  arch = fam.architecture
  types = _layer_types(fam, hf, n_layers)
  if "sliding_window" not in fam.options:
    if types is not None and "sliding" in types:
      raise _unsupported(arch, "sliding-window layers")
    return None, None
  window = hf.get("sliding_window")
  window = None if window is None else int(window)
  if fam.sliding_period is None:  # one window on every layer
    return window, None
  if window is None:
    if "sliding" in types:
      raise ValueError(f"{arch}: sliding layers but sliding_window is null")
    return None, None
  return window, types


def _activation(fam: Family, hf: dict[str, Any]) -> str:
  """ModelConfig.activation of config.json (the family's key, else hidden_act)."""
  act_name = hf.get(fam.activation_key) or hf.get("hidden_act", "silu")
  if act_name not in _ACTIVATIONS:
    raise _unsupported(fam.architecture, f"activation {act_name!r}")
  return _ACTIVATIONS[act_name]


def _refuse(fam: Family, hf: dict[str, Any]) -> None:
  """Raises on config.json switches the Transformer lacks."""
  for key in (*_REFUSED, *fam.refused):
    if hf.get(key):
      raise _unsupported(fam.architecture, f"{key}={hf[key]!r}")
  if hf.get("attention_bias") and not fam.qkv_bias:
    raise _unsupported(fam.architecture, "attention_bias=True (o_proj bias)")


def _experts_from_hf(fam: Family, hf: dict[str, Any], n_layers: int) -> dict[str, Any]:
  """The ModelConfig mixture-of-experts fields of config.json ({} for a dense family).

  Every layer must be sparse (Qwen3-MoE's decoder_sparse_step 1, no
  mlp_only_layers): the Transformer has no dense layers beside sparse ones. The
  load-balancing coefficient is router_aux_loss_coef where output_router_logits
  is true, else 0: TRL's rule (its trainers add the aux loss only then).
  """
  ex, arch = fam.experts, fam.architecture
  if ex is None:
    return {}
  # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts.
  count = next((hf[k] for k in (ex.count_key, "num_local_experts", "num_experts")
                if hf.get(k) is not None), None)
  if count is None or int(count) <= 0:
    raise _unsupported(arch, f"{ex.count_key}={count!r} (want >= 1 routed experts)")
  n, k = int(count), int(hf.get("num_experts_per_tok", 2))
  if not 1 <= k <= n:
    raise ValueError(f"{arch}: num_experts_per_tok={k} is not in [1, {ex.count_key}={n}]")
  step = int(hf.get("decoder_sparse_step") or 1)
  mlp_only = sorted(int(i) for i in (hf.get("mlp_only_layers") or ()))
  dense = [i for i in range(n_layers) if i in mlp_only or (i + 1) % step]
  if dense:
    raise _unsupported(arch, f"dense MLP layers {dense} (decoder_sparse_step={step}, "
                       f"mlp_only_layers={mlp_only}); the Transformer's MoE layers are "
                       "all sparse")
  norm_topk = True
  if ex.norm_topk_key is not None:
    key, default = ex.norm_topk_key
    norm_topk = bool(hf.get(key, default))
  aux = float(hf.get("router_aux_loss_coef") or 0.0) if hf.get("output_router_logits") else 0.0
  return {"n_experts": n, "experts_per_token": k, "moe_norm_topk": norm_topk,
          "moe_d_ff": (int(hf[ex.dense_size_key]) if ex.dense_size_key else None),
          "router_aux_loss_coef": aux, "router_z_loss_coef": 0.0}


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
  """A float32 ModelConfig from a transformers config.json dict.

  Raises:
    ValueError naming the architecture or the feature when it is not one of
    FAMILIES or uses something the Transformer lacks (e.g. o_proj/MLP
    biases; rope types other than "default"/"linear"/"llama3"; Qwen sliding
    windows; dense layers among Qwen3-MoE's sparse ones; Mixtral's router jitter).
  """
  hf = hf_config
  fam = family(architecture_of(hf))
  activation = _activation(fam, hf)
  _refuse(fam, hf)
  H = int(hf["num_attention_heads"])
  D = int(hf["hidden_size"])
  L = int(hf["num_hidden_layers"])
  theta, scaling, local_theta = _rope(fam, hf)
  sliding_window, layer_types = _sliding_from_hf(fam, hf, L)
  numbers = {field: (float(hf[key]) if field in fam.options and hf.get(key) is not None
                     else None) for field, key in _NUMBER_KEYS.items()}
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      d_model=D,
      n_layers=L,
      n_heads=H,
      n_kv_heads=int(hf.get("num_key_value_heads") or H),
      head_dim=int(hf.get("head_dim") or D // H),
      d_ff=int(hf["intermediate_size"]),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)),
      rope_theta=theta,
      rope_scaling=scaling,
      local_rope_theta=local_theta,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", fam.tie_embeddings)),
      activation=activation,
      sliding_window=sliding_window,
      layer_types=layer_types,
      **{k: getattr(fam, k) for k in SWITCHES},
      **numbers,
      **_experts_from_hf(fam, hf, L),
  )


# ---------------------------------------------------------------------------
# ModelConfig -> config.json


def _switch_problems(fam: Family, c: ModelConfig) -> list[str]:
  """The switches (and activation) of `c` that `fam` has otherwise: other weights."""
  out = [f"{fam.architecture} cannot express ModelConfig.{key}={getattr(c, key)!r} "
         f"(it has {getattr(fam, key)!r})"
         for key in (*SWITCHES, "activation") if getattr(c, key) != getattr(fam, key)]
  if (c.n_experts > 0) != (fam.experts is not None):
    out.append(f"{fam.architecture} cannot express ModelConfig.n_experts={c.n_experts} "
               f"({'routed experts' if fam.experts else 'a dense MLP'} in every layer)")
  return out


def _option_problems(fam: Family, c: ModelConfig) -> list[str]:
  """The options of `c` that `fam` cannot write into its config.json."""
  arch = fam.architecture
  out = [f"{arch} cannot express ModelConfig.{key}={getattr(c, key)!r} "
         f"(only {', '.join(expressing(key))} can)"
         for key in OPTIONS if key not in fam.options and getattr(c, key) is not None]
  if "local_rope_theta" in fam.options and c.rope_scaling is not None and (
      c.local_rope_theta is None):
    out.append(f"{arch} scales only the full-attention layers' rope; set "
               "ModelConfig.local_rope_theta")
  if (fam.sliding_period is None and c.layer_types is not None
      and len(set(c.layer_types)) > 1):
    out.append(f"{arch} cannot express mixed layer_types={c.layer_types}")
  ex = fam.experts
  if ex is not None and c.n_experts > 0:
    if ex.norm_topk_key is None and not c.moe_norm_topk:
      out.append(f"{arch} cannot express ModelConfig.moe_norm_topk=False (it always "
                 "renormalizes the top-k probabilities)")
  return out


def infer_architecture(config: ModelConfig) -> str:
  """The first of FAMILIES that expresses `config` (for export). Where none does
  (for error messages): the first with the fewest other switches, then options,
  among the mixture-of-experts families when `config` has experts (else the dense)."""
  return min(FAMILIES.values(), key=lambda fam: (
      (fam.experts is None) == (config.n_experts > 0),
      len(_switch_problems(fam, config)), len(_option_problems(fam, config)))).architecture


def _int_if_integral(x: float) -> float | int:
  return int(x) if float(x).is_integer() else x


def _options_to_hf(fam: Family, c: ModelConfig) -> dict[str, Any]:
  """config.json keys of the family's number and rope options (set or not: its
  loaders want them)."""
  out: dict[str, Any] = {key: getattr(c, field) for field, key in _NUMBER_KEYS.items()
                         if field in fam.options}
  if "query_pre_attn_scalar" in fam.options:  # None: scale by head_dim, written out
    # transformers validates an int; every released Gemma has an integral one.
    out["query_pre_attn_scalar"] = _int_if_integral(
        c.head_dim if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar)
  if "local_rope_theta" in fam.options:
    out["rope_local_base_freq"] = (c.rope_theta if c.local_rope_theta is None
                                   else c.local_rope_theta)
  return out


def _sliding_to_hf(fam: Family, c: ModelConfig) -> dict[str, Any]:
  """sliding_window (and per-layer families' layer_types) of config.json."""
  if "sliding_window" not in fam.options:
    return {}
  if fam.sliding_period is None:  # one window on every layer
    return {"sliding_window": c.sliding_window}
  if c.sliding_window is None:
    types = ("full",) * c.n_layers
  else:
    types = c.layer_types or ("sliding",) * c.n_layers
  # Unused by all-full models, but transformers wants a number.
  return {"sliding_window": c.sliding_window or c.max_seq_len,
          "layer_types": [f"{t}_attention" for t in types]}


def _experts_to_hf(fam: Family, c: ModelConfig) -> dict[str, Any]:
  """config.json's mixture-of-experts keys ({} for a dense family). The router
  z-loss coefficient has no key (training-only, like the aux coefficient, which
  is written with output_router_logits set where it is nonzero, TRL's switch)."""
  ex = fam.experts
  if ex is None:
    return {}
  f = c.expert_d_ff
  out = {ex.count_key: c.n_experts, "num_experts_per_tok": c.experts_per_token,
         "router_aux_loss_coef": c.router_aux_loss_coef,
         "output_router_logits": c.router_aux_loss_coef > 0}
  if ex.dense_size_key is None:
    out["intermediate_size"] = f
  else:
    out[ex.dense_size_key] = f
  if ex.norm_topk_key is not None:
    out[ex.norm_topk_key[0]] = c.moe_norm_topk
  return out


def config_to_hf(config: ModelConfig, architecture: str) -> dict[str, Any]:
  """A config.json dict that transformers (4.x and 5.x) and vLLM load as `config`.

  Raises:
    ValueError naming the switch when `architecture` cannot express `config`
    (e.g. qkv_bias as Llama, a mixed sliding pattern as Mistral).
  """
  c, fam = config, family(architecture)
  problems = _switch_problems(fam, c) + _option_problems(fam, c)
  if problems:
    fit = infer_architecture(c)
    raise ValueError(problems[0] + (f"; try {fit}" if fit != architecture else ""))
  return {
      "architectures": [fam.architecture],
      "model_type": fam.model_type,
      "vocab_size": c.vocab_size,
      "hidden_size": c.d_model,
      "intermediate_size": c.d_ff,
      "num_hidden_layers": c.n_layers,
      "num_attention_heads": c.n_heads,
      "num_key_value_heads": c.n_kv_heads,
      "head_dim": c.head_dim,
      "max_position_embeddings": c.max_seq_len,
      "rms_norm_eps": c.norm_eps,
      "tie_word_embeddings": c.tie_embeddings,
      "rope_theta": c.rope_theta,
      "rope_scaling": (None if c.rope_scaling is None
                       else {"rope_type": "llama3", **c.rope_scaling}),
      "attention_dropout": 0.0,
      "torch_dtype": str(np.dtype(c.param_dtype)),
      "use_cache": True,
      fam.activation_key: _HF_ACTIVATIONS[c.activation],
      "attention_bias": fam.qkv_bias,
      **_options_to_hf(fam, c),
      **_sliding_to_hf(fam, c),
      **fam.extra(c),
      **_experts_to_hf(fam, c),
  }
