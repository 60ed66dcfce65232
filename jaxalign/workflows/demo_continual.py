"""Two-domain continual demo: sequential LoRA-DPO, sequential OFS-DPO and COFS-DPO.

  jaxalign demo --method continual --workdir runs/continual

1. SFT (from scratch, reused if DIR/sft exists) on addition and subtraction
   demonstrations with the demo's annotator habit (70% of answers in [0, 100)
   zero-padded, which the checker counts wrong).
2. Domain 1 = addition problems, domain 2 = subtraction problems: on-policy
   pairs from the SFT model per domain (chosen = right answer, rejected = its
   wrong greedy answer or a task mistake), DIR/data/domain_{0,1}.jsonl, and
   held-out pairs from the task's eval split: a validation set (COFS weight
   search) and a disjoint test set (the matrix), per domain.
3. Sequential LoRA-DPO over domain 1 then 2 (DIR/dpo), and OFS-DPO with COFS
   weight search (DIR/cofs_dpo). Sequential OFS-DPO is the same OFS-DPO stage
   runs, deployed as the latest fast module: COFS only changes which model is
   evaluated (by design, see jaxalign/workflows/continual.py), so it is not trained twice.
4. The forgetting matrix: held-out preference accuracy (log pi(chosen) >
   log pi(rejected)) and greedy accuracy on each domain's test problems, for
   the SFT model and after each stage, per method; DIR/forgetting.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from flax import nnx

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import sharding
from jaxalign.data import toy
from jaxalign.models import lora
from jaxalign.train import eval as eval_lib, rundir
from jaxalign.workflows import continual, run
from jaxalign.workflows import demo

OPS = ("+", "-")
DOMAIN_NAMES = ("addition", "subtraction")
BOTH = toy.ArithmeticTask(max_operand=99, ops=OPS, seed=0)
DOMAINS = tuple(toy.ArithmeticTask(max_operand=99, ops=(op,), seed=0) for op in OPS)
LORA = {"lora.rank": 8, "lora.alpha": 16.0,
        "lora.targets": ("q", "k", "v", "o", "gate", "up", "down")}
STEPS = 150


def sft_config(data_dir: str, seed: int = 0) -> ml_collections.ConfigDict:
  c = demo.sft_config(data_dir, seed)
  c.total_steps = 3000
  return c


def _set(c, overrides: dict):
  return config_lib.apply_overrides(c, overrides)


def continual_config(method: str, workdir: str, seed: int = 0) -> ml_collections.ConfigDict:
  """The two-domain run of `method` ("dpo" | "ofs_dpo" | "cofs_dpo") from DIR/sft."""
  data_dir = os.path.join(workdir, "data")
  c = demo.base_config(seed)
  c.init_from = os.path.join(workdir, "sft")
  c.reference.mode = "precompute"   # each stage's reference: its starting model
  c.data.domains = tuple(os.path.join(data_dir, f"domain_{t}.jsonl") for t in range(2))
  c.data.domain_eval_paths = tuple(os.path.join(data_dir, f"val_{t}.jsonl")
                                   for t in range(2))
  c.total_steps = STEPS
  # LoRA-DPO on domain 1, greedy addition accuracy (SFT 36.3%): lr 1e-4 42.0%,
  # 3e-4 34.7%, 1e-3 27.7% (seed 0, 300 held-out problems).
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10
  _set(c, LORA)
  if method == "dpo":
    c.loss.name = "dpo"
    c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1))
  elif method in ("ofs_dpo", "cofs_dpo"):
    c.loss.name = "ofs_dpo"
    c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, alpha=0.1, swap_interval=10))
    c.optim.slow_lr_ratio = 0.5
    c.cofs.enabled = method == "cofs_dpo"
  else:
    raise ValueError(f"unknown continual method {method!r}")
  return c


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _heldout_problems(task, num_val: int, num_test: int, seed: int):
  """Distinct eval-split problems, cut into disjoint validation and test sets."""
  seen, out = set(), []
  for p in task.problems(20 * (num_val + num_test), split="eval", seed=seed):
    if p.prompt not in seen:
      seen.add(p.prompt)
      out.append(p)
  return out[:num_val], out[num_val:num_val + num_test]


def build_data(workdir: str, sample, *, seed: int, num_train: int, num_val: int,
               num_test: int) -> dict:
  """Per-domain training pairs, validation pairs and test pairs/prompts (written as JSONL)."""
  data_dir = os.path.join(workdir, "data")
  tests = {}
  for t, task in enumerate(DOMAINS):
    problems = task.problems(num_train, split="train", seed=seed + 2 + t)
    val, test = _heldout_problems(task, num_val, num_test, seed + 11 + t)
    for name, probs in (("domain", problems), ("val", val), ("test", test)):
      prompts = [p.prompt for p in probs]
      pairs = demo.on_policy_pairs(prompts, [p.answer for p in probs],
                                   sample(prompts), seed + t)
      _write_jsonl(os.path.join(data_dir, f"{name}_{t}.jsonl"), pairs)
    tests[t] = [p.prompt for p in test]
  return tests


def _evaluate(graphdef, params, frozen, scorer, tokenizer, tests) -> list[dict]:
  """Per domain: held-out preference accuracy and greedy accuracy."""
  out = []
  for t, prompts in tests.items():
    completions = eval_lib.complete(graphdef, params, frozen, tokenizer, prompts,
                                    max_new_tokens=demo.MAX_NEW_TOKENS)
    out.append({"preference": scorer.accuracy(params, t),
                "greedy": eval_lib.accuracy(completions, prompts, BOTH.is_correct)})
  return out


def run_continual(workdir: str, *, seed: int = 0, num_train: int = 2000, num_val: int = 200,
                  num_test: int = 300, pad_noise: float = demo.PAD_NOISE,
                  progress: bool = True) -> dict:
  """Runs the whole comparison; returns (and writes to DIR/forgetting.json) the matrix."""
  start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  tokenizer = toy.build_tokenizer()

  sft_dir = os.path.join(workdir, "sft")
  sft_cfg = sft_config(data_dir, seed)
  if not os.path.isdir(os.path.join(sft_dir, "checkpoints")):
    _write_jsonl(os.path.join(data_dir, "sft.jsonl"),
                 BOTH.sft_records(num_train * 2, split="train", seed=seed, pad_noise=pad_noise))
    run.train(sft_cfg, sft_dir, progress=progress)
  sft_graph, sft_params, sft_frozen = rundir.load_run_params(sft_dir, sft_cfg)
  sample = lambda prompts: eval_lib.complete(
      sft_graph, sft_params, sft_frozen, tokenizer, prompts, max_new_tokens=demo.MAX_NEW_TOKENS)
  tests = build_data(workdir, sample, seed=seed, num_train=num_train, num_val=num_val,
                     num_test=num_test)

  spec = config_lib.resolve(continual_config("cofs_dpo", workdir, seed), jax.device_count())
  mesh = sharding.make_mesh(spec.mesh_shape)
  scorer = continual.PreferenceScorer(
      spec, mesh, tokenizer, [os.path.join(data_dir, f"test_{t}.jsonl") for t in range(2)])
  base_graph = lora.base_graphdef(spec.model_cfg)
  empty = nnx.State({})
  rows = {"SFT": [_evaluate(sft_graph, sft_params, sft_frozen, scorer, tokenizer, tests)]}
  scale = spec.lora_cfg.scale

  for method in ("dpo", "cofs_dpo"):
    mspec = config_lib.resolve(continual_config(method, workdir, seed), jax.device_count())
    run_dir = os.path.join(workdir, method)
    run.train(mspec, run_dir, progress=progress)
    base = continual.base_params(mspec, mesh)
    mods = continual.load_modules(mspec, run_dir, 1, mesh)
    names = {"dpo": ["sequential DPO (LoRA)"],
             "cofs_dpo": ["sequential OFS-DPO", "COFS-DPO", "COFS-DPO, uniform weights"]
             }[method]
    for name in names:
      rows[name] = []
      for t in range(2):
        if name == "COFS-DPO":   # weights searched on the validation pairs
          weights = continual.stage_weights(run_dir, t)
        elif name.startswith("COFS"):   # fixed weights, for comparison
          weights = [1.0 / (t + 1)] * (t + 1)
        else:   # the latest fast module alone
          weights = [0.0] * t + [1.0]
        params = continual.combined_model(base, mods[:t + 1], weights, scale=scale)
        result = _evaluate(base_graph, params, empty, scorer, tokenizer, tests)
        rows[name].append([dict(r, weights=weights) for r in result])

  summary = {"rows": rows, "domains": list(DOMAIN_NAMES), "num_test": num_test,
             "num_val": num_val, "seed": seed, "steps_per_domain": STEPS,
             "wall_time_sec": time.perf_counter() - start,
             "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"}
  if jax.process_index() == 0:
    ckpt.write_json(os.path.join(workdir, "forgetting.json"), summary)
  return summary


def format_matrix(summary: dict) -> str:
  """One table: rows = method after stage, columns = per-domain accuracies."""
  d1, d2 = summary["domains"]
  head = (f"{'model':<44} {d1 + ' pref':>14} {d2 + ' pref':>17} "
          f"{d1 + ' greedy':>16} {d2 + ' greedy':>19}  weights")
  lines = [head, "-" * len(head)]
  for name, stages in summary["rows"].items():
    for t, res in enumerate(stages):
      label = name if name == "SFT" else f"{name}, after {summary['domains'][t]}"
      w = res[0].get("weights")
      lines.append(f"{label:<44} {100 * res[0]['preference']:>13.1f}% "
                   f"{100 * res[1]['preference']:>16.1f}% {100 * res[0]['greedy']:>15.1f}% "
                   f"{100 * res[1]['greedy']:>18.1f}%  {'' if w is None else w}")
  lines.append(f"held-out test: {summary['num_test']} problems per domain; "
               f"{summary['steps_per_domain']} steps per domain; "
               f"{summary['wall_time_sec']:.0f} s on {summary['devices']}")
  return "\n".join(lines)
