"""Passes of the initial policy over every example, once, before the first step.

Two passes run here: the reference log-probs of a precompute-reference run
(`plan_reference`, then `add_reference`: one table per data set, kept beside
the run in ref_logps.npy with its data fingerprint, reused on resume), and
the loss's own host-side `prepare` (e.g. BCO's UDM weights from prompt
embeddings: `apply_prepare`). Both go through `map_examples`, which runs a
jitted function over the examples in order on the run's mesh.

SIGTERM or SIGINT (train/signals.py) stops a pass at the next batch boundary
(`PassInterrupted`). The reference pass keeps its complete batches in
ref_logps.partial.npz, which the rerun continues from; the embeddings pass, never
saved, is dropped and reruns in full.
"""

import dataclasses
import functools
import io
import json
import logging
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from jaxalign import config as config_lib
from jaxalign import errors, fingerprint, paths, sharding
from jaxalign.data import pipeline, tables
from jaxalign.train import heldout, step as step_lib

REF_FILE = "ref_logps.npy"
# An interrupted reference pass's complete batches, beside the table: "X.npy" -> "X.partial.npz".
PARTIAL_SUFFIX = ".partial.npz"

log = logging.getLogger("jaxalign")


@dataclasses.dataclass(frozen=True)
class KeptBatches:
  """Where an interrupted pass keeps its complete batches, and what they were made
  for: a rerun whose `key` is the same continues after them; any other discards them.

  One file, written whole (paths.write_bytes_atomic): the values so far, which rows
  they fill, the batches done and the key. It is only ever read as a partial table;
  the table a run uses (ref_logps.npy) is written only when every batch is done.
  """
  path: str      # e.g. WORKDIR/ref_logps.partial.npz
  key: dict      # the data, the batch layout and the initial policy (JSON values)

  def load(self, rows: int, batches: int):
    """(table, filled, batches done) of a pass kept for this key, or None."""
    if not paths.exists(self.path):
      return None
    try:
      with np.load(io.BytesIO(epath.Path(self.path).read_bytes()), allow_pickle=False) as z:
        table, filled, meta = z["table"], z["filled"], json.loads(str(z["meta"]))
    except (ValueError, OSError, EOFError, KeyError) as e:
      log.warning("%s: unreadable (%s); the pass starts over", self.path,
                  str(e).splitlines()[0] if str(e) else type(e).__name__)
      return None
    done = meta.get("batches_done")
    if (meta.get("key") != self.key or len(table) != rows or len(filled) != rows
        or not isinstance(done, int) or not 0 < done < batches):
      log.warning("%s: made for other data, batches or initial policy; the pass starts over",
                  self.path)
      return None
    return table, filled.astype(bool), done

  def save(self, table: np.ndarray, filled: np.ndarray, done: int) -> None:
    buf = io.BytesIO()
    np.savez(buf, table=table, filled=filled,
             meta=np.asarray(json.dumps({"key": self.key, "batches_done": done})))
    paths.write_bytes_atomic(self.path, buf.getvalue())

  def discard(self) -> None:
    if paths.exists(self.path):
      epath.Path(self.path).unlink()


def _json(value):
  """`value` as it reads back from JSON (tuples as lists), for comparing keys."""
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def map_examples(examples, fn, *, mesh, rules, batch_size: int, desc: str,
                 progress: bool = True, operands=(), pack=None, preempt=None,
                 keep: KeptBatches | None = None) -> np.ndarray:
  """Runs a jitted `fn(*operands, batch) -> [B, ...]` over every example once, in order.

  Each process reads its own block of the data; `fn`'s results, with the
  dataset indices, come back replicated, so every process fills the full table.
  `operands` (e.g. the params) are passed to the jitted function, not closed
  over: an array spanning other processes' devices cannot be a constant.
  `pack` (data.packing): batch, valid -> the packed batch `fn` reads; the
  padded tail's empty slots then place no tokens.

  `preempt` (signals.Preemption): read before each batch; once a SIGTERM or
  SIGINT has set it, the pass stops there. With `keep`, the complete batches are
  saved to `keep.path` (process 0) and a rerun with the same `keep.key` continues
  after them; without, they are dropped (the pass reruns in full).

  Raises:
    PassInterrupted: stopped by a signal; the message says how far and what was kept.
  """
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def run(operands, batch):
    return fn(*operands, batch), batch["index"], batch["valid"]

  table, filled, start = None, np.zeros(len(examples), bool), 0
  # Processes that share batch shards (a context axis across them) read the same rows.
  p_index, p_count = sharding.process_slice(batch_sharding)
  process_batch = batch_size // p_count
  per_process = -(-len(examples) // p_count)
  total = -(-per_process // process_batch)
  kept = keep.load(len(examples), total) if keep is not None else None
  if kept is not None:
    table, filled, start = kept
    log.warning("%s: continuing after the %d of %d batches kept in %s", desc, start, total,
                keep.path)
  # A generator, not a list: a lazy source's batches are tokenized as they are run.
  batches = pipeline.ordered_batches(examples, process_batch, start_batch=start,
                                     process_index=p_index, process_count=p_count)
  show_bar = progress and jax.process_index() == 0 and sys.stderr.isatty()
  bar = tqdm(desc=desc, total=total, initial=start, leave=False, disable=not show_bar)
  # Without a bar (off, or output not a terminal): a line at the start, about every
  # tenth of the pass and at the end.
  lead = jax.process_index() == 0
  every = max(1, total // 10) if lead and not show_bar else 0
  began = time.perf_counter()
  if lead:
    log.info("%s: %d batches of %d examples", desc, total - start, batch_size)
  try:
    for done in range(start, total):
      if preempt is not None and preempt.requested:
        raise _interrupted(preempt.signal_name, desc, done, total, table, filled, keep,
                           saved=done == start and kept is not None)
      batch = next(batches)
      arrays = {k: batch[k] for k in ("tokens", "attention_mask", "loss_mask")}
      if pack is not None:
        arrays = pack(arrays, np.asarray(batch["valid"], bool))
      arrays["index"] = np.asarray(batch["index"], np.int32)
      arrays["valid"] = np.asarray(batch["valid"], np.int32)
      values, index, valid = jax.device_get(
          run(operands, sharding.host_to_global(arrays, batch_sharding)))
      keep_rows = np.asarray(valid).astype(bool)
      if table is None:
        table = np.zeros((len(examples),) + values.shape[1:], np.float32)
      table[np.asarray(index)[keep_rows]] = np.asarray(values)[keep_rows]
      filled[np.asarray(index)[keep_rows]] = True
      bar.update(1)
      if every and (done + 1) % every == 0 and done + 1 < total:
        log.info("%s: %d of %d batches (%.1f s)", desc, done + 1, total,
                 time.perf_counter() - began)
  finally:
    batches.close()
    bar.close()
  if not filled.all():
    raise RuntimeError(f"{desc}: no value for {int((~filled).sum())} examples")
  if lead:
    log.info("%s: done in %.1f s", desc, time.perf_counter() - began)
  return table


def _interrupted(signal_name: str, desc: str, done: int, total: int, table, filled, keep,
                 *, saved: bool) -> errors.PassInterrupted:
  """The stop of a pass at batch `done`: its complete batches saved when `keep` says
  where (already `saved` when nothing was added since they were read)."""
  if keep is not None and done > 0 and table is not None:
    if not saved and jax.process_index() == 0:
      keep.save(table, filled, done)
    what = (f"kept in {keep.path}; rerun the same command to continue from batch "
            f"{done + 1}")
  elif keep is not None:
    what = "nothing to keep; rerun the same command to start it"
  else:
    what = "not kept (this pass is not saved: a rerun runs it in full)"
  return errors.PassInterrupted(
      f"during the {desc} pass, before training: {done} of {total} batches done, {what}",
      signal_name=signal_name)


@dataclasses.dataclass
class ReferencePlan:
  """The reference tables of a precompute-reference run: reused (a table) or to be
  computed from the initial policy (None), for the training and the held-out set."""
  path: str                         # workdir/ref_logps.npy
  fp: dict                          # the training data's fingerprint
  table: np.ndarray | None
  eval_path: str                    # workdir/heldout.REF_FILE
  eval_fp: dict | None              # None: no held-out set
  eval_table: np.ndarray | None

  @property
  def missing(self) -> bool:
    """A table must be computed, so the run needs its initial policy."""
    return self.table is None or (self.eval_fp is not None and self.eval_table is None)


def plan_reference(spec: config_lib.RunSpec, workdir: str, data_fp: dict, eval_examples,
                   tokenizer, *, resuming: bool, data_changed: bool) -> ReferencePlan | None:
  """Which reference tables the run reuses; None without a precomputed reference.

  Raises:
    RunError: a resume (without allow_config_change) whose training table is
      missing or stale (fingerprint.reference_plan).
  """
  if not spec.precompute_ref:
    return None
  path = paths.join(workdir, REF_FILE)
  table = fingerprint.reference_plan(path, data_fp, resuming=resuming,
                                     allow_change=spec.allow_config_change,
                                     data_changed=data_changed)
  eval_path, eval_fp, eval_table = paths.join(workdir, heldout.REF_FILE), None, None
  if eval_examples is not None:
    eval_fp = fingerprint.compute(eval_examples, tokenizer, train_path=spec.data.eval_path,
                                  settings=fingerprint.settings_from_config(spec.config,
                                                                            spec.loss.data))
    # The eval set does not steer training: a missing or stale table is recomputed.
    eval_table = fingerprint.reference_plan(eval_path, eval_fp, resuming=False,
                                            allow_change=True, data_changed=False)
  return ReferencePlan(path=path, fp=data_fp, table=table, eval_path=eval_path,
                       eval_fp=eval_fp, eval_table=eval_table)


def add_reference(plan: ReferencePlan, examples, eval_examples, state, graphdef, *,
                  spec: config_lib.RunSpec, mesh, pack, progress: bool, preempt=None):
  """(examples, eval_examples) with their "ref_logps" column: the tables `plan` reuses,
  the others computed from the initial policy `state` and saved beside the run.

  A signal (`preempt`) stops a pass at a batch boundary with its complete batches
  kept beside the table (`KeptBatches`), so the rerun of a long pass continues
  where it stopped: the table is the same as an uninterrupted pass's (the same
  batches through the same compiled function), and a kept pass for other data,
  batch layout or initial policy is discarded.

  Raises:
    PassInterrupted: a signal stopped a pass (nothing is saved as ref_logps.npy).
  """
  table, eval_table = plan.table, plan.eval_table
  need_eval = eval_examples is not None and eval_table is None
  if table is None or need_eval:
    # The initial policy; OFS-DPO's modules start identical, the first stands for both.
    policy = state.params[spec.modules[0]] if spec.modules else state.params
    initial_logps = functools.partial(
        map_examples, fn=functools.partial(step_lib.batch_logps_only, graphdef,
                                           chunk_size=spec.logprob_chunk_size,
                                           batch_axes=sharding.batch_axes(spec.rules)),
        operands=(policy, state.frozen), mesh=mesh, rules=spec.rules,
        batch_size=spec.data.batch_size, progress=progress, pack=pack, preempt=preempt)
    kept = functools.partial(_kept_batches, spec=spec, packed=pack is not None)
    if (table is None and need_eval and pack is None and isinstance(examples, list)
        and isinstance(eval_examples, list)
        and examples[0]["tokens"].shape == eval_examples[0]["tokens"].shape):
      # One pass, one compile, over both sets: rows do not interact.
      both = initial_logps(examples + eval_examples, desc="reference log-probs",
                           keep=kept(plan.path, [plan.fp, plan.eval_fp]))
      table, eval_table = both[:len(examples)], both[len(examples):]
    else:
      if table is None:
        table = initial_logps(examples, desc="reference log-probs",
                              keep=kept(plan.path, [plan.fp]))
      if need_eval:
        eval_table = initial_logps(eval_examples, desc="eval reference log-probs",
                                   keep=kept(plan.eval_path, [plan.eval_fp]))
    if jax.process_index() == 0:
      if plan.table is None:
        _save_table(plan.path, table, plan.fp)
      if need_eval:
        _save_table(plan.eval_path, eval_table, plan.eval_fp)
  if jax.process_index() == 0:   # the tables are whole: no kept pass is needed any more
    for path in (plan.path, plan.eval_path):
      KeptBatches(partial_path(path), {}).discard()
  examples = tables.with_column(examples, "ref_logps", table)   # row i by example id
  if eval_examples is not None:   # the held-out set's, from the same initial policy
    eval_examples = tables.with_column(eval_examples, "ref_logps", eval_table)
  return examples, eval_examples


def partial_path(table_path: str) -> str:
  """ref_logps.npy -> ref_logps.partial.npz beside it: an interrupted pass's batches."""
  return (table_path[:-len(".npy")] if table_path.endswith(".npy") else table_path) \
      + PARTIAL_SUFFIX


def _kept_batches(table_path: str, data_fps: list, *, spec: config_lib.RunSpec,
                  packed: bool) -> KeptBatches:
  """Where the reference pass for `table_path` keeps its batches, keyed by all its
  values depend on: the data, the batch layout, and what makes the initial policy."""
  return KeptBatches(partial_path(table_path), _json({
      "data": data_fps, "batch_size": spec.data.batch_size,
      "processes": jax.process_count(), "packed": packed,
      "logprob_chunk_size": spec.logprob_chunk_size,
      "policy": {"model": spec.model_cfg, "hf_dir": spec.hf_dir, "init_from": spec.init_from,
                 "init_adapters": spec.init_adapters, "seed": spec.seed,
                 "lora": spec.lora_cfg, "modules": spec.modules}}))


def _save_table(path: str, table: np.ndarray, fp: dict) -> None:
  paths.save_npy(path, table)
  fingerprint.write(fingerprint.reference_fingerprint_path(path), fp)


def apply_prepare(spec: config_lib.RunSpec, examples, eval_examples, state, graphdef, *,
                  mesh, progress: bool, preempt=None) -> tuple[Any, Any]:
  """(examples, eval_examples) through the loss's own host-side `prepare` (e.g. BCO's
  UDM weights), once; unchanged for a loss without one. Its `prompt_embeddings`
  callback runs the initial policy over the set's prompts when the loss asks.

  Raises:
    PassInterrupted: a signal (`preempt`) stopped the embeddings pass at a batch
      boundary; nothing is kept (the prepared values are never saved: every run,
      and so the rerun, computes them in full).
  """
  if spec.loss.prepare is None:
    return examples, eval_examples

  def prepared(items, desc: str):
    return spec.loss.prepare(
        items, seed=spec.seed, **spec.options,
        prompt_embeddings=lambda: map_examples(
            items, functools.partial(step_lib.prompt_embeddings, graphdef),
            operands=(state.params, state.frozen), mesh=mesh, rules=spec.rules,
            batch_size=spec.data.batch_size, desc=desc, progress=progress, preempt=preempt))

  examples = prepared(examples, "prompt embeddings")
  if eval_examples is not None:
    eval_examples = prepared(eval_examples, "eval prompt embeddings")
  return examples, eval_examples
