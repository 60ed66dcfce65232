"""The bundled demo: SFT a tiny model on arithmetic, align it with DPO, compare.

  jaxalign demo --workdir runs/demo

1. Generates the task's data as JSONL files under DIR/data (the real file path).
   The SFT demonstrations come from a careless annotator: 70% of answers below
   100 are written zero-padded ("085"), which the task's checker counts wrong.
2. SFT: trains a tiny transformer from scratch on those demonstrations. It
   learns the arithmetic and the annotator's habit, so most of its answers
   below 100 come out padded.
3. Pairs: for each training prompt, chosen = the right answer, rejected = the
   SFT model's own greedy answer when the checker says it is wrong (on-policy
   negatives), else a plausible arithmetic mistake from the task.
4. DPO from the SFT checkpoint, with the SFT model as the (precomputed) reference.
5. Greedy accuracy on held-out problems, before and after; DIR/summary.json.

Why the annotator habit: with clean demonstrations, a model this small is
limited by arithmetic skill rather than by preferences, and plain DPO on its
mistakes does not raise greedy accuracy (measured: 43% -> 37..44% over a few
learning rates and betas). Preference optimization moves probability between
answers the model can already produce; the habit makes that the bottleneck, as
in real demonstrations with systematic errors.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign.data import toy
from jaxalign.train import eval as eval_lib
from jaxalign.train import loop

TASK = toy.ArithmeticTask(max_operand=99, ops=("+",), seed=0)
MAX_NEW_TOKENS = 5
# Fraction of answers below 100 that the SFT demonstrations zero-pad ("085").
PAD_NOISE = 0.7


def base_config(seed: int = 0) -> ml_collections.ConfigDict:
  """The demo model, mesh and data settings shared by both stages."""
  c = config_lib.defaults()
  c.seed = seed
  c.model.preset = "tiny"
  c.model.overrides = ml_collections.ConfigDict(dict(
      vocab_size=32, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
      d_ff=256, max_seq_len=32))
  c.data.tokenizer = "toy"
  c.data.max_length = 16
  c.data.max_prompt_length = 10
  c.data.batch_size = 64
  c.log_every = 25
  c.checkpoint.every = 10_000
  return c


def sft_config(data_dir: str, seed: int = 0) -> ml_collections.ConfigDict:
  c = base_config(seed)
  c.loss.name = "sft"
  c.loss.hparams = ml_collections.ConfigDict()
  c.data.train_path = os.path.join(data_dir, "sft.jsonl")
  c.total_steps = 2000
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  return c


def dpo_config(data_dir: str, sft_dir: str, seed: int = 0) -> ml_collections.ConfigDict:
  c = base_config(seed)
  c.loss.name = "dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0))
  c.reference.mode = "precompute"
  c.init_from = sft_dir
  c.data.train_path = os.path.join(data_dir, "pairs.jsonl")
  c.total_steps = 150
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10
  return c


def _write_jsonl(path: str, records) -> None:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _evaluate(run_dir: str, config, tokenizer, prompts) -> tuple[float, list[str]]:
  graphdef, params, frozen = loop.load_run_params(run_dir, config)
  completions = eval_lib.greedy_complete(graphdef, params, frozen, tokenizer, prompts,
                                         max_new_tokens=MAX_NEW_TOKENS)
  return eval_lib.accuracy(completions, prompts, TASK.is_correct), completions


def on_policy_pairs(prompts, answers, completions, seed: int) -> list[dict]:
  """Chosen = right answer; rejected = the model's wrong answer, else a task mistake."""
  rng = np.random.default_rng(seed)
  pairs = []
  for prompt, answer, completion in zip(prompts, answers, completions):
    rejected = completion.strip()
    if TASK.is_correct(prompt, completion) or not rejected:
      rejected = TASK.wrong_answers(TASK.parse_prompt(prompt), 1, rng)[0]
    pairs.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
  return pairs


def run_demo(workdir: str, *, seed: int = 0, num_train: int = 4000, num_eval: int = 500,
             pad_noise: float = PAD_NOISE, progress: bool = True) -> dict:
  """Runs the whole demo; returns (and writes to DIR/summary.json) the summary."""
  start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  tokenizer = toy.build_tokenizer()

  sft_records = TASK.sft_records(num_train, split="train", seed=seed, pad_noise=pad_noise)
  _write_jsonl(os.path.join(data_dir, "sft.jsonl"), sft_records)
  eval_problems = TASK.problems(num_eval, split="eval", seed=seed + 1)
  eval_prompts = [p.prompt for p in eval_problems]

  sft_dir = os.path.join(workdir, "sft")
  sft_cfg = sft_config(data_dir, seed)
  loop.train(sft_cfg, sft_dir, progress=progress)
  sft_acc, _ = _evaluate(sft_dir, sft_cfg, tokenizer, eval_prompts)

  # On-policy negatives from the SFT model on (a subset of) the training prompts.
  pair_problems = TASK.problems(num_train, split="train", seed=seed + 2)
  _, train_completions = _evaluate(sft_dir, sft_cfg, tokenizer,
                                   [p.prompt for p in pair_problems])
  pairs = on_policy_pairs([p.prompt for p in pair_problems], [p.answer for p in pair_problems],
                          train_completions, seed)
  _write_jsonl(os.path.join(data_dir, "pairs.jsonl"), pairs)

  dpo_dir = os.path.join(workdir, "dpo")
  dpo_cfg = dpo_config(data_dir, sft_dir, seed)
  result = loop.train(dpo_cfg, dpo_dir, progress=progress)
  aligned_acc, _ = _evaluate(dpo_dir, dpo_cfg, tokenizer, eval_prompts)

  summary = {
      "method": "dpo",
      "sft_accuracy": sft_acc,
      "aligned_accuracy": aligned_acc,
      "improvement_points": 100.0 * (aligned_acc - sft_acc),
      "num_eval_problems": num_eval,
      "seed": seed,
      "dpo_final_metrics": result.last_metrics,
      "wall_time_sec": time.perf_counter() - start,
      "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
  }
  if jax.process_index() == 0:
    ckpt.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def format_table(summary: dict) -> str:
  rows = [("model", "held-out greedy accuracy"),
          ("SFT (before)", f"{100 * summary['sft_accuracy']:.1f}%"),
          (f"{summary['method'].upper()} (after)", f"{100 * summary['aligned_accuracy']:.1f}%")]
  w = max(len(r[0]) for r in rows)
  lines = [f"{a:<{w}}  {b}" for a, b in rows]
  lines.insert(1, "-" * len(lines[0]))
  lines.append(f"change: {summary['improvement_points']:+.1f} points on "
               f"{summary['num_eval_problems']} problems, {summary['wall_time_sec']:.0f} s")
  return "\n".join(lines)
