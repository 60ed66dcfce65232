"""Iterative self-alignment: rounds of sample -> score -> best-vs-worst pairs -> train.

  config.iterative.rounds = 2            # with a pairwise loss, e.g. loss.name = "dpo"
  jaxalign train --config configs/iterative_dpo_demo.py --workdir runs/it

The data file holds prompts with a reference answer ({prompt, reference} or
{prompt, completion}), which the reward may use. Round r (DIR/round_R):

1. samples `iterative.samples_per_prompt` completions per prompt (all prompts,
   or `prompts_per_round` of them, a fresh draw each round) from the policy
   the round starts from: `init_from` for round 0, round r-1's result after;
2. scores them with `config.reward` and keeps, per prompt, the best and the
   worst completion as (chosen, rejected) when their rewards differ
   (DIR/round_R/pairs.jsonl, with round statistics in DIR/rounds.jsonl);
3. trains `steps_per_round` steps of the configured pairwise loss from that
   policy, which is also the reference (reference.mode as configured): an
   ordinary `loop.train` run with its own checkpoints in DIR/round_R.

Resuming: a round whose run reached `steps_per_round` is done; an unfinished
round resumes from its own checkpoint with the pairs it wrote; the next round
starts after it. Sampling keys derive from config.seed and the round, so a
rerun of a round samples the same completions.
"""

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import rewards, sharding
from jaxalign.data import formats
from jaxalign.train import loop, rollout, rundir
from jaxalign.data import reading

log = logging.getLogger("jaxalign")

ROUND_STREAM = 3


def round_dir(workdir: str, r: int) -> str:
  return os.path.join(os.path.abspath(workdir), f"round_{r}")


def final_run_dir(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The run directory holding the last round's (the final) policy."""
  return round_dir(workdir, config.iterative.rounds - 1)


def round_config(config: ml_collections.ConfigDict, workdir: str,
                 r: int) -> ml_collections.ConfigDict:
  """Round r's ordinary training config: the round's pairs, from the previous policy."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.iterative.rounds = 0
  c.total_steps = config.iterative.steps_per_round
  c.data.train_path = os.path.join(round_dir(workdir, r), "pairs.jsonl")
  c.init_from = config.init_from if r == 0 else round_dir(workdir, r - 1)
  return c


def _steps_done(run_dir: str) -> int:
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    return 0
  checkpointer = ckpt.Checkpointer(directory, every=1, keep=1)
  try:
    return checkpointer.latest_step() or 0
  finally:
    checkpointer.close()


def read_prompts(config: ml_collections.ConfigDict) -> list[dict]:
  """{prompt, reference} records of the data file (reference: or completion)."""
  records = reading.read_records(config.data.train_path, split=config.data.split,
                              on_error=config.data.on_error)
  mapped = []
  for r in records:
    head = "reference" if "reference" in r else "completion"
    if head not in r:
      mapped.append({**r, "_invalid": "reference: missing field (iterative rounds read "
                     "{prompt, reference})"})
    else:
      mapped.append({**r, "completion": r[head]})
  valid, skipped = formats.validate_records(mapped, "sft", on_error=config.data.on_error)
  if skipped:
    log.warning("skipped %d malformed records of %s", skipped, config.data.train_path)
  if not valid:
    raise formats.DataError(f"{config.data.train_path}: no usable records")
  return [{"prompt": v["prompt"], "reference": v["completion"]} for v in valid]


def best_vs_worst(prompts: list, references: list, completions: list[list[str]],
                  scores: np.ndarray) -> list[dict]:
  """A pair per prompt whose best and worst completions differ in reward.

  Args:
    scores: [N, n] rewards of completions[i][j].

  Returns:
    pairwise records {prompt, chosen, rejected}; the first best and the first
    worst in sample order when there are ties; empty completions are skipped.
  """
  out = []
  for i, (p, ref) in enumerate(zip(prompts, references)):
    keep = [j for j, c in enumerate(completions[i]) if c.strip()]
    if len(keep) < 2:
      continue
    s = scores[i, keep]
    best, worst = keep[int(np.argmax(s))], keep[int(np.argmin(s))]
    if scores[i, best] > scores[i, worst]:
      out.append({"prompt": p, "chosen": completions[i][best],
                  "rejected": completions[i][worst], "reference": ref,
                  "reward_chosen": float(scores[i, best]),
                  "reward_rejected": float(scores[i, worst])})
  return out


def build_round_pairs(spec: config_lib.RunSpec, workdir: str, r: int, records, tokenizer,
                      mesh) -> dict:
  """Samples from the round's starting policy, scores, writes pairs.jsonl; returns stats.

  `spec`: the iterative run's (its ModelConfig as resolved).
  """
  config = spec.config   # the record each round's config is derived from
  c = round_config(config, workdir, r)
  if not c.init_from:
    raise config_lib.ConfigError("config.init_from: iterative rounds sample from a trained "
                                 "policy; give its run directory (e.g. the SFT run)")
  graphdef, params, frozen = rundir.load_run_params(c.init_from, config, mesh=mesh,
                                                    model_cfg=spec.model_cfg, hf_dir=spec.hf_dir)
  it = config.iterative
  rng = np.random.default_rng([config.seed, r])
  order = rng.permutation(len(records))
  if it.prompts_per_round:
    order = order[:it.prompts_per_round]
  chosen = [records[i] for i in order]
  prompts = [x["prompt"] for x in chosen]
  refs = [x["reference"] for x in chosen]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), ROUND_STREAM), r)
  with jax.set_mesh(mesh):
    completions = rollout.sample_texts(
        graphdef, params, frozen, tokenizer, prompts, sampling=config.sampling.to_dict(),
        n=it.samples_per_prompt, key=key, width=config.data.max_prompt_length,
        batch_size=config.sampling.batch_size)
  reward = rewards.get(config.reward.name, tokenizer=tokenizer,
                       **config.reward.options.to_dict())
  n = it.samples_per_prompt
  flat = [t for group in completions for t in group]
  scores = rewards.score(reward, np.repeat(np.asarray(prompts, object), n).tolist(), flat,
                         np.repeat(np.asarray(refs, object), n).tolist()).reshape(-1, n)
  pairs = best_vs_worst(prompts, refs, completions, scores)
  stats = {"round": r, "prompts": len(prompts), "pairs": len(pairs),
           "reward/mean": float(scores.mean()), "reward/best_mean": float(scores.max(1).mean())}
  if not pairs:
    raise RuntimeError(f"round {r}: no prompt had completions of different rewards; nothing "
                       "to train on (raise sampling.temperature or samples_per_prompt)")
  if jax.process_index() == 0:
    os.makedirs(round_dir(workdir, r), exist_ok=True)
    path = c.data.train_path
    with open(path + ".tmp", "w") as f:
      for p in pairs:
        f.write(json.dumps(p) + "\n")
    os.replace(path + ".tmp", path)
    with open(os.path.join(os.path.abspath(workdir), "rounds.jsonl"), "a") as f:
      f.write(json.dumps(stats) + "\n")
  return stats


def train_rounds(run_spec: config_lib.RunSpec, workdir: str, *, progress: bool = True,
                 devices=None, stop_after: int | None = None) -> rundir.RunResult:
  """Runs (or resumes) every round; returns the last round's RunResult.

  `run_spec`: the iterative run's (config.resolve); each round's own config
  (round_config, derived from its record) is resolved once and its spec passed down.
  """
  devices = jax.devices() if devices is None else list(devices)
  run_spec = config_lib.resolve(run_spec, len(devices))   # another device count: refused
  config = run_spec.config
  mesh = sharding.make_mesh(run_spec.mesh_shape, devices)
  tokenizer = reading.load_tokenizer(run_spec.data.tokenizer)
  records = read_prompts(config)
  steps = config.iterative.steps_per_round
  result = None
  budget = stop_after
  for r in range(config.iterative.rounds):
    rdir = round_dir(workdir, r)
    done = _steps_done(rdir)
    if done >= steps:
      continue
    if not os.path.exists(os.path.join(rdir, "pairs.jsonl")):
      stats = build_round_pairs(run_spec, workdir, r, records, tokenizer, mesh)
      log.info("round %d: %d pairs from %d prompts, mean reward %.3f", r, stats["pairs"],
               stats["prompts"], stats["reward/mean"])
    round_spec = config_lib.derived_from(
        config_lib.resolve(round_config(config, workdir, r), len(devices)), run_spec)
    result = loop.train(round_spec, rdir, progress=progress, devices=devices,
                        stop_after=budget)
    if budget is not None:
      budget -= result.final_step - done
    if result.stopped_by_signal or result.final_step < steps or budget == 0:
      return result
  if result is None:  # every round was already done
    last = final_run_dir(workdir, config)
    return rundir.RunResult(workdir=last, final_step=_steps_done(last), last_metrics={})
  return result
