"""AFT's candidate stage: k sampled answers per question from a (VFT/SFT) run, labelled.

  jaxalign generate-candidates --checkpoint runs/demo/sft --questions q.jsonl --k 4 \
      --out aft.jsonl
  jaxalign train --config configs/aft_demo.py:runs/demo \
      --config.data.train_path=aft.jsonl --config.data.group_size=4 ...

Questions are `jaxalign generate` prompt records (a `prompt`: text or chat messages)
with optionally a `reference` (or, as in sft records, a `completion`): the reference
answer / chain of thought that AFT's SFT term trains on and the "exact_match" checker
compares against. Sampling is `jaxalign.workflows.generate.generate_file`'s; each
completion is then labelled by a checker: a reward (`jaxalign.rewards`; default
"arithmetic", the bundled task's checker) whose value > 0 means correct. The output is
JSONL in the `ranked` format that `aft` reads: {prompt, completions: [...], labels:
[...], reference?}. Empty completions are
dropped (a response must be non-empty), so groups may hold fewer than k:
train with data.group_size = k.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from jaxalign import rewards
from jaxalign.data import formats
from jaxalign.sampling import SamplingParams
from jaxalign.workflows import generate as generate_lib
from jaxalign.train import rundir
from jaxalign.data import reading


def _text(prompt) -> str:
  """A prompt as the checker reads it: the text, or the last message's content."""
  return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _reference(record: dict):
  """The question's reference answer: `reference`, or `completion` (sft records)."""
  return record.get("reference", record.get("completion"))


def label_candidates(records: list[dict], checker) -> tuple[list[dict], int]:
  """`jaxalign generate` output records -> ranked records; returns (records, empties dropped)."""
  k = max(len(r["completions"]) for r in records)
  prompts = [_text(r["prompt"]) for r in records for _ in r["completions"]]
  refs = [_reference(r) for r in records for _ in r["completions"]]
  flat = [c for r in records for c in r["completions"]]
  scores = rewards.score(checker, prompts, flat, refs)
  out, dropped, pos = [], 0, 0
  for r in records:
    group, s = r["completions"], scores[pos:pos + len(r["completions"])]
    pos += len(group)
    keep = [j for j, text in enumerate(group) if text.strip()]
    dropped += k - len(keep)
    if not keep:
      continue
    ranked = {"prompt": r["prompt"], "completions": [group[j] for j in keep],
              "labels": [bool(s[j] > 0) for j in keep]}
    if _reference(r) is not None:
      ranked["reference"] = _reference(r)
    out.append(ranked)
  return out, dropped


def generate_candidates(checkpoint: str, questions_path: str, out_path: str, *, k: int,
                        sampling: dict, reward: str = "arithmetic",
                        reward_options: dict | None = None, seed: int = 0) -> dict:
  """Samples k candidates per question from the run in `checkpoint`; writes `out_path`.

  Args:
    checkpoint: a jaxalign run directory (its latest checkpoint, config, tokenizer).
    questions_path: question records (see module docstring).
    out_path: JSONL output, the `ranked` format.
    k: samples per question.
    sampling: max_new_tokens, temperature, top_k, top_p, batch_size.
    reward, reward_options: the checker; value > 0 labels a candidate correct.
    seed: sampling seed (same seed, same candidates).

  Returns:
    statistics: questions, written, candidates, positive fraction, dropped empties.
  """
  if k < 1:
    raise ValueError(f"--k must be >= 1, got {k}")
  checker_fn = rewards.factory_of(reward)  # an unknown checker fails before sampling
  sp = SamplingParams(max_new_tokens=int(sampling["max_new_tokens"]),
                      temperature=float(sampling["temperature"]), top_k=int(sampling["top_k"]),
                      top_p=float(sampling["top_p"]), n=k)
  samples_path = out_path + ".samples.jsonl"
  generate_lib.generate_file(checkpoint, questions_path, samples_path, sp, seed=seed,
                      batch_size=int(sampling.get("batch_size", 256)))
  if jax.process_count() > 1:
    raise RuntimeError("generate-candidates runs on one host")
  with open(samples_path) as f:
    samples = [json.loads(line) for line in f]
  os.remove(samples_path)
  config = ml_collections.ConfigDict(rundir.resolved_config(checkpoint))
  tok_dir = os.path.join(checkpoint, "tokenizer")
  tokenizer = reading.load_tokenizer(tok_dir if os.path.isdir(tok_dir) else config.data.tokenizer)
  checker = checker_fn(tokenizer=tokenizer, **(reward_options or {}))
  records, dropped = label_candidates(samples, checker)
  formats.validate_records(records, "ranked")  # what the aft reader will accept
  with open(out_path + ".tmp", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(out_path + ".tmp", out_path)
  labels = [x for r in records for x in r["labels"]]
  return {"questions": len(samples), "written": len(records), "candidates": len(labels),
          "positive_fraction": float(np.mean(labels)) if labels else 0.0,
          "dropped_empty": dropped}
