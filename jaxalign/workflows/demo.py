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
   Each method's stage is its recipe, configs/<method>_demo.py (`--method`):
   get_config(workdir, seed) and RECORDS, how this module builds its data.
5. Greedy accuracy on held-out problems, before and after; DIR/summary.json.

Why the annotator habit: with clean demonstrations, a model this small is
limited by arithmetic skill rather than by preferences, and plain DPO on its
mistakes does not raise greedy accuracy (measured: 43% -> 37..44% over a few
learning rates and betas). Preference optimization moves probability between
answers the model can already produce; the habit makes that the bottleneck, as
in real demonstrations with systematic errors.
"""

import dataclasses
import importlib.util
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
from jaxalign.train import rundir
from jaxalign.workflows import iterative, run

TASK = toy.ArithmeticTask(max_operand=99, ops=("+",), seed=0)
MAX_NEW_TOKENS = 5
NUM_TRAIN = 4000
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


# The recipes of the alignment stages live in the repository's configs/, one
# <method>_demo.py each (not an installed package): beside the package in a clone
# or an editable install (`pip install -e .`).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


@dataclasses.dataclass(frozen=True)
class Records:
  """How run_demo builds a method's training file from the SFT model (build_records).

  format: "pairwise" | "unpaired" | "negatives" | "groups" | "ranked", or
    "prompts" (sampled during training: no file, the task's prompts are read directly).
  group: the SFT model's samples per prompt (negatives, groups, ranked).
  shuffle: shuffle the file's records, so that a batch's KL sequences (KTO's
    rotation within each batch-sized block) pair different prompts.
  """
  format: str
  group: int = 0
  shuffle: bool = False


def stage_config(method: str, workdir: str, seed: int, *, loss: str, hparams: dict,
                 options: dict | None = None) -> ml_collections.ConfigDict:
  """What every alignment stage shares; configs/<method>_demo.py start here.

  From the SFT checkpoint WORKDIR/sft (also the precomputed reference), on
  WORKDIR/data/<method>.jsonl, 150 steps at lr 1e-4, batch 64.
  """
  c = base_config(seed)
  c.loss.name = loss
  c.loss.hparams = ml_collections.ConfigDict(hparams)
  c.loss.options = ml_collections.ConfigDict(options or {})
  c.reference.mode = "precompute"
  c.init_from = os.path.join(workdir, "sft")
  c.data.train_path = os.path.join(workdir, "data", f"{method}.jsonl")
  c.total_steps = 150
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10
  return c


def sampled_prompts(c: ml_collections.ConfigDict, seed: int, *, reward: str,
                    reward_options: dict, temperature: float = 1.0
                    ) -> ml_collections.ConfigDict:
  """Sets a stage that samples during training: its data is only prompts and their
  right answers (the bundled task's train split, no annotator habit), its reward
  `reward`, with the demo's completion length."""
  c.data.train_path = f"toy:sft?n={NUM_TRAIN}&seed={seed + 2}"
  c.sampling.max_new_tokens = MAX_NEW_TOKENS
  c.sampling.temperature = temperature
  c.reward.name = reward
  c.reward.options = ml_collections.ConfigDict(reward_options)
  return c


def _recipe_path(method: str) -> str:
  return os.path.join(CONFIGS_DIR, f"{method}_demo.py")


def _load_module(path: str):
  name = "jaxalign_recipe_" + os.path.basename(path)[:-len(".py")]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def methods() -> list[str]:
  """The demo's methods: the configs/*_demo.py that say how their data is built."""
  if not os.path.isdir(CONFIGS_DIR):
    raise FileNotFoundError(
        f"the demo's recipes are read from {CONFIGS_DIR}, which does not exist: run the "
        "demo from a jaxalign checkout (installed with `pip install -e .`)")
  names = sorted(f[:-len("_demo.py")] for f in os.listdir(CONFIGS_DIR) if f.endswith("_demo.py"))
  return [m for m in names if hasattr(_load_module(_recipe_path(m)), "RECORDS")]


def load_recipe(method: str):
  """The module configs/<method>_demo.py: get_config(workdir, seed) and RECORDS."""
  path = _recipe_path(method)
  module = _load_module(path) if method.isidentifier() and os.path.isfile(path) else None
  if module is None or not hasattr(module, "RECORDS"):
    raise ValueError(f"unknown method {method!r}; known: {methods()}")
  return module


def aligned_config(method: str, workdir: str, seed: int = 0) -> ml_collections.ConfigDict:
  """The alignment stage of `method` (its configs/ recipe), from WORKDIR/sft."""
  return load_recipe(method).get_config(workdir, seed)


# The reward model of `--method grao_rm`: Bradley-Terry on pairs of the SFT model's
# own answers (right vs. its mistakes), backbone from the SFT checkpoint.
REWARD_MODEL = dict(steps=400, lr=3e-4, hparams=dict(center_rewards_coefficient=0.01),
                    eval_pairs=500)


def reward_model_path(workdir: str) -> str:
  """Where run_demo's reward model is written: WORKDIR/reward_model/reward_model."""
  return os.path.join(os.path.abspath(workdir), "reward_model", "reward_model")


def reward_model_config(data_dir: str, sft_dir: str, seed: int = 0) -> ml_collections.ConfigDict:
  """The reward-model stage (jaxalign.train.reward) of `--method grao_rm`."""
  c = base_config(seed)
  c.loss.name = "reward_model"
  c.loss.hparams = ml_collections.ConfigDict(REWARD_MODEL["hparams"])
  c.init_from = sft_dir
  c.data.train_path = os.path.join(data_dir, "reward_model.jsonl")
  c.data.eval_path = os.path.join(data_dir, "reward_model_eval.jsonl")
  c.total_steps = REWARD_MODEL["steps"]
  c.optim.lr = REWARD_MODEL["lr"]
  c.optim.warmup_steps = 20
  return c


def reward_model_records(problems, sample, seed: int) -> list[dict]:
  """Pairs for the reward model: the right answer against the SFT model's greedy
  answer and one temperature-1 sample where those are wrong (else a task mistake),
  so the model sees the kinds of mistakes the policy will make while sampling."""
  prompts, answers = [p.prompt for p in problems], [p.answer for p in problems]
  return (on_policy_pairs(prompts, answers, sample(prompts, 0.0, seed), seed)
          + on_policy_pairs(prompts, answers, sample(prompts, 1.0, seed + 1), seed + 1))


def _write_jsonl(path: str, records) -> None:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _complete(run_dir: str, config, tokenizer, prompts, *, temperature: float = 0.0,
              seed: int = 0) -> list[str]:
  graphdef, params, frozen = rundir.load_run_params(run_dir, config)
  return eval_lib.complete(graphdef, params, frozen, tokenizer, prompts,
                           max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, seed=seed)


def _evaluate(run_dir: str, config, tokenizer, prompts) -> tuple[float, list[str]]:
  completions = _complete(run_dir, config, tokenizer, prompts)
  return eval_lib.accuracy(completions, prompts, TASK.is_correct), completions


def _mistake(problem, completion: str, rng) -> str:
  """The model's answer when it is wrong (and non-empty), else a task mistake."""
  text = completion.strip()
  if text and not TASK.is_correct(problem.prompt, completion):
    return text
  return TASK.wrong_answers(problem, 1, rng)[0]


def on_policy_pairs(prompts, answers, completions, seed: int) -> list[dict]:
  """Chosen = right answer; rejected = the model's wrong answer, else a task mistake."""
  rng = np.random.default_rng(seed)
  return [{"prompt": p, "chosen": a, "rejected": _mistake(TASK.parse_prompt(p), c, rng)}
          for p, a, c in zip(prompts, answers, completions)]


def build_records(spec: Records, problems, sample, seed: int) -> list[dict]:
  """The method's training records from the SFT model, judged by the task's checker.

  Args:
    spec: how the method's recipe builds its data (its RECORDS).
    problems: training problems (prompt + right answer).
    sample: sample(prompts, temperature, seed) -> completions from the SFT model.
    seed: seeds sampling and the task's mistakes.
  """
  fmt = spec.format
  if fmt == "prompts":  # online / iterative methods sample during training
    return [{"prompt": p.prompt, "reference": p.answer} for p in problems]
  rng = np.random.default_rng(seed)
  prompts = [p.prompt for p in problems]
  greedy = sample(prompts, 0.0, seed)
  if fmt == "pairwise":
    return on_policy_pairs(prompts, [p.answer for p in problems], greedy, seed)
  if fmt == "unpaired":
    # Each pair split into one desirable and one undesirable example (BCO paper).
    out = []
    for pair in on_policy_pairs(prompts, [p.answer for p in problems], greedy, seed):
      out.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
      out.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return out
  k = spec.group
  samples = [sample(prompts, 1.0, seed + 1 + i) for i in range(k)]   # k x [N]
  if fmt == "negatives":
    # D2O: the human negative plus K self-generated samples, no positives.
    return [{"prompt": p.prompt, "rejected": _mistake(p, greedy[i], rng),
             "samples": [s[i].strip() or "0" for s in samples]}
            for i, p in enumerate(problems)]
  if fmt == "groups":
    out = []
    for i, p in enumerate(problems):
      completions = [s[i].strip() or "0" for s in samples]
      # GRAO's ternary judge against the reference answer y: a right answer ties
      # with y (0), a wrong one loses (-1); R(y, y) = 0 (reference_reward="zero").
      rewards = [0.0 if TASK.is_correct(p.prompt, c) else -1.0 for c in completions]
      out.append({"prompt": p.prompt, "reference": p.answer, "completions": completions,
                  "rewards": rewards})
    return out
  if fmt == "ranked":
    out = []
    for i, p in enumerate(problems):
      completions = [s[i].strip() or "0" for s in samples]
      labels = [TASK.is_correct(p.prompt, c) for c in completions]
      out.append({"prompt": p.prompt, "reference": p.answer, "completions": completions,
                  "labels": labels})
    return out
  raise ValueError(f"no demo data builder for format {fmt!r}")


def run_demo(workdir: str, *, method: str = "dpo", seed: int = 0, num_train: int = NUM_TRAIN,
             num_eval: int = 500, pad_noise: float = PAD_NOISE, progress: bool = True) -> dict:
  """Runs the whole demo; returns (and writes to DIR/summary.json) the summary.

  An SFT run already in DIR/sft (from an earlier demo with the same seed) is
  reused, so several methods can be compared on one SFT model.
  """
  start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  recipe = load_recipe(method)   # configs/<method>_demo.py; an unknown method fails here
  cfg = recipe.get_config(workdir, seed)
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  tokenizer = toy.build_tokenizer()
  eval_prompts = [p.prompt for p in TASK.problems(num_eval, split="eval", seed=seed + 1)]

  sft_dir = os.path.join(workdir, "sft")
  sft_cfg = sft_config(data_dir, seed)
  if not os.path.isdir(os.path.join(sft_dir, "checkpoints")):
    sft_records = TASK.sft_records(num_train, split="train", seed=seed, pad_noise=pad_noise)
    _write_jsonl(os.path.join(data_dir, "sft.jsonl"), sft_records)
    run.train(sft_cfg, sft_dir, progress=progress)
  sft_acc, _ = _evaluate(sft_dir, sft_cfg, tokenizer, eval_prompts)

  # The method's data, built from the SFT model's own answers on training prompts.
  problems = TASK.problems(num_train, split="train", seed=seed + 2)
  sample = lambda prompts, temperature, s: _complete(
      sft_dir, sft_cfg, tokenizer, prompts, temperature=temperature, seed=s)
  if recipe.RECORDS.format != "prompts":  # those read the task's prompts directly
    records = build_records(recipe.RECORDS, problems, sample, seed)
    if recipe.RECORDS.shuffle:
      records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))]
    _write_jsonl(os.path.join(data_dir, f"{method}.jsonl"), records)

  extra = {}
  if cfg.reward.name == "reward_model":
    rm_dir = os.path.dirname(reward_model_path(workdir))
    rm_cfg = reward_model_config(data_dir, sft_dir, seed)
    if not os.path.isfile(os.path.join(rm_dir, "rm_eval.json")):
      _write_jsonl(rm_cfg.data.train_path, reward_model_records(problems, sample, seed))
      _write_jsonl(rm_cfg.data.eval_path, TASK.pairwise_records(
          REWARD_MODEL["eval_pairs"], seed=seed + 1, split="eval"))
      run.train(rm_cfg, rm_dir, progress=progress)
    with open(os.path.join(rm_dir, "rm_eval.json")) as f:
      extra["reward_model_eval_accuracy"] = json.load(f)["accuracy"]

  run_dir = os.path.join(workdir, method)
  result = run.train(cfg, run_dir, progress=progress)
  if cfg.iterative.rounds:
    run_dir = iterative.final_run_dir(run_dir, cfg)
  aligned_acc, _ = _evaluate(run_dir, cfg, tokenizer, eval_prompts)

  summary = {
      "method": method,
      "sft_accuracy": sft_acc,
      "aligned_accuracy": aligned_acc,
      "improvement_points": 100.0 * (aligned_acc - sft_acc),
      "num_eval_problems": num_eval,
      "seed": seed,
      "final_metrics": result.last_metrics,
      "wall_time_sec": time.perf_counter() - start,
      "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
      **extra,
  }
  if jax.process_index() == 0:
    ckpt.write_json(os.path.join(workdir, f"summary_{method}.json"), summary)
    ckpt.write_json(os.path.join(workdir, "summary.json"), summary)  # the latest run
  return summary


def format_table(summary: dict) -> str:
  rows = [("model", "held-out greedy accuracy"),
          ("SFT (before)", f"{100 * summary['sft_accuracy']:.1f}%"),
          (f"{summary['method'].upper()} (after)", f"{100 * summary['aligned_accuracy']:.1f}%")]
  w = max(len(r[0]) for r in rows)
  lines = [f"{a:<{w}}  {b}" for a, b in rows]
  lines.insert(1, "-" * len(lines[0]))
  if "reward_model_eval_accuracy" in summary:
    lines.append(f"reward model: {100 * summary['reward_model_eval_accuracy']:.1f}% of "
                 "held-out pairs ranked right")
  lines.append(f"change: {summary['improvement_points']:+.1f} points on "
               f"{summary['num_eval_problems']} problems, {summary['wall_time_sec']:.0f} s")
  return "\n".join(lines)
