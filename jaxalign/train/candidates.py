"""AFT's candidate stage: k sampled answers per question from a (VFT/SFT) run, labelled.

  jaxalign generate-candidates --checkpoint runs/demo/sft --questions q.jsonl --k 4 \
      --out aft.jsonl
  jaxalign train --config configs/aft_demo.py:runs/demo \
      --config.data.train_path=aft.jsonl --config.data.group_size=4 ...

Questions are records with a `prompt` (text or chat messages) and optionally a
`reference` (the reference answer / chain of thought; AFT's SFT term uses it,
and the "exact_match" checker compares against it). Each completion is
labelled by a checker: a reward (`jaxalign.rewards`; default "arithmetic", the
bundled task's checker) whose value > 0 means correct. The output is JSONL in
the `ranked` format that `aft` reads: {prompt, completions: [...], labels:
[...], reference?}. Empty completions are dropped (a response must be
non-empty), so groups may hold fewer than k: train with data.group_size = k.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from jaxalign import config as config_lib
from jaxalign import rewards
from jaxalign import sharding
from jaxalign.data import formats
from jaxalign.train import loop, rollout

CANDIDATE_STREAM = 4


def read_questions(path: str) -> list[dict]:
  """Question records {prompt, reference?} of a JSONL/Parquet/datasets file or toy source."""
  records = loop.read_records(path, split="train")
  out = []
  for i, r in enumerate(records):
    where = f"{r.get('source_file', path)}:{r.get('row', i + 1)}"
    if "prompt" not in r:
      raise formats.DataError(f"{where}: prompt: missing field")
    # Validated as an sft record whose response is the reference (or a stand-in).
    probe = {"prompt": r["prompt"], "completion": r.get("reference", r.get("completion", "-")),
             "source_file": r.get("source_file", path), "row": r.get("row", i + 1)}
    try:
      valid = formats.validate_record(probe, "sft")
    except formats.DataError as e:
      raise formats.DataError(str(e).replace(": completion", ": reference")) from None
    question = {"prompt": valid["prompt"]}
    if "reference" in r or "completion" in r:
      ref = valid["completion"]
      question["reference"] = ref if isinstance(ref, str) else ref[-1]["content"]
    out.append(question)
  if not out:
    raise formats.DataError(f"{path}: no questions")
  return out


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
  config = ml_collections.ConfigDict(loop.resolved_config(checkpoint))
  questions = read_questions(questions_path)
  tok_dir = os.path.join(checkpoint, "tokenizer")
  tokenizer = loop.load_tokenizer(tok_dir if os.path.isdir(tok_dir) else config.data.tokenizer)
  try:
    mesh = sharding.make_mesh(config.mesh.shape)
  except config_lib.ConfigError:  # trained on another device count: use them all
    mesh = sharding.make_mesh((1, -1, 1))
  graphdef, params, frozen = loop.load_run_params(checkpoint, config, mesh=mesh)
  prompts = [q["prompt"] for q in questions]
  key = jax.random.fold_in(jax.random.PRNGKey(seed), CANDIDATE_STREAM)
  with jax.set_mesh(mesh):
    texts = rollout.sample_texts(graphdef, params, frozen, tokenizer, prompts,
                                 sampling=sampling, n=k, key=key,
                                 width=config.data.max_prompt_length,
                                 batch_size=int(sampling.get("batch_size", 256)))
  checker = rewards.get(reward, tokenizer=tokenizer, **(reward_options or {}))
  refs = [q.get("reference") for q in questions]
  flat = [t for group in texts for t in group]
  plain = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
  scores = rewards.score(checker, np.repeat(np.asarray(plain, object), k).tolist(), flat,
                         np.repeat(np.asarray(refs, object), k).tolist()).reshape(-1, k)
  records, dropped = [], 0
  for q, group, s in zip(questions, texts, scores):
    keep = [j for j, t in enumerate(group) if t.strip()]
    dropped += k - len(keep)
    if not keep:
      continue
    record = {"prompt": q["prompt"], "completions": [group[j] for j in keep],
              "labels": [bool(s[j] > 0) for j in keep]}
    if "reference" in q:
      record["reference"] = q["reference"]
    records.append(record)
  formats.validate_records(records, "ranked")  # what the aft reader will accept
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    os.replace(out_path + ".tmp", out_path)
  labels = [x for r in records for x in r["labels"]]
  return {"questions": len(questions), "written": len(records), "candidates": len(labels),
          "positive_fraction": float(np.mean(labels)) if labels else 0.0,
          "dropped_empty": dropped}
