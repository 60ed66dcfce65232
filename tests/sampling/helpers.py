"""Tiny models and independent reference decoders (full recompute, no KV cache) for
the sampling tests."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.data import tokenize
from jaxalign.models import transformer

LLAMA = transformer.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4,
                                n_kv_heads=2, head_dim=8, d_ff=64)
# Every Gemma2 switch, a window shorter than the sequences, alternating layers.
GEMMA = transformer.ModelConfig(
    vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
    tie_embeddings=True, norm_offset=True, embed_scale=True, post_norms=True,
    activation="gelu_tanh", query_pre_attn_scalar=8.0, attn_logit_softcap=10.0,
    final_logit_softcap=30.0, sliding_window=3, layer_types=("sliding", "full"))
# Gemma3: q/k norm, sliding layers with their own rope base, linear scaling on full ones.
GEMMA3 = dataclasses.replace(
    GEMMA, qk_norm=True, attn_logit_softcap=None, rope_theta=1e6, local_rope_theta=1e4,
    rope_scaling={"rope_type": "linear", "factor": 8.0})
# Qwen3-style q/k norm plus Qwen2 biases, Mistral-style window on every layer.
QWEN = transformer.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4,
                               n_kv_heads=1, head_dim=8, d_ff=64, qk_norm=True,
                               qkv_bias=True, sliding_window=4)


def make_model(config: transformer.ModelConfig, *, seed: int = 0,
               scale: float = 4.0) -> transformer.Transformer:
  """A random model whose weights are scaled up so its logits are peaked.

  At the default init (std 0.02) next-token logits are nearly uniform and an
  argmax could flip on float rounding; scaled weights keep greedy decoding a
  meaningful comparison.
  """
  model = transformer.init_model(config, seed)
  rng = np.random.default_rng(seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Biases start at zero; give them values so they matter.
  params = jax.tree.map(
      lambda x: x * scale if np.any(np.asarray(x)) else
      jax.numpy.asarray(rng.normal(0, 0.5, x.shape), x.dtype), params)
  return nnx.merge(graphdef, params, rest)


def left_pad(prompts: list[list[int]], width: int | None = None):
  """(tokens, mask) int32 [B, width], prompts right-aligned; pad id 0."""
  width = width or max(map(len, prompts))
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    mask[i, width - len(p):] = 1
  return tokens, mask


@functools.partial(jax.jit, static_argnames="graphdef")
def _full_forward_logits(params, rest, tokens, mask, *, graphdef):
  model = nnx.merge(graphdef, params, rest)
  return model.logits(model(tokens, mask))                        # [1, L, V]


def reference_greedy(model: transformer.Transformer, prompt: list[int], steps: int,
                     stop_tokens=(), width: int = 24) -> list[int]:
  """Argmax decoding by a full forward (no cache) over the sequence at each step.

  The sequence sits unpadded at the start of a fixed [1, width] buffer (right
  padding cannot influence earlier positions under causal attention), so this
  compiles once per model config. Fails if the top two logits are too close for an argmax
  comparison to mean anything.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  width = max(width, len(prompt) + steps)
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(prompt)] = prompt
  out = []
  for i in range(steps):
    length = len(prompt) + i
    mask = (np.arange(width) < length).astype(np.int32)[None]
    logits = np.asarray(_full_forward_logits(params, rest, tokens, mask,
                                             graphdef=graphdef)[0, length - 1])
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1e-3, f"near-tie in the reference logits {top2}"
    tok = int(np.argmax(logits))
    out.append(tok)
    if tok in stop_tokens or i == steps - 1:
      break
    tokens[0, length] = tok
  return out


def reference_probs(model: transformer.Transformer, sequence: list[int],
                    temperature: float = 1.0) -> np.ndarray:
  """[V] float64 next-token softmax(logits / temperature) by a full forward."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = np.asarray([sequence], np.int32)
  logits = np.asarray(_full_forward_logits(params, rest, tokens, np.ones_like(tokens),
                                           graphdef=graphdef)[0, -1], np.float64)
  z = logits / temperature
  p = np.exp(z - z.max())
  return p / p.sum()


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id"))
def recompute_greedy(params, frozen, tokens, mask, *, graphdef, max_new_tokens: int,
                     eos_id: int):
  """[N, P] left-padded prompts -> [N, max_new_tokens] greedy continuations.

  A full forward of the whole [N, P + max_new_tokens] buffer for every new token
  (no cache); after a row's eos it repeats eos.
  """
  model = nnx.merge(graphdef, params, frozen)
  n, p = tokens.shape
  buf = jnp.concatenate([tokens, jnp.zeros((n, max_new_tokens), tokens.dtype)], axis=1)
  buf_mask = jnp.concatenate([mask, jnp.zeros((n, max_new_tokens), mask.dtype)], axis=1)

  def body(i, carry):
    buf, buf_mask, done = carry
    logits = model.logits(model(buf, buf_mask))                      # [N, P+M, V]
    choice = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(buf.dtype)
    nxt = jnp.where(done, eos_id, choice)
    buf = buf.at[:, p + i].set(nxt)
    buf_mask = buf_mask.at[:, p + i].set(1)
    return buf, buf_mask, done | (nxt == eos_id)

  buf, _, _ = jax.lax.fori_loop(0, max_new_tokens, body,
                                (buf, buf_mask, jnp.zeros((n,), bool)))
  return buf[:, p:]


def recompute_complete(graphdef, params, frozen, tokenizer, prompts: list[str],
                       max_new_tokens: int) -> list[str]:
  """Greedy completion texts of text prompts by `recompute_greedy`, cut before eos."""
  ids = [tokenize.text_prompt_ids(tokenizer, p) for p in prompts]
  tokens, mask = left_pad(ids)
  gen = np.asarray(recompute_greedy(params, frozen, jnp.asarray(tokens), jnp.asarray(mask),
                                    graphdef=graphdef, max_new_tokens=max_new_tokens,
                                    eos_id=tokenizer.eos_token_id))
  out = []
  for row in gen.tolist():
    if tokenizer.eos_token_id in row:
      row = row[:row.index(tokenizer.eos_token_id)]
    out.append(tokenizer.decode(row, skip_special_tokens=True))
  return out
