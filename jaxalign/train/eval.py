"""Greedy decoding and sampling for evaluation and for building on-policy data.

This recomputes the whole prefix each step (no KV cache): fine for the short
answers of the demo task. The KV-cache sampling engine is `jaxalign.sampling`'s
job (a separate issue).
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.data import tokenize


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id",
                                             "temperature"))
def _decode(params, frozen, tokens, attention_mask, key, *, graphdef, max_new_tokens: int,
            eos_id: int, temperature: float):
  """tokens [N, P] left-padded prompts -> [N, max_new_tokens] continuations.

  temperature 0 is greedy (argmax); otherwise softmax sampling at that
  temperature with `key` (same key, same output).
  """
  model = nnx.merge(graphdef, params, frozen)
  n, p = tokens.shape
  buf = jnp.concatenate([tokens, jnp.zeros((n, max_new_tokens), tokens.dtype)], axis=1)
  mask = jnp.concatenate([attention_mask, jnp.zeros((n, max_new_tokens), attention_mask.dtype)],
                         axis=1)
  done = jnp.zeros((n,), bool)

  def body(i, carry):
    buf, mask, done = carry
    hidden = model(buf, mask)                                   # [N, P+M, D]
    last = jax.lax.dynamic_index_in_dim(hidden, p + i - 1, axis=1, keepdims=False)  # [N, D]
    logits = last.astype(jnp.float32) @ model.head_weight().astype(jnp.float32)     # [N, V]
    if temperature > 0:
      choice = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
    else:
      choice = jnp.argmax(logits, axis=-1)
    nxt = jnp.where(done, eos_id, choice.astype(buf.dtype))
    buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, p + i, axis=1)
    mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones_like(nxt, mask.dtype), p + i, axis=1)
    return buf, mask, done | (nxt == eos_id)

  buf, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, mask, done))
  return buf[:, p:]


def complete(graphdef, params, frozen, tokenizer, prompts: Sequence[str], *,
             max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 256) -> list[str]:
  """Completions of text prompts (tokenized as in training: `tokenize.text_prompt_ids`).

  Greedy when temperature is 0, else sampled; the same seed gives the same text.
  """
  eos_id = tokenizer.eos_token_id
  pad_id = tokenizer.pad_token_id
  encoded = [tokenize.text_prompt_ids(tokenizer, p) for p in prompts]
  width = max(len(e) for e in encoded)
  key = jax.random.PRNGKey(seed)
  out: list[str] = []
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    rows = len(chunk)
    # Fixed shapes: pad the batch to batch_size rows so it compiles once.
    tokens = np.full((batch_size, width), pad_id, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for i, e in enumerate(chunk):
      tokens[i, width - len(e):] = e    # left padding: every prompt ends at `width`
      mask[i, width - len(e):] = 1
    gen = np.asarray(_decode(params, frozen, jnp.asarray(tokens), jnp.asarray(mask),
                             jax.random.fold_in(key, start), graphdef=graphdef,
                             max_new_tokens=max_new_tokens, eos_id=eos_id,
                             temperature=float(temperature)))
    for row in gen[:rows]:
      ids = list(row)
      if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
      out.append(tokenizer.decode(ids, skip_special_tokens=True))
  return out


def greedy_complete(graphdef, params, frozen, tokenizer, prompts: Sequence[str], *,
                    max_new_tokens: int, batch_size: int = 256) -> list[str]:
  """Greedy completions (see `complete`)."""
  return complete(graphdef, params, frozen, tokenizer, prompts, max_new_tokens=max_new_tokens,
                  batch_size=batch_size)


def accuracy(completions: Sequence[str], prompts: Sequence[str],
             is_correct: Callable[[str, str], bool]) -> float:
  """Fraction of completions judged correct by the task's checker."""
  return float(np.mean([is_correct(p, c) for p, c in zip(prompts, completions)]))
