"""The host loop: config -> mesh -> data -> state -> jitted step -> logs and checkpoints.

Reads top to bottom. Everything inside `step_fn` is traced once; the host
syncs with the devices only every `log_every` steps and at checkpoints.
"""

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import fingerprint, guards, runlock
from jaxalign import flops as flops_lib
from jaxalign import losses
from jaxalign import paths
from jaxalign import sharding
from jaxalign.data import formats, packing, pipeline, prepared, reading, tables
from jaxalign.models import hf, lora
from jaxalign.train import build as build_lib
from jaxalign.train import heldout, optim, signals, step as step_lib
from jaxalign.train.metrics import MetricWriter

log = logging.getLogger("jaxalign")

# Host-side bookkeeping columns of a batch that never go to the device.
HOST_ONLY_KEYS = ("index", "valid")


class NonFiniteError(RuntimeError):
  """The loss or a gradient was not finite; the last good checkpoint is kept."""


class ResumeMismatchError(config_lib.ConfigError):
  """The config's objective or model shape differs from the checkpoint it would resume."""


@dataclasses.dataclass
class RunResult:
  workdir: str
  final_step: int
  last_metrics: dict[str, float]
  stopped_by_signal: bool = False
  signal_name: str = ""      # "SIGTERM" or "SIGINT" when stopped by a signal
  already_complete: bool = False   # the workdir's run had already reached total_steps


# SIGTERM and SIGINT: stop at the next step boundary with a checkpoint.
_Preemption = signals.Preemption


def load_eval_set(config, fmt: str, tokenizer) -> list[dict]:
  """data.eval_path's examples in the loss's format `fmt`, tokenized like the training set.

  Raises:
    ConfigError: naming config.data.eval_path, when it cannot be read, is not `fmt`
      data, or has fewer examples than one global batch.
  """
  d = config.data
  train_key = "config.data.train_path: "   # read_records' messages name the training key
  try:
    examples, skipped = prepared.load_examples(
        d.eval_path, fmt, tokenizer, split=d.split, max_length=d.max_length,
        max_prompt_length=d.max_prompt_length, on_error=d.on_error, group_size=d.group_size,
        kl_chunk_size=d.batch_size // jax.process_count(), key="config.data.eval_path")
  except (config_lib.ConfigError, formats.DataError) as e:
    text = str(e)
    text = text[len(train_key):] if text.startswith(train_key) else text
    raise config_lib.ConfigError(
        f"config.data.eval_path: not usable as {fmt!r} data for loss {config.loss.name!r}: "
        f"{reading.first_line(ValueError(text))}") from None
  if skipped:
    log.warning("skipped %d malformed records of %s", skipped, d.eval_path)
  if heldout.num_batches(len(examples), d.batch_size) == 0:
    raise config_lib.ConfigError(
        f"config.data.eval_path: {len(examples)} usable examples make no batch of "
        f"data.batch_size={d.batch_size}")
  return examples


# Assembled in train/build.py; kept here under their old names for callers.
build_model_and_state = build_lib.build_model_and_state
initial_state = build_lib.initial_state


def map_examples(examples, fn, *, mesh, rules, batch_size: int, desc: str,
                 progress: bool = True, operands=(), pack=None) -> np.ndarray:
  """Runs a jitted `fn(*operands, batch) -> [B, ...]` over every example once, in order.

  Each process reads its own block of the data; `fn`'s results, with the
  dataset indices, come back replicated, so every process fills the full table.
  `operands` (e.g. the params) are passed to the jitted function, not closed
  over: an array spanning other processes' devices cannot be a constant.
  `pack` (data.packing): batch, valid -> the packed batch `fn` reads; the
  padded tail's empty slots then place no tokens.
  """
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def run(operands, batch):
    return fn(*operands, batch), batch["index"], batch["valid"]

  table = None
  filled = np.zeros(len(examples), bool)
  process_batch = batch_size // jax.process_count()
  for batch in tqdm(list(pipeline.ordered_batches(examples, process_batch)), desc=desc,
                    leave=False, disable=not progress or jax.process_index() != 0):
    arrays = {k: batch[k] for k in ("tokens", "attention_mask", "loss_mask")}
    if pack is not None:
      arrays = pack(arrays, np.asarray(batch["valid"], bool))
    arrays["index"] = np.asarray(batch["index"], np.int32)
    arrays["valid"] = np.asarray(batch["valid"], np.int32)
    values, index, valid = jax.device_get(
        run(operands, sharding.host_to_global(arrays, batch_sharding)))
    keep = np.asarray(valid).astype(bool)
    if table is None:
      table = np.zeros((len(examples),) + values.shape[1:], np.float32)
    table[np.asarray(index)[keep]] = np.asarray(values)[keep]
    filled[np.asarray(index)[keep]] = True
  if not filled.all():
    raise RuntimeError(f"{desc}: no value for {int((~filled).sum())} examples")
  return table


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          devices=None, stop_after: int | None = None) -> RunResult:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint if any.

  Args:
    config: a validated recipe (see jaxalign.config.defaults()).
    workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, tokenizer/.
    progress: show a progress bar (process 0 only).
    devices: devices for the mesh (default all).
    stop_after: leave after this many steps of this invocation, with a checkpoint
      (for time-sliced schedulers); the run continues on the next call.
  """
  if config.get("iterative", {}).get("rounds", 0) > 0:  # rounds of runs, each through here
    from jaxalign.train import iterative
    return iterative.train_rounds(config, workdir, progress=progress, devices=devices,
                                  stop_after=stop_after)
  if config.loss.name == "reward_model":   # a scalar-head model: train/reward.py
    from jaxalign.train import reward
    return reward.train(config, workdir, progress=progress, devices=devices)
  if config.data.get("domains"):   # one stage per domain: train/continual.py
    from jaxalign.train import continual
    return continual.train(config, workdir, progress=progress, devices=devices)
  # SIGTERM is caught from here on: one arriving while data loads or the step
  # compiles stops the run at the first step boundary, with a checkpoint.
  with _Preemption() as preempt, runlock.RunLock() as lock:
    return _train(config, workdir, progress=progress, devices=devices,
                  stop_after=stop_after, preempt=preempt, lock=lock)


def _train(config, workdir, *, progress, devices, stop_after, preempt,
           lock=None) -> RunResult:
  devices = jax.devices() if devices is None else list(devices)
  config_lib.validate(config, len(devices))
  workdir = paths.resolve(workdir)   # a local directory or a gs:// URL
  is_main = jax.process_index() == 0
  if config.init_from and not paths.isdir(config.init_from):
    raise config_lib.ConfigError(f"config.init_from: {config.init_from} is not a directory")

  # Mesh and the pieces fixed by the config.
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model_cfg = config_lib.model_config(config)
  hf_dir = config_lib.hf_model_dir(config)
  spec = losses.get(config.loss.name)
  frozen_ref = spec.needs_ref and config.reference.mode == "frozen"
  precompute_ref = spec.needs_ref and config.reference.mode == "precompute"
  # Online methods sample their groups inside the run (jaxalign.train.online).
  from jaxalign.train import online as online_lib
  online = online_lib.source_for(config)
  lora_cfg = lora.config_from(config.get("lora"))
  modules = spec.modules

  # Data: read, validate and tokenize everything before any compile, and before
  # anything is written: a bad config or bad data leaves no workdir behind.
  tokenizer = reading.load_tokenizer(config.data.tokenizer or hf_dir)
  reading.check_tokenizer(tokenizer, config, model_cfg.vocab_size, hf_dir)
  # A prepared (tokenized) set is opened lazily: no tokenizer work (data/prepared.py).
  examples, num_skipped = prepared.load_examples(
      config.data.train_path, online.data_format if online else spec.data, tokenizer,
      split=config.data.split, max_length=config.data.max_length,
      max_prompt_length=config.data.max_prompt_length, on_error=config.data.on_error,
      group_size=config.data.group_size, map_record=online.map_record if online else None,
      kl_chunk_size=config.data.batch_size // jax.process_count(),
      lazy=config.data.get("lazy", False),
      lazy_ok=not (config.data.packing or config.data.get("share_prompt", False)))
  if num_skipped:
    log.warning("skipped %d malformed records of %s", num_skipped, config.data.train_path)
  # The held-out set is in the loss's own format (for online methods too: fixed samples).
  eval_examples = (load_eval_set(config, spec.data, tokenizer) if config.data.eval_path
                   else None)
  data_fp = fingerprint.compute(examples, tokenizer, train_path=config.data.train_path,
                                settings=fingerprint.settings_from_config(
                                    config, online.data_format if online else spec.data))
  data_changed = fingerprint.check_resume(workdir, data_fp,
                                          allow_change=config.allow_config_change)
  paths.makedirs(workdir)
  if lock is not None and is_main:
    lock.acquire(workdir)   # runlock.LockedError when another live run holds it
  if is_main and (data_changed or not fingerprint.has_checkpoints(workdir)):
    fingerprint.write(paths.join(workdir, fingerprint.RUN_FILE), data_fp)
  if is_main:
    paths.save_pretrained(tokenizer, paths.join(workdir, "tokenizer"))
    ckpt.write_json(paths.join(workdir, "data_stats.json"), {
        "train_path": config.data.train_path, "records": len(examples) + num_skipped,
        "examples": len(examples), "skipped": num_skipped})

  # State, optimizer and jitted steps: abstract first (train/build.py, as `plan` builds
  # them), then the real state, already sharded.
  built = build_lib.build(config, mesh, model_cfg=model_cfg)
  tx, graphdef, init_fn = built.tx, built.graphdef, built.init_fn
  abstract_state, state_shardings = built.abstract_state, built.state_shardings
  # LoRA checkpoints hold the adapters, their optimizer state, step, RNG and loss
  # state; the base always comes from the config's source (seed or init_from).
  saved_part = built.saved_part

  checkpointer = ckpt.Checkpointer(
      paths.join(workdir, "checkpoints"), every=config.checkpoint.every,
      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  checkpointer.check_writable()
  fallback = bool(config.checkpoint.get("fallback", False))
  resume_step = _resume_step(checkpointer, config, saved_part(abstract_state), fallback=fallback)
  ref_table = None
  if precompute_ref:   # None: compute it from the initial policy (below)
    ref_table = fingerprint.reference_plan(
        paths.join(workdir, "ref_logps.npy"), data_fp, resuming=resume_step is not None,
        allow_change=config.allow_config_change, data_changed=data_changed)
  eval_ref_path, eval_fp, eval_table = paths.join(workdir, heldout.REF_FILE), None, None
  if precompute_ref and eval_examples is not None:
    eval_fp = fingerprint.compute(eval_examples, tokenizer, train_path=config.data.eval_path,
                                  settings=fingerprint.settings_from_config(config, spec.data))
    # The eval set does not steer training: a missing or stale table is recomputed.
    eval_table = fingerprint.reference_plan(eval_ref_path, eval_fp, resuming=False,
                                            allow_change=True, data_changed=False)
  # The initial policy is needed on a fresh run, and on a resume whose reference is recomputed.
  fresh_init = resume_step is None or (precompute_ref and (
      ref_table is None or (eval_examples is not None and eval_table is None)))
  process_batch = config.data.batch_size // jax.process_count()
  pack = _packer(config, examples, tokenizer, process_batch, mesh) if config.data.packing else None
  if config.data.get("share_prompt", False):   # the prompt once per example
    pack = packing.make_sharer(prompt_length=config.data.max_prompt_length,
                               max_length=config.data.max_length)

  with jax.set_mesh(mesh):
    # Starting parameters: a resumed run's come from its checkpoint (below), else
    # init_from's checkpoint, else the HF checkpoint, else the seeded random init.
    # With LoRA those are the frozen base, and the adapters start fresh.
    if lora_cfg.enabled:
      state = jax.jit(init_fn, out_shardings=state_shardings)()
      state = _lora_init(state, config, abstract_state, tx, state_shardings, modules,
                         fresh=fresh_init)
    else:
      params = None
      if fresh_init and config.init_from:
        params = ckpt.restore_params(_checkpoint_dir(config.init_from), abstract_state.params)
      elif fresh_init and hf_dir:
        params = hf.load_state(hf_dir, model_cfg, abstract_state.params)
      state = initial_state(init_fn, tx, state_shardings, params, keep_reference=frozen_ref)

    # Reference log-probs of the initial policy, computed once and kept beside the run.
    if precompute_ref:
      ref_path = paths.join(workdir, "ref_logps.npy")
      table = ref_table
      need_eval = eval_examples is not None and eval_table is None
      if table is None or need_eval:
        # The initial policy; OFS-DPO's modules start identical, the first stands for both.
        policy = state.params[modules[0]] if modules else state.params
        initial_logps = functools.partial(
            map_examples, fn=functools.partial(step_lib.batch_logps_only, graphdef,
                                               chunk_size=config.logprob_chunk_size,
                                               batch_axes=sharding.batch_axes(rules)),
            operands=(policy, state.frozen), mesh=mesh, rules=rules,
            batch_size=config.data.batch_size, progress=progress, pack=pack)
        if (table is None and need_eval and pack is None and isinstance(examples, list)
            and isinstance(eval_examples, list) and examples[0]["tokens"].shape == eval_examples[0]["tokens"].shape):
          # One pass, one compile, over both sets: rows do not interact.
          both = initial_logps(examples + eval_examples, desc="reference log-probs")
          table, eval_table = both[:len(examples)], both[len(examples):]
        else:
          if table is None:
            table = initial_logps(examples, desc="reference log-probs")
          if need_eval:
            eval_table = initial_logps(eval_examples, desc="eval reference log-probs")
        if is_main and ref_table is None:
          paths.save_npy(ref_path, table)
          fingerprint.write(fingerprint.reference_fingerprint_path(ref_path), data_fp)
        if is_main and need_eval:
          paths.save_npy(eval_ref_path, eval_table)
          fingerprint.write(fingerprint.reference_fingerprint_path(eval_ref_path), eval_fp)
      examples = tables.with_column(examples, "ref_logps", table)   # row i by example id
      if eval_examples is not None:   # the held-out set's, from the same initial policy
        eval_examples = tables.with_column(eval_examples, "ref_logps", eval_table)

    # The loss's own host-side preparation (e.g. BCO's UDM weights), once.
    if spec.prepare is not None:
      examples = spec.prepare(
          examples, seed=config.seed, **config.loss.options.to_dict(),
          prompt_embeddings=lambda: map_examples(
              examples, functools.partial(step_lib.prompt_embeddings, graphdef),
              operands=(state.params, state.frozen), mesh=mesh, rules=rules,
              batch_size=config.data.batch_size, desc="prompt embeddings", progress=progress))
      if eval_examples is not None:
        eval_examples = spec.prepare(
            eval_examples, seed=config.seed, **config.loss.options.to_dict(),
            prompt_embeddings=lambda: map_examples(
                eval_examples, functools.partial(step_lib.prompt_embeddings, graphdef),
                operands=(state.params, state.frozen), mesh=mesh, rules=rules,
                batch_size=config.data.batch_size, desc="eval prompt embeddings",
                progress=progress))

  dataset = pipeline.make_dataset(examples, seed=config.seed, batch_size=process_batch,
                                  shuffle=config.data.shuffle, repeat=True,
                                  add_index=online is not None,
                                  keep_blocks=spec.data == "unpaired_kl")  # KTO's KL pairs
  data_iter = iter(dataset)
  if resume_step is not None:   # on changed data the iterator starts over
    restored, resume_step = _restore(checkpointer, resume_step, saved_part(abstract_state),
                                     None if data_changed else data_iter, config,
                                     fallback=fallback)
    state = restored.replace(frozen=state.frozen) if lora_cfg.enabled else restored
    log.info("resumed from step %d in %s", resume_step, checkpointer.directory)

  step_fn = built.step_fn
  held_out = (heldout.HeldOut(eval_examples, built.eval_fn, batch_size=config.data.batch_size,
                              batch_sharding=built.batch_sharding,
                              keep_blocks=spec.data == "unpaired_kl")
              if eval_examples is not None else None)

  expand = online.bind(graphdef=graphdef, tokenizer=tokenizer, workdir=workdir,
                       examples=examples) if online else None
  resolved = config.to_dict()
  start = int(resume_step or 0)
  if start >= config.total_steps:
    checkpointer.close()
    return RunResult(workdir=workdir, final_step=start, last_metrics={},
                     already_complete=True)
  # resume_step: rows a killed run logged past its last checkpoint are dropped.
  writer = MetricWriter(workdir, process_index=jax.process_index(), resume_step=start)
  divergence = guards.DivergenceGuard.from_config(config)
  preempt.wait_for_writes = checkpointer.wait
  last: dict[str, float] = {}
  good_nonfinite = int(jax.device_get(state.num_nonfinite))
  bar = tqdm(total=config.total_steps, initial=start, desc=config.loss.name,
             disable=not (progress and is_main), dynamic_ncols=True)
  stopped = False
  window_tokens, window_start = 0, time.perf_counter()
  # perf/model_tflops_per_device and perf/mfu over real tokens (docs/performance.md).
  perf = flops_lib.Utilization.for_devices(model_cfg, devices, frozen_reference=frozen_ref,
                                           lora=lora_cfg.enabled,
                                           policy_passes=max(1, len(modules)))
  window_flops = 0.0
  batch_sharding = sharding.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh):
    end = config.total_steps if stop_after is None else min(config.total_steps,
                                                            start + stop_after)
    for step in range(start, end):
      host_batch, host_metrics = next(data_iter), {}
      if expand is not None:  # online: sample from the live policy, score, group
        host_batch, host_metrics = expand(state, host_batch, step)
      if pack is not None:    # data.packing / share_prompt: the same examples, new layout
        host_batch = pack(host_batch)
      real = packing.sequence_mask(host_batch)
      window_tokens += int(real.sum()) * jax.process_count()
      window_flops += perf.batch_flops(real) * jax.process_count()
      batch = sharding.host_to_global(
          {k: v for k, v in host_batch.items() if k not in HOST_ONLY_KEYS}, batch_sharding)
      state, metrics = step_fn(state, batch)
      done = step + 1
      bar.update(1)

      # Read the flag once: a SIGTERM landing later in this iteration must not
      # stop the loop without the save decided here.
      stop = preempt.requested
      is_log_step = done % config.log_every == 0 or done == end
      eval_metrics = {}
      if held_out is not None and ((config.eval_every and done % config.eval_every == 0)
                                   or done == config.total_steps):
        eval_metrics = held_out.evaluate(state)
      will_save = checkpointer.should_save(done) or done == end or stop
      if is_log_step or will_save:
        metrics, num_nonfinite = jax.device_get((metrics, state.num_nonfinite))
        if int(num_nonfinite) > good_nonfinite and not config.skip_nonfinite:
          checkpointer.wait()
          good = checkpointer.latest_step()
          raise NonFiniteError(
              f"non-finite loss or gradient at or before step {done} (loss={metrics['loss']}); "
              + (f"last good checkpoint: step {good} in {checkpointer.directory}"
                 if good is not None else "no checkpoint was written before it"))
        divergence.check(done, metrics, checkpointer)   # guards.DivergenceError
        elapsed = time.perf_counter() - window_start
        last = {k: float(v) for k, v in metrics.items()}
        last["tokens_per_sec"] = window_tokens / max(elapsed, 1e-9)
        last.update(perf.metrics(window_flops, elapsed))
        last["nonfinite_steps"] = float(num_nonfinite)
        last.update(host_metrics)
        window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
      last.update(eval_metrics)
      if is_log_step or eval_metrics:   # an eval step between log steps: eval/* alone
        writer.write(done, last if is_log_step else eval_metrics)
        bar.set_postfix({k: f"{last[k]:.3g}" for k in (
            "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "eval/loss", "eval/rewards/accuracies", "learning_rate",
            "grad_norm", "tokens_per_sec") if k in last}, refresh=False)
      if will_save:
        preempt.in_save = True
        checkpointer.save(done, saved_part(state), data_iter, resolved,
                          force=done == end or stop)
        preempt.in_save = False
      if stop:
        log.warning("%s: saved a checkpoint at step %d and stopped", preempt.signal_name, done)
        stopped = True
        break
  bar.close()
  checkpointer.close()
  writer.close()
  return RunResult(workdir=workdir, final_step=int(jax.device_get(state.step)),
                   last_metrics=last, stopped_by_signal=stopped,
                   signal_name=preempt.signal_name if stopped else "")


def _packer(config, examples, tokenizer, process_batch, mesh):
  """data.packing: the run's batch -> packed batch function (jaxalign/data/packing.py).

  One pack group per batch shard and micro-batch, so each group's rows sit on
  the device, and in the micro-batch, of its examples.
  """
  axes = sharding.batch_axes(tuple(tuple(r) for r in config.sharding_rules)) or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  global_groups = int(np.prod([mesh.shape[a] for a in axes])) * config.optim.grad_accum_steps
  if global_groups % jax.process_count():
    raise config_lib.ConfigError(
        f"config.data.packing: {global_groups} pack groups (batch shards x grad_accum_steps) "
        f"do not split over {jax.process_count()} processes")
  pad = tokenizer.pad_token_id
  _, pack = packing.make_packer(
      examples, process_batch=process_batch, num_groups=global_groups // jax.process_count(),
      global_groups=global_groups,
      row_length=config.data.pack_length or config.data.max_length,
      num_buckets=config.data.pack_buckets, seed=config.seed,
      pad_id=(tokenizer.eos_token_id or 0) if pad is None else pad,
      process_count=jax.process_count())
  return pack


# Resolved-config keys compared before resuming: the objective may change only
# with config.allow_config_change; the state's structure (model architecture,
# data format, a frozen reference copy) never. ModelConfig.dtype, .remat
# and .attention are compute choices and may change freely.
OBJECTIVE_KEYS = ("loss.name", "loss.hparams", "loss.options", "reward.name", "reward.options",
                  "online.regenerate_every", "sampling.max_new_tokens", "sampling.temperature",
                  "sampling.top_k", "sampling.top_p")
FREE_MODEL_FIELDS = ("dtype", "remat", "attention")


def _flat(d, prefix: str) -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}"))
  return out


def _structure(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Config facts that fix the train state's shapes: model fields, data format, reference."""
  model = config_lib.model_config(c).to_dict()
  out = {f"model.{k}": (tuple(v) if isinstance(v, list) else v)
         for k, v in model.items() if k not in FREE_MODEL_FIELDS}
  out["data format"] = losses.get(c.loss.name).data
  out["reference.mode"] = c.reference.mode
  if c.reference.get("sync_steps", 0):  # absent (older configs) and 0 read the same
    out["reference.sync"] = (c.reference.sync_steps, c.reference.get("sync_alpha"))
  online = c.get("online")
  if online is not None and online.get("enabled"):
    out["online.samples_per_prompt"] = online.get("samples_per_prompt")
  lora_cfg = lora.config_from(c.get("lora"))
  if lora_cfg.enabled:  # absent (older configs) and rank 0 read the same
    out["lora.rank"], out["lora.targets"] = lora_cfg.rank, lora_cfg.targets
    out["loss modules"] = losses.get(c.loss.name).modules
  return out


def check_resume_config(saved: dict[str, Any], config: ml_collections.ConfigDict, *,
                        where: str) -> None:
  """Refuses to resume when the objective or the state's shapes changed since `saved`.

  Raises:
    ResumeMismatchError: one line naming each differing key as `key old -> new`.
  """
  old_cfg = ml_collections.ConfigDict(saved)
  try:
    old_structure = _structure(old_cfg)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ResumeMismatchError(f"cannot resume from {where}: its saved config does not "
                              f"describe a model this version can build ({reading.first_line(e)})")
  model_saved = saved.get("model") or {}
  if "scan_layers" not in model_saved and "scan_layers" not in (model_saved.get("overrides") or {}):
    # Saved before the layers were scanned: its parameters have the unrolled layout.
    old_structure["model.scan_layers"] = False
  new_structure = _structure(config)
  shape_diffs = [f"{k} {old_structure.get(k)!r} -> {new_structure.get(k)!r}"
                 for k in sorted(set(old_structure) | set(new_structure))
                 if old_structure.get(k) != new_structure.get(k)]
  old_obj, new_obj = {}, {}
  for key in OBJECTIVE_KEYS:
    section, _, name = key.partition(".")
    if section not in saved:  # a checkpoint from before the section existed
      continue
    old_obj.update(_flat(saved.get(section, {}).get(name, "<absent>"), key))
    new_obj.update(_flat(config.to_dict()[section][name], key))
  for d in (old_obj, new_obj):  # JSON turned tuples into lists
    d.update({k: tuple(v) for k, v in d.items() if isinstance(v, list)})
  objective_diffs = [f"{k} {old_obj.get(k, '<absent>')!r} -> {new_obj.get(k, '<absent>')!r}"
                     for k in sorted(set(old_obj) | set(new_obj))
                     if old_obj.get(k, "<absent>") != new_obj.get(k, "<absent>")]
  if shape_diffs:
    raise ResumeMismatchError(
        f"cannot resume from {where}: the model or data format differs from the "
        f"checkpoint's: {', '.join(shape_diffs + objective_diffs)}; use a new workdir "
        "(or config.init_from to start from its parameters)")
  if objective_diffs and not config.get("allow_config_change", False):
    raise ResumeMismatchError(
        f"cannot resume from {where}: the objective differs from the checkpoint's: "
        f"{', '.join(objective_diffs)}; set config.allow_config_change=True to change "
        "it deliberately")
  if objective_diffs:
    log.warning("resuming from %s with a changed objective: %s", where,
                ", ".join(objective_diffs))


def _earlier_steps(checkpointer: ckpt.Checkpointer, step: int) -> list[int]:
  return sorted((s for s in checkpointer.all_steps() if s < step), reverse=True)


def _previous_good(checkpointer: ckpt.Checkpointer, step: int, abstract_state,
                   data_iter=None) -> int | None:
  """The newest step before `step` whose config, state (and data iterator) load."""
  for earlier in _earlier_steps(checkpointer, step):
    try:
      checkpointer.restore_config(earlier)
      checkpointer.restore(earlier, abstract_state, data_iter)
      return earlier
    except ckpt.CorruptCheckpointError:
      continue
  return None


def _corrupt_error(e: ckpt.CorruptCheckpointError, checkpointer: ckpt.Checkpointer,
                   abstract_state, data_iter=None) -> ckpt.CorruptCheckpointError:
  """`e` completed with the previous good step and the way to fall back to it."""
  good = _previous_good(checkpointer, e.step, abstract_state, data_iter)
  if good is None:
    hint = (f"no earlier checkpoint loads; move {paths.join(checkpointer.directory, str(e.step))} "
            "away to start over, or use a new workdir")
  else:
    hint = (f"previous good checkpoint: step {good}; rerun with "
            f"--config.checkpoint.fallback=True to resume from it (the unreadable steps are "
            f"moved to {checkpointer.directory}.corrupt)")
  return ckpt.CorruptCheckpointError(f"{e}; {hint}", step=e.step)


def _resume_step(checkpointer: ckpt.Checkpointer, config, abstract_state, *,
                 fallback: bool) -> int | None:
  """The step to resume from (None: a fresh run), its saved config checked against `config`.

  An unreadable saved config is a corrupt step: without `fallback` that stops the
  run (CorruptCheckpointError naming the previous good step); with it the newest
  earlier step whose config loads is taken.
  """
  latest = checkpointer.latest_step()
  if latest is None:
    return None
  for step in [latest] + _earlier_steps(checkpointer, latest):
    try:
      saved = checkpointer.restore_config(step)
    except ckpt.CorruptCheckpointError as e:
      if not fallback:
        raise _corrupt_error(e, checkpointer, abstract_state) from e
      log.warning("%s; checkpoint.fallback: trying the step before it", e)
      continue
    check_resume_config(saved, config, where=f"step {step} in {checkpointer.directory}")
    return step
  raise ckpt.CorruptCheckpointError(
      f"no checkpoint in {checkpointer.directory} can be read; use a new workdir", step=latest)


def _restore(checkpointer: ckpt.Checkpointer, step: int, abstract_state, data_iter, config, *,
             fallback: bool):
  """(state, step) restored from `step`; with `fallback`, from the newest step that loads.

  Steps after the one restored (unreadable ones) are moved aside to DIR.corrupt/
  with a warning, so the resumed run's own checkpoints take their numbers.
  """
  for candidate in [step] + _earlier_steps(checkpointer, step):
    try:
      if candidate != step:   # `step`'s config was checked by _resume_step
        check_resume_config(checkpointer.restore_config(candidate), config,
                            where=f"step {candidate} in {checkpointer.directory}")
      state = checkpointer.restore(candidate, abstract_state, data_iter)
      break
    except ckpt.CorruptCheckpointError as e:
      if not fallback:
        raise _corrupt_error(e, checkpointer, abstract_state, data_iter) from e
      log.warning("%s; checkpoint.fallback: trying the step before it", e)
  else:
    raise ckpt.CorruptCheckpointError(
        f"no checkpoint in {checkpointer.directory} can be read; use a new workdir", step=step)
  bad = [s for s in checkpointer.all_steps() if s > candidate]
  if bad:
    aside = checkpointer.set_aside(bad)
    log.warning("checkpoint.fallback: resumed from step %d; the unreadable steps %s are moved "
                "to %s", candidate, bad, aside)
  return state, candidate


def _checkpoint_dir(path: str) -> str:
  """A run directory or its checkpoints/ subdirectory -> the checkpoints directory."""
  sub = paths.join(path, "checkpoints")
  return sub if paths.isdir(sub) else path


def _lora_base(config, abstract_frozen, frozen):
  """The frozen base of a LoRA run: init_from's parameters, else the HF checkpoint
  of model.hf_path, else the seed init `frozen`."""
  if config.init_from:
    return ckpt.restore_params(_checkpoint_dir(config.init_from), abstract_frozen)
  hf_dir = config_lib.hf_model_dir(config)
  if hf_dir:
    return hf.load_state(hf_dir, config_lib.model_config(config), abstract_frozen)
  return frozen


def _lora_init(state, config, abstract_state, tx, state_shardings, modules, *, fresh: bool):
  """A LoRA state's base from the config's source; on a fresh run, adapters from
  lora.init_adapters (every module starts from the same stored adapter)."""
  state = state.replace(frozen=_lora_base(config, abstract_state.frozen, state.frozen))
  if fresh and config.lora.init_adapters:
    one = abstract_state.params[modules[0]] if modules else abstract_state.params
    adapters = lora.load_adapters(config.lora.init_adapters, one)
    params = ({m: jax.tree.map(jnp.copy, adapters) for m in modules} if modules
              else adapters)
    state = state.replace(params=params, opt_state=jax.jit(
        tx.init, out_shardings=state_shardings.opt_state)(params))
    if state.ref_params is not None:  # a synced reference starts as the policy
      state = state.replace(ref_params=jax.tree.map(jnp.copy, params))
  return state


def load_run_params(workdir: str, config: ml_collections.ConfigDict, mesh=None):
  """(graphdef, params, frozen) of the latest checkpoint of a finished run.

  A LoRA run's model comes back merged: the base graph and base + adapter
  weights (OFS-DPO: the fast module, the one deployed), with nothing frozen.
  """
  mesh = mesh or sharding.make_mesh(config.mesh.shape)
  rules = tuple(tuple(r) for r in config.sharding_rules)
  model_cfg = config_lib.model_config(config)
  tx, _ = optim.make_optimizer(lr=1.0, warmup_steps=1, total_steps=2)
  lora_cfg = lora.config_from(config.get("lora"))
  modules = losses.get(config.loss.name).modules if lora_cfg.enabled else ()
  graphdef, abstract_state, _, init_fn = build_model_and_state(
      model_cfg, tx, mesh, rules, seed=config.seed, keep_reference=False,
      lora_config=lora_cfg, modules=modules)
  base_graphdef = lora.base_graphdef(model_cfg) if lora_cfg.enabled else None
  with jax.set_mesh(mesh):
    params = ckpt.restore_params(_checkpoint_dir(workdir), abstract_state.params)
    frozen = jax.jit(lambda: init_fn().frozen,
                     out_shardings=jax.tree.map(lambda a: a.sharding, abstract_state.frozen))()
    if lora_cfg.enabled:
      base = _lora_base(config, abstract_state.frozen, frozen)
      adapters = params[modules[0]] if modules else params
      merged = jax.jit(functools.partial(lora.merge, scale=lora_cfg.scale))(base, adapters)
      return base_graphdef, merged, nnx.State({})
  return graphdef, params, frozen


def resolved_config(workdir: str) -> dict[str, Any]:
  """The config saved with a run's latest checkpoint."""
  checkpointer = ckpt.Checkpointer(paths.join(workdir, "checkpoints"), every=1, keep=1)
  try:
    return checkpointer.restore_config(checkpointer.latest_step())
  finally:
    checkpointer.close()
