"""`jaxalign generate`: completions for a file of prompts from a trained run.

  jaxalign generate --checkpoint runs/sft --prompts prompts.jsonl --out completions.jsonl

Input: JSONL (or Parquet, a `datasets` directory, a ``toy:`` source) of records
with a ``prompt``: text, or chat messages ``[{"role", "content"}, ...]``.
Prompts are rendered exactly as training renders them (text: bos + tokens;
messages: the chat template with the generation prompt) and, like training,
keep their last ``max_prompt_length`` tokens (the run's
``data.max_prompt_length`` unless given).

Output: one JSON object per input record, in input order: the record's own
fields (provenance keys dropped) plus ``completions`` (n texts, special tokens
removed), ``num_tokens`` (generated tokens of each, the stop token included)
and ``finish_reasons`` ("stop" at eos or a stop token, "length" at
max_new_tokens). The same seed and batch size give the same file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from jaxalign.sampling.engine import SamplingParams, generate
from jaxalign.data import reading

PROVENANCE_KEYS = ("source_file", "row")


def _where(record: dict, path: str, i: int) -> str:
  return f"{record.get('source_file', path)}:{record.get('row', i + 1)}"


def read_prompts(path: str) -> list[dict]:
  """Records with a valid ``prompt`` field; bad rows raise DataError naming file:row."""
  from jaxalign.config import ConfigError
  from jaxalign.data.formats import DataError

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
  from jaxalign.data import tokenize

  ids, truncated = [], 0
  for p in prompts:
    full = list(tokenize.prompt_ids(tokenizer, p))  # training's rendering
    truncated += len(full) > max_prompt_length
    ids.append(full[-max_prompt_length:])
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


def _run_mesh(config):
  from jaxalign import config as config_lib, sharding

  try:
    return sharding.make_mesh(config.mesh.shape)
  except config_lib.ConfigError:
    # Trained on another topology: every local device on the batch/fsdp axis.
    return sharding.make_mesh((1, -1, 1))


def generate_file(checkpoint: str, prompts_path: str, out_path: str, sp: SamplingParams, *,
                  seed: int = 0, batch_size: int = 64,
                  max_prompt_length: int | None = None) -> dict[str, Any]:
  """Writes `sp.n` completions per prompt of `prompts_path` to JSONL `out_path`.

  Args:
    checkpoint: a jaxalign run directory (latest checkpoint, saved config,
      tokenizer/ when the run saved one).
    prompts_path: prompt records (module docstring).
    out_path: JSONL output, written atomically by process 0.
    sp: sampling parameters; the tokenizer's eos is always a stop token.
    seed: sampling seed; chunk c of `batch_size` prompts uses fold_in(key, c).
    batch_size: prompts per engine call.
    max_prompt_length: prompt tokens kept (the last ones); default the run's
      data.max_prompt_length.

  Returns:
    statistics: prompts, completions, generated_tokens, truncated_prompts,
    stopped (fraction that ended at a stop token), seconds.
  """
  import ml_collections

  from jaxalign.train import rundir

  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not os.path.isdir(os.path.join(checkpoint, "checkpoints")):
    raise FileNotFoundError(f"{checkpoint}: not a jaxalign run directory (no checkpoints/)")
  config = ml_collections.ConfigDict(rundir.resolved_config(checkpoint))
  records = read_prompts(prompts_path)
  tok_dir = os.path.join(checkpoint, "tokenizer")
  tokenizer = reading.load_tokenizer(tok_dir if os.path.isdir(tok_dir) else config.data.tokenizer)
  if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in sp.stop_tokens:
    sp = dataclasses.replace(sp, stop_tokens=sp.stop_tokens + (tokenizer.eos_token_id,))
  width = int(max_prompt_length or config.data.max_prompt_length)
  ids, truncated = encode_prompts(tokenizer, [r["prompt"] for r in records], width)

  mesh = _run_mesh(config)
  graphdef, params, frozen = rundir.load_run_params(checkpoint, config, mesh=mesh)
  key = jax.random.PRNGKey(seed)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  from jaxalign import sharding
  batch_axes = sharding.batch_axes(rules)
  t0 = time.perf_counter()
  texts, lengths, stopped = [], [], []
  stop_set = set(sp.stop_tokens)
  for c, start in enumerate(range(0, len(ids), batch_size)):
    tokens, mask = left_pad(ids[start:start + batch_size], tokenizer.pad_token_id or 0)
    with jax.set_mesh(mesh):
      out = generate(graphdef, params, frozen, tokens, mask, jax.random.fold_in(key, c), sp,
                     mesh=mesh, batch_axes=batch_axes)
    for row in out.token_lists():
      texts.append(tokenizer.decode(row, skip_special_tokens=True))
      lengths.append(len(row))
      stopped.append(bool(row) and row[-1] in stop_set)
  seconds = time.perf_counter() - t0

  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "w") as f:
      for i, r in enumerate(records):
        rows = slice(i * sp.n, (i + 1) * sp.n)
        out_record = {k: v for k, v in r.items() if k not in PROVENANCE_KEYS}
        out_record.update(completions=texts[rows], num_tokens=lengths[rows],
                          finish_reasons=["stop" if s else "length" for s in stopped[rows]])
        f.write(json.dumps(out_record) + "\n")
    os.replace(out_path + ".tmp", out_path)
  return {"prompts": len(records), "completions": len(texts),
          "generated_tokens": int(sum(lengths)), "truncated_prompts": truncated,
          "stopped": float(np.mean(stopped)), "seconds": seconds}
