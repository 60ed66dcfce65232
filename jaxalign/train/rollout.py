"""Sampling from a policy on the host's behalf: prompts in, completion tokens and text out.

The thin layer between the generation engine (`jaxalign.sampling`) and the
online methods: it turns prompts (text, or the prompt part of tokenized
examples) into left-padded arrays, calls the engine on live (possibly sharded)
parameters, and brings completions back to each process as numpy.
"""

from typing import Sequence

import jax
import numpy as np

from jaxalign.sampling import SamplingParams, files, generate


def sampling_params(sampling, *, n: int, eos_id: int | None) -> SamplingParams:
  """SamplingParams from plain values of `config.sampling`, stopping at eos."""
  return SamplingParams(
      max_new_tokens=int(sampling["max_new_tokens"]), temperature=float(sampling["temperature"]),
      top_k=int(sampling["top_k"]), top_p=float(sampling["top_p"]), n=int(n),
      stop_tokens=() if eos_id is None else (int(eos_id),))


def _all_processes(x: np.ndarray) -> np.ndarray:
  """Every process's rows of `x`, in process order (identity in one process)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=False)).reshape(-1, *x.shape[1:])


def _to_host(x) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sample(graphdef, params, frozen, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
           key: jax.Array, sp: SamplingParams, *, local: bool = True
           ) -> tuple[np.ndarray, np.ndarray]:
  """`sp.n` completions per prompt: (tokens [N*n, M] int32, lengths [N*n] int32).

  Rows are prompt-major (row i*n + j is sample j of prompt i); a row's tokens
  end with the stop token when it stopped (included in its length), then 0s.

  Args:
    prompt_tokens, prompt_mask: [N, P] left-padded; with `local` these are this
      process's prompts (all processes sample together and each gets its own
      rows back), else the same global prompts on every process.
  """
  tokens, mask = np.asarray(prompt_tokens, np.int32), np.asarray(prompt_mask, np.int32)
  if local:
    tokens, mask = _all_processes(tokens), _all_processes(mask)
  out = generate(graphdef, params, frozen, tokens, mask, key, sp)
  completions, lengths = _to_host(out.tokens), _to_host(out.lengths)
  if local and jax.process_count() > 1:
    rows = len(prompt_tokens) * sp.n
    start = jax.process_index() * rows
    completions, lengths = completions[start:start + rows], lengths[start:start + rows]
  return completions.astype(np.int32), lengths.astype(np.int32)


def example_prompts(tokens: np.ndarray, attention_mask: np.ndarray, loss_mask: np.ndarray,
                    width: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  """The prompts of right-padded tokenized sequences, left-padded to `width`.

  Args:
    tokens, attention_mask, loss_mask: [N, T] one sequence per example (prompt,
      response, padding), as `jaxalign.data.tokenize` writes them.
    width: P, at least every prompt's length (data.max_prompt_length).

  Returns:
    tokens [N, P], mask [N, P] (left-padded) and each prompt's ids.
  """
  prompt = attention_mask.astype(bool) & ~loss_mask.astype(bool)
  ids = [row[m] for row, m in zip(tokens, prompt)]
  out = np.zeros((len(ids), width), np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, p in enumerate(ids):
    if not 0 < len(p) <= width:
      raise ValueError(f"prompt of {len(p)} tokens does not fit width {width}")
    out[i, width - len(p):] = p
    mask[i, width - len(p):] = 1
  return out, mask, ids


def response_sequences(prompt_ids: Sequence[np.ndarray], completions: np.ndarray,
                       lengths: np.ndarray, *, n: int, max_length: int, pad_id: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Training rows (prompt + sampled completion, right-padded) for the train step.

  Args:
    prompt_ids: N prompts' token ids.
    completions: [N*n, M] sampled tokens, prompt-major; lengths [N*n].
    n: samples per prompt.
    max_length: T; prompt + completion must fit (config validation ensures it).

  Returns:
    tokens, attention_mask, loss_mask: int32 [N, n, T]; the loss mask covers
    the completion (its stop token included), like a tokenized response.
  """
  num = len(prompt_ids)
  tokens = np.full((num, n, max_length), pad_id, np.int32)
  attention = np.zeros((num, n, max_length), np.int32)
  loss = np.zeros((num, n, max_length), np.int32)
  for row in range(num * n):
    i, j = divmod(row, n)
    p, c = prompt_ids[i], completions[row, :lengths[row]]
    end = len(p) + len(c)
    if end > max_length:
      raise ValueError(f"prompt {len(p)} + completion {len(c)} tokens exceed max_length "
                       f"{max_length}")
    tokens[i, j, :end] = np.concatenate([p, c])
    attention[i, j, :end] = 1
    loss[i, j, len(p):end] = 1
  return tokens, attention, loss


def decode(tokenizer, completions: np.ndarray, lengths: np.ndarray) -> list[str]:
  """Completion texts (special tokens, e.g. the stop token, dropped)."""
  return [tokenizer.decode(list(map(int, row[:n])), skip_special_tokens=True)
          for row, n in zip(completions, lengths)]


def sample_texts(graphdef, params, frozen, tokenizer, prompts: Sequence, *, sampling,
                 n: int, key: jax.Array, width: int, batch_size: int = 256
                 ) -> list[list[str]]:
  """n sampled completion texts per prompt (every process passes the same prompts).

  Prompts are rendered and truncated as training does, and go in fixed-size
  chunks (the last one padded by repeating a prompt), so the engine compiles
  once; chunk c uses `fold_in(key, c)`.
  """
  sp = sampling_params(sampling, n=n, eos_id=tokenizer.eos_token_id)
  ids, _ = files.encode_prompts(tokenizer, list(prompts), width)
  tokens, mask = files.left_pad(ids, tokenizer.pad_token_id or 0)
  out: list[list[str]] = []
  for c, start in enumerate(range(0, len(prompts), batch_size)):
    rows = min(batch_size, len(prompts) - start)
    idx = np.minimum(np.arange(start, start + batch_size), len(prompts) - 1)
    comp, lengths = sample(graphdef, params, frozen, tokens[idx], mask[idx],
                           jax.random.fold_in(key, c), sp, local=False)
    texts = decode(tokenizer, comp[:rows * n], lengths[:rows * n])
    out.extend(texts[i * n:(i + 1) * n] for i in range(rows))
  return out
