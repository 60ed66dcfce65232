"""Passes of the initial policy over every example, once, before the first step.

Two passes run here: the reference log-probs of a precompute-reference run
(`plan_reference`, then `add_reference`: one table per data set, kept beside
the run in ref_logps.npy with its data fingerprint, reused on resume), and
the loss's own host-side `prepare` (e.g. BCO's UDM weights from prompt
embeddings: `apply_prepare`). Both go through `map_examples`, which runs a
jitted function over the examples in order on the run's mesh.
"""

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxalign import config as config_lib
from jaxalign import fingerprint, paths, sharding
from jaxalign.data import pipeline, tables
from jaxalign.train import heldout, step as step_lib

REF_FILE = "ref_logps.npy"


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
                  spec: config_lib.RunSpec, mesh, pack, progress: bool):
  """(examples, eval_examples) with their "ref_logps" column: the tables `plan` reuses,
  the others computed from the initial policy `state` and saved beside the run."""
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
        batch_size=spec.data.batch_size, progress=progress, pack=pack)
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
    if jax.process_index() == 0:
      if plan.table is None:
        _save_table(plan.path, table, plan.fp)
      if need_eval:
        _save_table(plan.eval_path, eval_table, plan.eval_fp)
  examples = tables.with_column(examples, "ref_logps", table)   # row i by example id
  if eval_examples is not None:   # the held-out set's, from the same initial policy
    eval_examples = tables.with_column(eval_examples, "ref_logps", eval_table)
  return examples, eval_examples


def _save_table(path: str, table: np.ndarray, fp: dict) -> None:
  paths.save_npy(path, table)
  fingerprint.write(fingerprint.reference_fingerprint_path(path), fp)


def apply_prepare(spec: config_lib.RunSpec, examples, eval_examples, state, graphdef, *,
                  mesh, progress: bool) -> tuple[Any, Any]:
  """(examples, eval_examples) through the loss's own host-side `prepare` (e.g. BCO's
  UDM weights), once; unchanged for a loss without one. Its `prompt_embeddings`
  callback runs the initial policy over the set's prompts when the loss asks."""
  if spec.loss.prepare is None:
    return examples, eval_examples

  def prepared(items, desc: str):
    return spec.loss.prepare(
        items, seed=spec.seed, **spec.options,
        prompt_embeddings=lambda: map_examples(
            items, functools.partial(step_lib.prompt_embeddings, graphdef),
            operands=(state.params, state.frozen), mesh=mesh, rules=spec.rules,
            batch_size=spec.data.batch_size, desc=desc, progress=progress))

  examples = prepared(examples, "prompt embeddings")
  if eval_examples is not None:
    eval_examples = prepared(eval_examples, "eval prompt embeddings")
  return examples, eval_examples
