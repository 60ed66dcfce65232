"""Reward-model training's own ends: the trained model's directory and its pair accuracy.

  config.loss.name = "reward_model"   (hparams: center_rewards_coefficient)
  jaxalign train --config configs/reward_model_demo.py:runs/demo --workdir runs/demo/reward_model

A reward-model loss trains in the one loop (train/loop.py) like every loss, with
its checkpoints, resume, signals, guards and held-out eval: its scalar head
(rewards.model.has_scalar_head) makes the builder build
`jaxalign.rewards.model.RewardModel` (the decoder plus a scalar head on the last
real token) in place of the LM, and the step's forward score each example's
(chosen, rejected) sequences ([B, 2]) where a policy loss gets log-probs, fed
to `losses.reward.bradley_terry_loss` (with the data's optional per-pair
`margin` column, as TRL does). The backbone starts from `config.init_from` (a
run's checkpoint, e.g. the SFT model, as TRL's RewardTrainer starts from a
causal LM), else model.hf_path, else the seeded init; the head starts random.

When the run reaches total_steps, `export` writes the model with
`save_reward_model` to `WORKDIR/reward_model`, the directory
`config.reward.name = "reward_model"` loads (`reward.options.path`), and, when
`config.data.eval_path` is set, `WORKDIR/rm_eval.json` with the held-out pair
accuracy. jaxalign.workflows.run.train runs the loop, then this.
"""

import dataclasses
import functools
import logging

import jax
import numpy as np
from flax import nnx

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import paths, sharding
from jaxalign.data import examples as examples_lib, pipeline, reading
from jaxalign.rewards import model as reward_model
from jaxalign.train import rundir

log = logging.getLogger("jaxalign")

OUTPUT_DIR = "reward_model"
EVAL_FILE = "rm_eval.json"


def _scores(graphdef, params, rest, batch):
  """[B, S] reward-model scores of each example's sequences."""
  return reward_model.sequence_scores(nnx.merge(graphdef, params, rest), batch)[0]


def pair_accuracy(model: reward_model.RewardModel, examples, *, batch_size: int) -> float:
  """Fraction of pairwise examples whose chosen sequence scores above the rejected one
  (ties count as wrong), over every example."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  score = jax.jit(functools.partial(_scores, graphdef))
  wins, total = 0, 0
  for batch in pipeline.ordered_batches(examples, batch_size):
    s = np.asarray(score(params, rest, {k: batch[k] for k in ("tokens", "attention_mask")}))
    valid = np.asarray(batch["valid"], bool)
    wins += int(((s[:, 0] > s[:, 1]) & valid).sum())
    total += int(valid.sum())
  return wins / max(total, 1)


def export(run_spec: config_lib.RunSpec, result: rundir.RunResult, *,
           devices=None) -> rundir.RunResult:
  """After a reward-model run: its latest checkpoint -> WORKDIR/reward_model (and
  rm_eval.json with data.eval_path); `result` with eval/accuracy added.

  A run stopped before total_steps (a signal, stop_after) exports nothing yet.
  """
  if result.stopped_by_signal or result.final_step < run_spec.total_steps:
    return result
  devices = jax.devices() if devices is None else list(devices)
  mesh = sharding.make_mesh(run_spec.mesh_shape, devices)
  graphdef, params, rest = rundir.load_run_params(
      result.workdir, run_spec.config, mesh, model_cfg=run_spec.model_cfg,
      hf_dir=run_spec.hf_dir)
  model = nnx.merge(graphdef, jax.device_get(params), jax.device_get(rest))
  if jax.process_index() == 0:
    reward_model.save_reward_model(model, paths.join(result.workdir, OUTPUT_DIR))
  d = run_spec.data
  if not d.eval_path:
    return result
  tokenizer = reading.load_tokenizer(run_spec.tokenizer_name)
  examples, _ = examples_lib.open_examples(
      d.eval_path, "pairwise", tokenizer, split=d.split, max_length=d.max_length,
      max_prompt_length=d.max_prompt_length, on_error=d.on_error,
      key="config.data.eval_path")
  acc = pair_accuracy(model, examples, batch_size=d.batch_size)
  if jax.process_index() == 0:
    ckpt.write_json(paths.join(result.workdir, EVAL_FILE),
                    {"eval_path": d.eval_path, "pairs": len(examples), "accuracy": acc})
  return dataclasses.replace(result, last_metrics={**result.last_metrics, "eval/accuracy": acc})
