"""Reward-model training: Bradley-Terry on pairwise data -> a `RewardModel` directory.

  config.loss.name = "reward_model"   (hparams: center_rewards_coefficient)
  jaxalign train --config configs/reward_model_demo.py:runs/demo --workdir runs/demo/reward_model

The model is `jaxalign.rewards.model.RewardModel` (the decoder plus a scalar
head on the last real token). Its backbone starts from `config.init_from` (a
run's checkpoint, e.g. the SFT model, as TRL's RewardTrainer starts from a
causal LM) or the seeded init; the head starts random. Each step scores the
chosen and rejected sequences of the batch in one forward ([B, 2] scores) and
feeds them through the registry entry's adapter to
`losses.reward.bradley_terry_loss` (an optional per-pair `margin` column of the
data is used as TRL does). The result is written with `save_reward_model` to
`WORKDIR/reward_model`, the directory `config.reward.name = "reward_model"`
loads (`reward.options.path`); `WORKDIR/rm_eval.json` holds the held-out
pair accuracy when `config.data.eval_path` is set.

Scope: parameters are sharded by `config.sharding_rules` and the batch over
the batch axes, like the policy step, but this trainer keeps no mid-run
checkpoints (a reward model on the toy task trains in seconds); a preempted
run starts again. LoRA and gradient accumulation are not used here.
"""

import functools
import logging
import os

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import losses, paths, sharding
from jaxalign.data import pipeline, prepared, schema
from jaxalign.rewards import model as reward_model
from jaxalign.train import optim, rundir
from jaxalign.train.metrics import MetricWriter
from jaxalign.data import reading

log = logging.getLogger("jaxalign")

OUTPUT_DIR = "reward_model"
EVAL_FILE = "rm_eval.json"


def _scores(graphdef, params, rest, batch):
  """[B, 2] reward-model scores of each example's (chosen, rejected) sequences."""
  model = nnx.merge(graphdef, params, rest)
  b, s, t = batch["tokens"].shape
  values = model(batch["tokens"].reshape(b * s, t), batch["attention_mask"].reshape(b * s, t))
  return values.reshape(b, s)


def make_step(graphdef, tx, loss_call):
  """(params, rest, opt_state, batch) -> (params, opt_state, metrics): one update."""
  def step(params, rest, opt_state, batch):
    extra = {k: v for k, v in batch.items() if k not in schema.SEQUENCE_KEYS}

    def objective(p):
      scores = _scores(graphdef, p, rest, batch)
      inputs = losses.LossInputs(logps=scores, ref_logps=None, lengths=None, batch=extra)
      loss, metrics, _ = loss_call(inputs, None)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
  return step


def pair_accuracy(model: reward_model.RewardModel, examples, *, batch_size: int) -> float:
  """Fraction of pairwise examples whose chosen sequence scores above the rejected one."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  score = jax.jit(functools.partial(_scores, graphdef))
  wins, total = 0, 0
  for batch in pipeline.ordered_batches(examples, batch_size):
    s = np.asarray(score(params, rest, {k: batch[k] for k in ("tokens", "attention_mask")}))
    valid = np.asarray(batch["valid"], bool)
    wins += int(((s[:, 0] > s[:, 1]) & valid).sum())
    total += int(valid.sum())
  return wins / max(total, 1)


def train(config: config_lib.RunSpec | ml_collections.ConfigDict, workdir: str, *,
          progress: bool = True, devices=None):
  """Trains a reward model per `config` (a RunSpec, or a recipe resolved here once) in
  `workdir`; returns rundir.RunResult."""
  devices = jax.devices() if devices is None else list(devices)
  run_spec = config_lib.resolve(config, len(devices))
  config = run_spec.config
  if config.get("lora", {}).get("rank", 0):
    raise config_lib.ConfigError("config.lora.rank: reward-model training trains the whole "
                                 "model; set lora.rank=0")
  if config.optim.grad_accum_steps != 1:
    raise config_lib.ConfigError("config.optim.grad_accum_steps: reward-model training "
                                 "uses 1")
  workdir = paths.resolve(workdir)
  mesh = sharding.make_mesh(run_spec.mesh_shape, devices)
  rules = run_spec.rules
  model_cfg = run_spec.model_cfg
  spec = run_spec.loss
  hf_dir = run_spec.hf_dir
  tokenizer = reading.load_tokenizer(config.data.tokenizer or hf_dir)
  reading.check_tokenizer(tokenizer, config, model_cfg.vocab_size, hf_dir)
  # Read lazily like a policy run's data (prepared sets too), or as a list (data.lazy=False).
  load = functools.partial(prepared.load_examples, fmt="pairwise", tokenizer=tokenizer,
                           split=config.data.split, max_length=config.data.max_length,
                           max_prompt_length=config.data.max_prompt_length,
                           on_error=config.data.on_error, lazy=config.data.get("lazy", True))
  examples, skipped = load(config.data.train_path)
  eval_examples = (load(config.data.eval_path, key="config.data.eval_path")[0]
                   if config.data.eval_path else None)
  if skipped:
    log.warning("skipped %d malformed records of %s", skipped, config.data.train_path)
  paths.makedirs(workdir)

  tx, schedule = optim.optimizer_from_config(config.optim, total_steps=config.total_steps)

  def make_model():
    return reward_model.RewardModel(model_cfg, rngs=nnx.Rngs(config.seed))

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
    rest_shardings = sharding.state_shardings(abstract_rest, mesh, rules)

    def init():
      return nnx.split(make_model(), nnx.Param, ...)[1:]
    params, rest = jax.jit(init, out_shardings=(param_shardings, rest_shardings))()
    if config.init_from:  # the backbone from a run's checkpoint (its params)
      # Restored into the concrete mesh's shardings (the eval_shape'd ones are abstract).
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_params["backbone"], param_shardings["backbone"])
      backbone = ckpt.restore_params(rundir.checkpoint_dir(config.init_from), target)
      params["backbone"] = backbone
    opt_state = jax.jit(tx.init)(params)

  loss_call = functools.partial(_bound_loss, spec.call, spec.fn,
                                config.loss.hparams.to_dict())
  step_fn = jax.jit(make_step(graphdef, tx, loss_call), donate_argnums=(0, 2))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  dataset = pipeline.make_dataset(examples, seed=config.seed,
                                  batch_size=config.data.batch_size // jax.process_count(),
                                  shuffle=config.data.shuffle, repeat=True)
  data_iter = iter(dataset)
  writer = MetricWriter(workdir, process_index=jax.process_index())
  last = {}
  with jax.set_mesh(mesh):
    for step in tqdm(range(config.total_steps), desc="reward_model", leave=False,
                     disable=not progress or jax.process_index() != 0):
      host = next(data_iter)
      batch = sharding.host_to_global({k: v for k, v in host.items() if k != "loss_mask"},
                                      batch_sharding)
      params, opt_state, metrics = step_fn(params, rest, opt_state, batch)
      done = step + 1
      if done % config.log_every == 0 or done == config.total_steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last["learning_rate"] = float(schedule(step))
        writer.write(done, last)
  writer.close()

  model = nnx.merge(graphdef, jax.device_get(params), jax.device_get(rest))
  out_dir = os.path.join(workdir, OUTPUT_DIR)
  if jax.process_index() == 0:
    reward_model.save_reward_model(model, out_dir)
    paths.save_pretrained(tokenizer, paths.join(workdir, "tokenizer"))
  if eval_examples is not None:
    acc = pair_accuracy(model, eval_examples, batch_size=config.data.batch_size)
    last["eval/accuracy"] = acc
    if jax.process_index() == 0:
      ckpt.write_json(paths.join(workdir, EVAL_FILE),
                      {"eval_path": config.data.eval_path, "pairs": len(eval_examples),
                       "accuracy": acc})
  return rundir.RunResult(workdir=workdir, final_step=config.total_steps, last_metrics=last)


def _bound_loss(call, fn, hparams, inputs, loss_state):
  return call(fn, inputs, loss_state, **hparams)
