"""The host loop of one policy run: spec -> data -> state -> passes -> jitted steps.

Reads top to bottom, one function per phase: the workdir's lock first (a busy
workdir is refused before its data is read), `_load_data` (read, validate and
tokenize everything before anything else is written or compiled), `_initial_state`
(the step-0 state, the reference and `prepare` passes of train/passes.py),
`_resume` (the batches' iterator, and the checkpoint's state on a resume),
`_step_loop` (the steps, logs, held-out evaluations and checkpoints).
Everything inside the step is traced once; the host syncs with the devices
only every `log_every` steps and at checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import errors, fingerprint, guards, paths, runlock, sharding
from jaxalign import flops as flops_lib
from jaxalign.data import examples as examples_lib, formats, packing, pipeline, reading, schema
from jaxalign.errors import NonFiniteError
from jaxalign.train import build as build_lib
from jaxalign.train import heldout, init, online as online_lib, passes, resume, signals
from jaxalign.train import metrics as metrics_lib, report
from jaxalign.train.metrics import MetricWriter
from jaxalign.train.rundir import RunResult

log = logging.getLogger("jaxalign")

CONFIG_FILE = "resolved_config.json"   # the run's resolved config, readable
# Logged metrics shown beside the progress bar, and in the plain log lines (those a
# run has: aux_loss, the load-balancing loss, with mixture-of-experts models only).
_BAR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
             "rewards/accuracies", "eval/loss", "eval/rewards/accuracies", "aux_loss",
             "learning_rate", "grad_norm", "tokens_per_sec")


def train(spec: config_lib.RunSpec, workdir: str, *, progress: bool = True, devices=None,
          stop_after: int | None = None) -> RunResult:
  """One policy run of `spec` in `workdir`, resuming from its latest checkpoint if any.

  Other run modes (iterative rounds, data.domains stages, reward models) are
  dispatched by jaxalign.workflows.run.train, which calls this for each run
  (`run_loop` for a reward model's).

  Args:
    spec: the resolved run (jaxalign.config.resolve, for len(devices) devices).
    workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, tokenizer/.
    progress: show a progress bar (process 0 only).
    devices: devices for the mesh (default all).
    stop_after: leave after this many steps of this invocation, with a checkpoint
      (for time-sliced schedulers); the run continues on the next call.
  """
  if spec.mode != "run":
    raise ValueError(f"loop.train runs one policy run; a {spec.mode} recipe trains through "
                     "jaxalign.workflows.run.train")
  return run_loop(spec, workdir, progress=progress, devices=devices, stop_after=stop_after)


def run_loop(spec: config_lib.RunSpec, workdir: str, *, progress: bool = True, devices=None,
             stop_after: int | None = None) -> RunResult:
  """`train` without its mode check: the loop of every objective, a policy loss or a
  scalar-head (reward-model) loss, which workflows.run.train runs then exports."""
  devices = jax.devices() if devices is None else list(devices)
  # A spec for another device count is refused; a recipe is resolved for these devices.
  spec = config_lib.resolve(spec, len(devices), platform=devices[0].platform)
  # SIGTERM is caught from here on: one arriving while data loads or the step
  # compiles stops the run at the next batch of a pass over the data before
  # training (train/passes.py), else at the first step boundary, with a checkpoint.
  with signals.Preemption() as preempt, runlock.RunLock() as lock:
    return _train(spec, workdir, progress=progress, devices=devices, stop_after=stop_after,
                  preempt=preempt, lock=lock)


@dataclasses.dataclass
class _Data:
  """What `_load_data` read: the run's examples and what identifies them."""
  tokenizer: Any
  examples: Any                     # a list, or a lazy source (data/lazy.py)
  skipped: int
  eval_examples: Any                # None: no held-out set
  fp: dict                          # the training data's fingerprint
  changed: bool                     # the data differs from the checkpoint's (allowed)
  online: Any                       # online_lib.OnlineSource, or None offline


@dataclasses.dataclass
class _Loop:
  """The fixed parts the step loop drives."""
  spec: config_lib.RunSpec
  built: build_lib.Built
  checkpointer: ckpt.Checkpointer
  data_iter: Any
  pack: Any                         # batch -> packed/shared batch, or None
  expand: Any                       # online: (state, batch, step) -> (batch, metrics)
  held_out: heldout.HeldOut | None
  writer: MetricWriter
  divergence: guards.DivergenceGuard
  perf: flops_lib.Utilization
  bar: Any
  num_examples: int                 # in the training set (epoch = examples seen / this)
  clock: report.RunClock            # phase times and sums for the end-of-run summary
  plain_lines: bool   # print a line per log step (the bar is off or stderr not a terminal)


def _train(spec: config_lib.RunSpec, workdir, *, progress, devices, stop_after, preempt,
           lock=None) -> RunResult:
  """The phases of one run, in order (module docstring); `lock`: the workdir's RunLock."""
  workdir = paths.resolve(workdir)   # a local directory or a gs:// URL
  clock = report.RunClock()
  if spec.init_from and not paths.isdir(spec.init_from):
    raise config_lib.ConfigError(f"config.init_from: {spec.init_from} is not a directory")
  mesh = sharding.make_mesh(spec.mesh_shape, devices)
  # The lock first: a busy workdir is refused before any data is read. A bad config or
  # bad data still leaves no workdir behind: the lock removes the directory it made
  # unless _claim_workdir keeps it.
  if lock is not None and jax.process_index() == 0:
    lock.acquire(workdir)   # runlock.LockedError when another live run holds it
  data = _load_data(spec, workdir, kl_chunk_size(spec, mesh))
  _claim_workdir(spec, workdir, data, lock)
  checkpointer = ckpt.Checkpointer(
      paths.join(workdir, "checkpoints"), every=spec.checkpoint.every,
      keep=spec.checkpoint.keep, async_save=spec.checkpoint.async_save)
  checkpointer.check_writable()
  # model.scan_layers="auto": the layout of the checkpoint the run starts from, if any.
  spec = resume.keep_saved_layout(spec, checkpointer)
  log.info("%s", spec.layers_line)
  # State, optimizer and jitted steps: abstract first (train/build.py, as `plan` builds them).
  built = build_lib.build(spec, mesh)
  resume_step = resume.resume_step(checkpointer, spec, built.saved_part(built.abstract_state),
                                   fallback=spec.checkpoint.fallback)
  pack = _layout(spec, data, mesh)
  try:
    state = _initial_state(spec, built, data, resume_step, pack, workdir=workdir,
                           progress=progress, preempt=preempt)
  except errors.PassInterrupted as e:   # a signal during a pass: the run stops there
    checkpointer.close()   # the CLI says where it stopped, in one line
    return RunResult(workdir=workdir, final_step=int(resume_step or 0), last_metrics={},
                     stopped_by_signal=True, signal_name=e.signal_name, stopped_in_pass=str(e))
  state, data_iter, start = _resume(spec, built, data, checkpointer, resume_step, state)
  if start >= spec.total_steps:
    checkpointer.close()
    return RunResult(workdir=workdir, final_step=start, last_metrics={},
                     already_complete=True)
  end = spec.total_steps if stop_after is None else min(spec.total_steps, start + stop_after)
  run = _Loop(
      spec=spec, built=built, checkpointer=checkpointer, data_iter=data_iter, pack=pack,
      expand=data.online.bind(graphdef=built.graphdef, tokenizer=data.tokenizer,
                              workdir=workdir, examples=data.examples) if data.online else None,
      held_out=_held_out(spec, built, data.eval_examples),
      # resume_step: rows a killed run logged past its last checkpoint are dropped.
      writer=MetricWriter(workdir, report_to=config_lib.report_to(spec.config),
                          config=spec.config.to_dict(), process_index=jax.process_index(),
                          resume_step=start),
      divergence=guards.DivergenceGuard(**spec.divergence),
      # perf/model_tflops_per_sec_per_device and perf/mfu over real tokens (docs/performance.md).
      perf=flops_lib.Utilization.for_devices(spec.model_cfg, devices, **built.flops_terms),
      bar=tqdm(total=spec.total_steps, initial=start, desc=spec.loss.name or spec.loss_name,
               disable=not _show_bar(progress), dynamic_ncols=True),
      plain_lines=jax.process_index() == 0 and not _show_bar(progress), clock=clock,
      num_examples=len(data.examples))
  preempt.wait_for_writes = checkpointer.wait
  if jax.process_index() == 0:
    for line in report.start_lines(spec, built, examples=len(data.examples), start=start,
                                   end=end, sequences_per_example=_sequences(spec)):
      log.info("%s", line)
  state, last, stopped = _step_loop(run, state, start=start, end=end, preempt=preempt)
  run.bar.close()
  checkpointer.close()
  final = int(jax.device_get(state.step))
  summary = run.clock.end_summary(
      spec, start=start, final=final, last=last,
      stopped_by=preempt.signal_name if stopped else
      "stop_after_steps" if final < spec.total_steps else None)
  report.write_summary(workdir, summary)
  run.writer.summary(summary)
  run.writer.close()
  if jax.process_index() == 0:
    log.info("%s", report.end_line(summary))
  return RunResult(workdir=workdir, final_step=final,
                   last_metrics=last, stopped_by_signal=stopped,
                   signal_name=preempt.signal_name if stopped else "")


def kl_chunk_size(spec: config_lib.RunSpec, mesh) -> int:
  """unpaired_kl (KTO): its KL sequences pair examples within each process's share of
  a global batch. Processes that share batch shards (a context axis across them) read
  the same rows, so the share is the batch over the batch slices, not the processes."""
  _, p_count = sharding.process_slice(sharding.batch_sharding(mesh, spec.rules))
  return spec.data.batch_size // p_count


def _load_data(spec: config_lib.RunSpec, workdir: str, kl_chunk: int) -> _Data:
  """Reads, validates and tokenizes the training (and held-out) data, before any
  compile and before anything but the run lock is written; checks it against a
  resumed run's. `kl_chunk`: `kl_chunk_size(spec, mesh)`."""
  # Online methods sample their groups inside the run (jaxalign.train.online).
  online = online_lib.source_for(spec)
  fmt = online.data_format if online else spec.loss.data
  d = spec.data
  tokenizer = reading.load_tokenizer(spec.tokenizer_name)
  reading.check_tokenizer(tokenizer, spec.config, spec.model_cfg.vocab_size, spec.hf_dir)
  # A prepared (tokenized) set is opened lazily: no tokenizer work (data/prepared.py).
  began = time.perf_counter()
  examples, num_skipped = examples_lib.open_examples(
      d.train_path, fmt, tokenizer, split=d.split, max_length=d.max_length,
      max_prompt_length=d.max_prompt_length, on_error=d.on_error, group_size=d.group_size,
      map_record=online.map_record if online else None,
      kl_chunk_size=kl_chunk)
  if num_skipped:
    log.warning("skipped %d malformed records of %s", num_skipped, d.train_path)
  if jax.process_index() == 0:
    log.info("indexed %d examples of %s in %.1f s", len(examples), d.train_path,
             time.perf_counter() - began)
  # The held-out set is in the loss's own format (for online methods too: fixed samples).
  eval_examples = load_eval_set(spec, tokenizer, kl_chunk) if d.eval_path else None
  data_fp = fingerprint.compute(examples, tokenizer, train_path=d.train_path,
                                settings=fingerprint.settings_from_config(spec.config, fmt))
  changed = fingerprint.check_resume(workdir, data_fp, allow_change=spec.allow_config_change)
  return _Data(tokenizer=tokenizer, examples=examples, skipped=num_skipped,
               eval_examples=eval_examples, fp=data_fp, changed=changed, online=online)


def load_eval_set(spec: config_lib.RunSpec, tokenizer, kl_chunk: int | None = None) -> list[dict]:
  """data.eval_path's examples in the loss's format, tokenized like the training set
  (`kl_chunk`: `kl_chunk_size`; by default the batch over the processes).

  Raises:
    ConfigError: naming config.data.eval_path, when it cannot be read, is not in
      the loss's format, or has fewer examples than one global batch.
  """
  d, fmt = spec.data, spec.loss.data
  train_key = "config.data.train_path: "   # read_records' messages name the training key
  try:
    examples, skipped = examples_lib.open_examples(
        d.eval_path, fmt, tokenizer, split=d.split, max_length=d.max_length,
        max_prompt_length=d.max_prompt_length, on_error=d.on_error, group_size=d.group_size,
        kl_chunk_size=kl_chunk or d.batch_size // jax.process_count(),
        key="config.data.eval_path")
  except (config_lib.ConfigError, formats.DataError) as e:
    text = str(e)
    text = text[len(train_key):] if text.startswith(train_key) else text
    raise config_lib.ConfigError(
        f"config.data.eval_path: not usable as {fmt!r} data for loss {spec.loss_name!r}: "
        f"{reading.first_line(ValueError(text))}") from None
  if skipped:
    log.warning("skipped %d malformed records of %s", skipped, d.eval_path)
  if heldout.num_batches(len(examples), d.batch_size) == 0:
    raise config_lib.ConfigError(
        f"config.data.eval_path: {len(examples)} usable examples make no batch of "
        f"data.batch_size={d.batch_size}")
  return examples


def _sequences(spec: config_lib.RunSpec) -> int:
  """Sequences per example of the step's batch format."""
  try:
    return schema.get(spec.loss.data).num_sequences(spec.data.group_size)
  except (KeyError, ValueError):
    return 1


def _show_bar(progress: bool) -> bool:
  """The bar on process 0 of a terminal; redirected output gets plain lines instead."""
  return progress and jax.process_index() == 0 and sys.stderr.isatty()


def _claim_workdir(spec: config_lib.RunSpec, workdir: str, data: _Data, lock) -> None:
  """Creates the workdir (kept from here on) and records the data and tokenizer."""
  paths.makedirs(workdir)
  if jax.process_index() != 0:
    return
  if lock is not None:
    lock.keep_workdir()
  if data.changed or not fingerprint.has_checkpoints(workdir):
    fingerprint.write(paths.join(workdir, fingerprint.RUN_FILE), data.fp)
  paths.save_pretrained(data.tokenizer, paths.join(workdir, "tokenizer"))
  # The resolved config as a readable file (each checkpoint also holds it, in Orbax form).
  ckpt.write_json(paths.join(workdir, CONFIG_FILE), json.loads(spec.config.to_json_best_effort()))
  ckpt.write_json(paths.join(workdir, "data_stats.json"), {
      "train_path": spec.data.train_path, "records": len(data.examples) + data.skipped,
      "examples": len(data.examples), "skipped": data.skipped})


def _initial_state(spec: config_lib.RunSpec, built: build_lib.Built, data: _Data, resume_step,
                   pack, *, workdir: str, progress: bool, preempt=None):
  """The step-0 state (train/init.py), and the passes of the initial policy over the
  data (train/passes.py): data.examples and data.eval_examples gain their columns.

  Raises:
    PassInterrupted: a signal (`preempt`) stopped a pass at a batch boundary.
  """
  ref_plan = passes.plan_reference(spec, workdir, data.fp, data.eval_examples, data.tokenizer,
                                   resuming=resume_step is not None,
                                   data_changed=data.changed)
  # The initial policy is needed on a fresh run, and on a resume whose reference is recomputed.
  fresh = resume_step is None or (ref_plan is not None and ref_plan.missing)
  examples, eval_examples = data.examples, data.eval_examples
  with jax.set_mesh(built.mesh):
    state = init.initial_state(spec, built, fresh=fresh)
    if ref_plan is not None:   # reference log-probs of the initial policy, once
      examples, eval_examples = passes.add_reference(
          ref_plan, examples, eval_examples, state, built.graphdef, spec=spec,
          mesh=built.mesh, pack=pack, progress=progress, preempt=preempt)
    examples, eval_examples = passes.apply_prepare(
        spec, examples, eval_examples, state, built.graphdef, mesh=built.mesh,
        progress=progress, preempt=preempt)
  data.examples, data.eval_examples = examples, eval_examples
  return state


def _resume(spec: config_lib.RunSpec, built: build_lib.Built, data: _Data, checkpointer,
            resume_step, state):
  """(state, data iterator, start step): the training batches' iterator and, on a
  resume, the state and iterator position restored from the checkpoint."""
  # Processes that share batch shards (a context axis across them) read the same rows.
  p_index, p_count = sharding.process_slice(built.batch_sharding)
  dataset = pipeline.make_dataset(data.examples, seed=spec.seed,
                                  batch_size=spec.data.batch_size // p_count,
                                  process_index=p_index, process_count=p_count,
                                  shuffle=spec.data.shuffle, repeat=True,
                                  add_index=data.online is not None,
                                  keep_blocks=spec.loss.data == "unpaired_kl")  # KTO's KL pairs
  data_iter = iter(dataset)
  if resume_step is None:
    return state, data_iter, 0
  # On changed data the iterator starts over.
  restored, resume_step = resume.restore(checkpointer, resume_step,
                                         built.saved_part(built.abstract_state),
                                         None if data.changed else data_iter, spec,
                                         fallback=spec.checkpoint.fallback)
  state = restored.replace(frozen=state.frozen) if spec.lora_cfg.enabled else restored
  log.info("resumed from step %d in %s", resume_step, checkpointer.directory)
  return state, data_iter, int(resume_step)


def _held_out(spec: config_lib.RunSpec, built: build_lib.Built, eval_examples):
  if eval_examples is None:
    return None
  return heldout.HeldOut(eval_examples, built.eval_fn, batch_size=spec.data.batch_size,
                         batch_sharding=built.batch_sharding,
                         keep_blocks=spec.loss.data == "unpaired_kl")


def _step_loop(run: _Loop, state, *, start: int, end: int, preempt):
  """Steps start..end-1: (state, the last logged metrics, stopped by a signal)."""
  spec, checkpointer = run.spec, run.checkpointer
  last: dict[str, float] = {}
  window = _Window(run.perf)
  good_nonfinite = int(jax.device_get(state.num_nonfinite))
  resolved = spec.config.to_dict()   # the run's record, saved with each checkpoint
  with jax.set_mesh(run.built.mesh):
    run.clock.loop_started = time.perf_counter()
    for step in range(start, end):
      if step == start:
        log.info("compiling the train step (the first step runs it)")
      state, metrics, host_metrics = _one_step(run, state, step, window)
      if step == start:   # its time is mostly compilation: logged alone, not as a rate
        jax.block_until_ready(metrics)
        run.clock.first_step_s = time.perf_counter() - run.clock.loop_started
        log.info("first step compiled and ran in %.1f s", run.clock.first_step_s)
        window.restart({"time/first_step_seconds": run.clock.first_step_s})
      done = step + 1
      run.bar.update(1)
      # Read the flag once: a SIGTERM landing later in this iteration must not
      # stop the loop without the save decided here.
      stop = preempt.requested
      is_log_step = done % spec.log_every == 0 or done == end
      eval_metrics = {}
      if run.held_out is not None and ((spec.eval_every and done % spec.eval_every == 0)
                                       or done == spec.total_steps):
        began = time.perf_counter()
        eval_metrics = run.held_out.evaluate(state)   # host floats: the pass has finished
        eval_metrics["eval/seconds"] = time.perf_counter() - began
        window.exclude(eval_metrics["eval/seconds"])   # rates count step time only
      will_save = checkpointer.should_save(done) or done == end or stop
      if is_log_step or will_save:
        last = _logged(run, state, metrics, host_metrics, done=done, window=window,
                       good_nonfinite=good_nonfinite)
        if "loss" in last:
          run.clock.losses.append(last["loss"])
      last.update(eval_metrics)
      if is_log_step or eval_metrics:   # an eval step between log steps: eval/* alone
        run.writer.write(done, last if is_log_step else eval_metrics)
        run.bar.set_postfix({k: f"{last[k]:.3g}" for k in _BAR_KEYS if k in last},
                            refresh=False)
        if run.plain_lines:   # no bar (off, or output not a terminal): one line per log step
          print(metrics_lib.log_line(done, spec.total_steps, last, _BAR_KEYS), flush=True)
      if will_save:
        preempt.in_save = True
        checkpointer.save(done, run.built.saved_part(state), run.data_iter, resolved,
                          force=done == end or stop)
        preempt.in_save = False
      run.clock.real_tokens = window.total_tokens
      if stop:
        log.warning("%s: saved a checkpoint at step %d and stopped", preempt.signal_name, done)
        return state, last, True
  return state, last, False


def _one_step(run: _Loop, state, step: int, window: "_Window"):
  """The next batch (online: sampled and scored; packed or shared) through the step."""
  host_batch, host_metrics = next(run.data_iter), {}
  if run.expand is not None:  # online: sample from the live policy, score, group
    host_batch, host_metrics = run.expand(state, host_batch, step)
  if run.pack is not None:    # data.packing / share_prompt: the same examples, new layout
    host_batch = run.pack(host_batch)
  window.add(packing.sequence_mask(host_batch), *packing.computed_tokens(host_batch))
  batch = sharding.host_to_global(
      {k: v for k, v in host_batch.items() if k not in schema.HOST_ONLY_KEYS},
      run.built.batch_sharding)
  state, metrics = run.built.step_fn(state, batch)
  return state, metrics, host_metrics


def _logged(run: _Loop, state, metrics, host_metrics, *, done: int, window: "_Window",
            good_nonfinite: int) -> dict[str, float]:
  """The step's metrics on the host, checked for a non-finite step (NonFiniteError)
  and a divergence (guards.DivergenceError), with throughput and utilization."""
  metrics, num_nonfinite = jax.device_get((metrics, state.num_nonfinite))
  if int(num_nonfinite) > good_nonfinite and not run.spec.skip_nonfinite:
    run.checkpointer.wait()
    good = run.checkpointer.latest_step()
    raise NonFiniteError(
        f"non-finite loss or gradient at or before step {done} (loss={metrics['loss']}); "
        + (f"last good checkpoint: step {good} in {run.checkpointer.directory}"
           if good is not None else "no checkpoint was written before it"))
  run.divergence.check(done, metrics, run.checkpointer)
  last = {k: float(v) for k, v in metrics.items()}
  last.update(window.take())
  last["nonfinite_steps"] = float(num_nonfinite)
  # TRL's names: epochs of the training set seen, real tokens since the run began.
  last["epoch"] = done * run.spec.data.batch_size / max(run.num_examples, 1)
  last["num_tokens"] = float(run.writer.resumed.get("num_tokens", 0.0) + window.total_tokens)
  last.update(host_metrics)
  return last


class _Window:
  """Real tokens and model FLOPs since the last logged step (all processes), over step
  time only: the first step (compilation) and held-out evaluation are left out and
  logged on their own (time/first_step_seconds, eval/seconds). Each process counts
  its own batches; `take` sums them over the processes (one small host collective per
  logged step), so the figures are the global batch's exactly."""

  def __init__(self, perf: flops_lib.Utilization):
    self.perf = perf
    self.run_tokens = 0      # this process's real tokens since the run (invocation) began
    self.total_tokens = 0    # all processes', as of the last `take`
    self.restart()

  def restart(self, extra: dict[str, float] | None = None) -> None:
    """A new window from now; `extra` is logged with its figures."""
    self.tokens, self.flops, self.start = 0, 0.0, time.perf_counter()
    self.computed, self.distinct = 0, 0
    self.extra = dict(extra or {})

  def add(self, real, computed: int, distinct: int) -> None:
    """`real`: the batch's sequence mask (packing.sequence_mask), this process's part;
    `computed`, `distinct`: its token positions and the real tokens among them
    (packing.computed_tokens)."""
    tokens = int(real.sum())
    self.tokens += tokens
    self.run_tokens += tokens
    self.flops += self.perf.batch_flops(real)
    self.computed += computed
    self.distinct += distinct

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (held-out evaluation) out of the window's time."""
    self.start += seconds

  def take(self) -> dict[str, float]:
    """tokens_per_sec, perf/* and the layout's fill over the window, which starts anew;
    nothing of a rate when no step has finished in it (the first step's window).
    Called by every process at the same steps (it gathers)."""
    elapsed = time.perf_counter() - self.start
    (tokens, computed, distinct, run_tokens), flops = _summed_over_processes(
        [self.tokens, self.computed, self.distinct, self.run_tokens], self.flops)
    self.total_tokens = run_tokens
    out = dict(self.extra)
    if computed:
      out.update({"tokens_per_sec": tokens / max(elapsed, 1e-9),
                  **self.perf.metrics(flops, elapsed),
                  # Real tokens among the positions computed: padding's (or a packed
                  # row's tail's) share is what packing and shared prompts save.
                  "tokens/fill": distinct / computed,
                  "tokens/padding_share": 1.0 - distinct / computed})
    self.restart()
    return out


def _summed_over_processes(counts: list[int], flops: float) -> tuple[list[int], float]:
  """`counts` (exact integers) and `flops` summed over the processes. The gather goes
  through 32-bit arrays (no x64), so each count travels as two 30-bit halves."""
  if jax.process_count() == 1:
    return [int(c) for c in counts], float(flops)
  from jax.experimental import multihost_utils
  halves = np.asarray([[c >> 30, c & (2**30 - 1)] for c in counts], np.int32)
  got = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)
  got = got.reshape(jax.process_count(), len(counts), 2)
  summed = ((got[..., 0] << 30) + got[..., 1]).sum(0)
  total_flops = np.asarray(multihost_utils.process_allgather(np.float32(flops))).sum()
  return [int(c) for c in summed], float(total_flops)


def _layout(spec: config_lib.RunSpec, data: _Data, mesh):
  """The batch layout function: data.packing's packer, data.share_prompt's sharer
  (the prompt once), or None (padded rows)."""
  if spec.data.packing:
    return _packer(spec, data.examples, data.tokenizer, mesh)
  if spec.data.share_prompt:
    return packing.make_sharer(prompt_length=spec.data.max_prompt_length,
                               max_length=spec.data.max_length)
  return None


def _packer(spec: config_lib.RunSpec, examples, tokenizer, mesh):
  """data.packing: the run's batch -> packed batch function (jaxalign/data/packing.py),
  its buckets fitted to a seeded sample of the examples (at most LENGTH_SAMPLE); with
  data.share_prompt, rows of units of one prompt and its responses.

  One pack group per batch shard and micro-batch, so each group's rows sit on
  the device, and in the micro-batch, of its examples.
  """
  global_groups = sharding.batch_shards(mesh, spec.rules) * spec.optim.grad_accum_steps
  # Processes that share batch shards (a context axis across them) pack the same rows.
  _, p_count = sharding.process_slice(sharding.batch_sharding(mesh, spec.rules))
  if global_groups % p_count:
    raise config_lib.ConfigError(
        f"config.data.packing: {global_groups} pack groups (batch shards x grad_accum_steps) "
        f"do not split over {p_count} batch slices of the processes")
  pad = tokenizer.pad_token_id
  # The buckets fit a seeded sample's lengths (the same on every process and restart):
  # a lazy source tokenizes only the sampled rows.
  sample = packing.sample_examples(examples, seed=spec.seed)
  _, pack = packing.make_packer(
      packing.length_sample(sample, seed=spec.seed),
      process_batch=spec.data.batch_size // p_count,
      num_groups=global_groups // p_count, global_groups=global_groups,
      row_length=spec.data.row_length, num_buckets=spec.data.pack_buckets, seed=spec.seed,
      pad_id=(tokenizer.eos_token_id or 0) if pad is None else pad,
      process_count=jax.process_count(),
      prompts=packing.example_prompt_lengths(sample) if spec.data.share_prompt else None)
  return pack
