"""Prompt files for sampling: read, render and left-pad prompts as training renders them.

`jaxalign generate` (jaxalign/workflows/generate.py) and the online rollouts use
these. Input: JSONL (or Parquet, a `datasets` directory, a ``toy:`` source) of records
with a ``prompt``: text, or chat messages ``[{"role", "content"}, ...]``.
Prompts are rendered exactly as training renders them (text: bos + tokens;
messages: the chat template with the generation prompt) and, like training,
keep their last ``max_prompt_length`` tokens.
"""

from __future__ import annotations

import numpy as np

from jaxalign.data import reading, tokenize
from jaxalign.errors import ConfigError, DataError

PROVENANCE_KEYS = ("source_file", "row")


def _where(record: dict, path: str, i: int) -> str:
  return f"{record.get('source_file', path)}:{record.get('row', i + 1)}"


def read_prompts(path: str) -> list[dict]:
  """Records with a valid ``prompt`` field; bad rows raise DataError naming file:row."""
  try:
    records = reading.read_records(path, split="train")
  except ConfigError as e:  # worded for config.data.train_path; this is --prompts
    raise FileNotFoundError(str(e).replace("config.data.train_path", "prompts")) from None
  if not records:
    raise DataError(f"{path}: no prompts")
  for i, r in enumerate(records):
    where = _where(r, path, i)
    if "_invalid" in r:
      raise DataError(f"{where}: {r['_invalid']}")
    if "prompt" not in r:
      raise DataError(f"{where}: prompt: missing field")
    p = r["prompt"]
    if isinstance(p, str):
      if not p:
        raise DataError(f"{where}: prompt: empty string")
    elif isinstance(p, list) and p:
      for j, m in enumerate(p):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
          raise DataError(f"{where}: prompt[{j}]: want {{'role': str, 'content': str}}, "
                          f"got {m!r:.80}")
    else:
      raise DataError(f"{where}: prompt: want a string or a non-empty list of messages, "
                      f"got {type(p).__name__}")
  return records


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int) -> tuple[list[list[int]], int]:
  """Token ids of each prompt as training renders it, keeping the last tokens.

  Returns:
    ids per prompt, and how many prompts were truncated.
  """
  ids, truncated = [], 0
  for p in prompts:
    # Training's rendering; one id more than is kept tells a truncated prompt.
    last = list(tokenize.prompt_ids(tokenizer, p, keep_last=max_prompt_length + 1))
    truncated += len(last) > max_prompt_length
    ids.append(last[-max_prompt_length:])
  return ids, truncated


def left_pad(ids: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """[B, P] int32 tokens and mask, each row right-aligned (P = longest row)."""
  width = max(len(x) for x in ids)
  tokens = np.full((len(ids), width), pad_id, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, x in enumerate(ids):
    tokens[i, width - len(x):] = x
    mask[i, width - len(x):] = 1
  return tokens, mask
