"""Completions for evaluation and for building on-policy data, and their scoring.

The text goes through the KV-cache engine (`jaxalign.sampling`, via
`rollout.sample_texts`), the one sampler of the package: greedy when the
temperature is 0, else seeded sampling.
"""

from typing import Callable, Sequence

import jax
import numpy as np

from jaxalign.data import tokenize
from jaxalign.train import rollout


def complete(graphdef, params, frozen, tokenizer, prompts: Sequence[str], *,
             max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 256) -> list[str]:
  """One completion per text prompt (rendered as training renders it, not truncated).

  Greedy when temperature is 0, else sampled (no top-k / top-p); the same seed
  gives the same text. A completion ends before the tokenizer's eos token.
  """
  if not prompts:
    return []
  width = max(len(tokenize.prompt_ids(tokenizer, p)) for p in prompts)
  sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0)
  texts = rollout.sample_texts(graphdef, params, frozen, tokenizer, prompts, sampling=sampling,
                               n=1, key=jax.random.PRNGKey(seed), width=width,
                               batch_size=min(batch_size, len(prompts)))
  return [t[0] for t in texts]


def accuracy(completions: Sequence[str], prompts: Sequence[str],
             is_correct: Callable[[str, str], bool]) -> float:
  """Fraction of completions judged correct by the task's checker."""
  return float(np.mean([is_correct(p, c) for p, c in zip(prompts, completions)]))
