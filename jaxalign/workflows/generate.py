"""`jaxalign generate`: completions for a file of prompts from a trained run.

  jaxalign generate --checkpoint runs/sft --prompts prompts.jsonl --out completions.jsonl

Prompts are read and rendered by jaxalign/sampling/files.py (its docstring has
the input format), keeping their last ``max_prompt_length`` tokens (the run's
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
import ml_collections
import numpy as np

from jaxalign import sharding
from jaxalign.data import reading
from jaxalign.errors import ConfigError
from jaxalign.sampling import files
from jaxalign.sampling.engine import SamplingParams, generate
from jaxalign.train import rundir


def _run_mesh(config):
  try:
    return sharding.make_mesh(config.mesh.shape)
  except ConfigError:
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
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not os.path.isdir(os.path.join(checkpoint, "checkpoints")):
    raise FileNotFoundError(f"{checkpoint}: not a jaxalign run directory (no checkpoints/)")
  config = ml_collections.ConfigDict(rundir.resolved_config(checkpoint))
  records = files.read_prompts(prompts_path)
  tok_dir = os.path.join(checkpoint, "tokenizer")
  tokenizer = reading.load_tokenizer(tok_dir if os.path.isdir(tok_dir) else config.data.tokenizer)
  if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in sp.stop_tokens:
    sp = dataclasses.replace(sp, stop_tokens=sp.stop_tokens + (tokenizer.eos_token_id,))
  width = int(max_prompt_length or config.data.max_prompt_length)
  ids, truncated = files.encode_prompts(tokenizer, [r["prompt"] for r in records], width)

  mesh = _run_mesh(config)
  graphdef, params, frozen = rundir.load_run_params(checkpoint, config, mesh=mesh)
  key = jax.random.PRNGKey(seed)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  batch_axes = sharding.batch_axes(rules)
  t0 = time.perf_counter()
  texts, lengths, stopped = [], [], []
  stop_set = set(sp.stop_tokens)
  for c, start in enumerate(range(0, len(ids), batch_size)):
    tokens, mask = files.left_pad(ids[start:start + batch_size], tokenizer.pad_token_id or 0)
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
        out_record = {k: v for k, v in r.items() if k not in files.PROVENANCE_KEYS}
        out_record.update(completions=texts[rows], num_tokens=lengths[rows],
                          finish_reasons=["stop" if s else "length" for s in stopped[rows]])
        f.write(json.dumps(out_record) + "\n")
    os.replace(out_path + ".tmp", out_path)
  return {"prompts": len(records), "completions": len(texts),
          "generated_tokens": int(sum(lengths)), "truncated_prompts": truncated,
          "stopped": float(np.mean(stopped)), "seconds": seconds}
