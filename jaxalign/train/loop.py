"""The host loop: config -> mesh -> data -> state -> jitted step -> logs and checkpoints.

Reads top to bottom. Everything inside `step_fn` is traced once; the host
syncs with the devices only every `log_every` steps and at checkpoints.
"""

import functools
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import fingerprint, guards, runlock
from jaxalign import flops as flops_lib
from jaxalign import paths
from jaxalign import sharding
from jaxalign.data import (examples as examples_lib, formats, packing, pipeline, reading, schema,
                           tables)
from jaxalign.errors import NonFiniteError, ResumeMismatchError  # noqa: F401  (old import path)
from jaxalign.models import hf, lora
from jaxalign.rewards import model as reward_model
from jaxalign.train import build as build_lib
from jaxalign.train import heldout, online as online_lib, resume, rundir, signals, step as step_lib
from jaxalign.train.rundir import RunResult, load_run_params, resolved_config  # noqa: F401  (old import path)
from jaxalign.train.metrics import MetricWriter

log = logging.getLogger("jaxalign")

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
    examples, skipped = examples_lib.open_examples(
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
  # A generator, not a list: a lazy source's batches are tokenized as they are run.
  per_process = -(-len(examples) // jax.process_count())
  for batch in tqdm(pipeline.ordered_batches(examples, process_batch), desc=desc,
                    total=-(-per_process // process_batch), leave=False,
                    disable=not progress or jax.process_index() != 0):
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


def train(config: config_lib.RunSpec | ml_collections.ConfigDict, workdir: str, *,
          progress: bool = True, devices=None, stop_after: int | None = None) -> RunResult:
  """One policy run of `config` in `workdir`, resuming from its latest checkpoint if any.

  Other run modes (iterative rounds, data.domains stages, reward models) are
  dispatched by jaxalign.workflows.run.train, which calls this for each run
  (`run_loop` for a reward model's).

  Args:
    config: a RunSpec (jaxalign.config.resolve), or a recipe (see
      jaxalign.config.defaults()), resolved here once.
    workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, tokenizer/.
    progress: show a progress bar (process 0 only).
    devices: devices for the mesh (default all).
    stop_after: leave after this many steps of this invocation, with a checkpoint
      (for time-sliced schedulers); the run continues on the next call.
  """
  mode = config_lib.run_mode(config)   # before validating: a clear error for another mode
  if mode != "run":
    raise ValueError(f"loop.train runs one policy run; a {mode} recipe trains through "
                     "jaxalign.workflows.run.train")
  return run_loop(config, workdir, progress=progress, devices=devices, stop_after=stop_after)


def run_loop(config: config_lib.RunSpec | ml_collections.ConfigDict, workdir: str, *,
             progress: bool = True, devices=None, stop_after: int | None = None) -> RunResult:
  """`train` without its mode check: the loop of every objective, a policy loss or a
  scalar-head (reward-model) loss, which workflows.run.train runs then exports."""
  devices = jax.devices() if devices is None else list(devices)
  run_spec = config_lib.resolve(config, len(devices))
  # SIGTERM is caught from here on: one arriving while data loads or the step
  # compiles stops the run at the first step boundary, with a checkpoint.
  with _Preemption() as preempt, runlock.RunLock() as lock:
    return _train(run_spec, workdir, progress=progress, devices=devices,
                  stop_after=stop_after, preempt=preempt, lock=lock)


def _train(run_spec: config_lib.RunSpec, workdir, *, progress, devices, stop_after, preempt,
           lock=None) -> RunResult:
  config = run_spec.config   # frozen: nothing below changes the recipe
  workdir = paths.resolve(workdir)   # a local directory or a gs:// URL
  is_main = jax.process_index() == 0
  if config.init_from and not paths.isdir(config.init_from):
    raise config_lib.ConfigError(f"config.init_from: {config.init_from} is not a directory")

  # Mesh and the pieces fixed by the config, as resolved once (config.resolve).
  mesh = sharding.make_mesh(run_spec.mesh_shape, devices)
  rules = run_spec.rules
  model_cfg = run_spec.model_cfg
  hf_dir = run_spec.hf_dir
  spec = run_spec.loss
  frozen_ref = run_spec.frozen_ref
  precompute_ref = run_spec.precompute_ref
  # Online methods sample their groups inside the run (jaxalign.train.online).
  online = online_lib.source_for(run_spec)
  lora_cfg = run_spec.lora_cfg
  modules = spec.modules

  # Data: read, validate and tokenize everything before any compile, and before
  # anything is written: a bad config or bad data leaves no workdir behind.
  tokenizer = reading.load_tokenizer(config.data.tokenizer or hf_dir)
  reading.check_tokenizer(tokenizer, config, model_cfg.vocab_size, hf_dir)
  # A prepared (tokenized) set is opened lazily: no tokenizer work (data/prepared.py).
  examples, num_skipped = examples_lib.open_examples(
      config.data.train_path, online.data_format if online else spec.data, tokenizer,
      split=config.data.split, max_length=config.data.max_length,
      max_prompt_length=config.data.max_prompt_length, on_error=config.data.on_error,
      group_size=config.data.group_size, map_record=online.map_record if online else None,
      kl_chunk_size=config.data.batch_size // jax.process_count())
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
  built = build_lib.build(run_spec, mesh)
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
  resume_step = resume.resume_step(checkpointer, run_spec, saved_part(abstract_state),
                                   fallback=fallback)
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
  if config.data.get("share_prompt", False) and not config.data.packing:   # the prompt once
    pack = packing.make_sharer(prompt_length=config.data.max_prompt_length,
                               max_length=config.data.max_length)

  with jax.set_mesh(mesh):
    # Starting parameters: a resumed run's come from its checkpoint (below), else
    # init_from's checkpoint, else the HF checkpoint, else the seeded random init.
    # With LoRA those are the frozen base, and the adapters start fresh.
    if lora_cfg.enabled:
      state = jax.jit(init_fn, out_shardings=state_shardings)()
      state = _lora_init(state, run_spec, abstract_state, tx, state_shardings, modules,
                         fresh=fresh_init)
    else:
      params = None
      # A reward model's backbone comes from there, its scalar head from the seed.
      part = "backbone" if reward_model.has_scalar_head(spec) else None
      target = abstract_state.params if part is None else abstract_state.params[part]
      if fresh_init and config.init_from:
        params = ckpt.restore_params(rundir.checkpoint_dir(config.init_from), target)
      elif fresh_init and hf_dir:
        params = hf.load_state(hf_dir, model_cfg, target)
      state = initial_state(init_fn, tx, state_shardings, params, keep_reference=frozen_ref,
                            part=part)

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
            and isinstance(eval_examples, list)
            and examples[0]["tokens"].shape == eval_examples[0]["tokens"].shape):
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
    restored, resume_step = resume.restore(checkpointer, resume_step,
                                           saved_part(abstract_state),
                                           None if data_changed else data_iter, run_spec,
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
  bar = tqdm(total=config.total_steps, initial=start, desc=spec.name or config.loss.name,
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
          {k: v for k, v in host_batch.items() if k not in schema.HOST_ONLY_KEYS}, batch_sharding)
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
  """data.packing: the run's batch -> packed batch function (jaxalign/data/packing.py),
  its buckets fitted to a seeded sample of the examples (at most LENGTH_SAMPLE); with
  data.share_prompt, rows of units of one prompt and its responses.

  One pack group per batch shard and micro-batch, so each group's rows sit on
  the device, and in the micro-batch, of its examples.
  """
  rules = tuple(tuple(r) for r in config.sharding_rules)
  global_groups = sharding.batch_shards(mesh, rules) * config.optim.grad_accum_steps
  if global_groups % jax.process_count():
    raise config_lib.ConfigError(
        f"config.data.packing: {global_groups} pack groups (batch shards x grad_accum_steps) "
        f"do not split over {jax.process_count()} processes")
  pad = tokenizer.pad_token_id
  # The buckets fit a seeded sample's lengths (the same on every process and restart):
  # a lazy source tokenizes only the sampled rows.
  sample = packing.sample_examples(examples, seed=config.seed)
  share = bool(config.data.get("share_prompt", False))
  _, pack = packing.make_packer(
      packing.length_sample(sample, seed=config.seed), process_batch=process_batch,
      num_groups=global_groups // jax.process_count(),
      global_groups=global_groups,
      row_length=config.data.pack_length or config.data.max_length,
      num_buckets=config.data.pack_buckets, seed=config.seed,
      pad_id=(tokenizer.eos_token_id or 0) if pad is None else pad,
      process_count=jax.process_count(),
      prompts=packing.example_prompt_lengths(sample) if share else None)
  return pack


def _lora_init(state, run_spec, abstract_state, tx, state_shardings, modules, *, fresh: bool):
  """A LoRA state's base from the config's source; on a fresh run, adapters from
  lora.init_adapters (every module starts from the same stored adapter)."""
  config = run_spec.config
  state = state.replace(frozen=rundir.lora_base(run_spec, abstract_state.frozen, state.frozen))
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


