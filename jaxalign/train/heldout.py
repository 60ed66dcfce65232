"""Held-out evaluation during training: the training loss and its metrics on
`config.data.eval_path`, without gradients (step.eval_step, jitted once).

The eval set is read, validated and tokenized like the training set, in the
loss's own format, before anything compiles; its reference log-probs are
precomputed from the initial policy like the training set's (kept beside the
run as eval_ref_logps.npy). It is cut into whole global batches in order (a
last partial batch is left out, so every batch has the step's shape and the
mean over batches is the mean over the examples evaluated); every process
reads its own batches, as in training. The metrics are the means over those
batches, named like the training metrics with an "eval/" prefix (eval/loss,
eval/rewards/accuracies, ...), plus eval/examples.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import jax

from jaxalign import sharding
from jaxalign.data import pipeline, schema

PREFIX = "eval/"
REF_FILE = "eval_ref_logps.npy"


class HeldOut:
  """The eval set's batches and the jitted eval step; `evaluate(state)` -> eval/* metrics."""

  def __init__(self, examples: Sequence[dict], eval_fn: Callable, *, batch_size: int,
               batch_sharding, keep_blocks: bool = False):
    """`batch_size`: the global batch; `keep_blocks`: KTO's KL pairs stay in their block
    (pipeline.make_dataset). The batches are read anew at each evaluation (a lazy
    source tokenizes them then), not kept: no list of every eval example."""
    self.eval_fn = eval_fn
    self.batch_sharding = batch_sharding
    # Processes that share batch shards (a context axis across them) read the same rows.
    p_index, p_count = sharding.process_slice(batch_sharding)
    process_batch = batch_size // p_count
    self.dataset = pipeline.make_dataset(examples, seed=0, batch_size=process_batch,
                                         shuffle=False, repeat=False, keep_blocks=keep_blocks,
                                         process_index=p_index, process_count=p_count)
    # Whole global batches, each process its share (as make_dataset slices them).
    self.num_batches = (len(examples) // process_batch) // p_count
    self.num_examples = self.num_batches * batch_size
    if not self.num_batches:
      raise ValueError(f"{len(examples)} examples make no batch of {batch_size}")

  def host_batches(self) -> Iterator[dict]:
    """This process's eval batches, in order, without the host-only columns."""
    for b in self.dataset:
      yield {k: v for k, v in b.items() if k not in schema.HOST_ONLY_KEYS}

  def evaluate(self, state) -> dict[str, float]:
    """Means of the eval step's metrics over the eval batches, as host floats.

    Sums stay on the devices; one transfer at the end.
    """
    total, n = None, 0
    for host_batch in self.host_batches():
      n += 1
      metrics = self.eval_fn(state, sharding.host_to_global(host_batch, self.batch_sharding))
      total = metrics if total is None else jax.tree.map(lambda a, b: a + b, total, metrics)
    total = jax.device_get(total)
    out = {PREFIX + k: float(v) if k.startswith(("num_tokens", "tokens/")) else float(v) / n
           for k, v in total.items()}
    out[PREFIX + "examples"] = float(self.num_examples)
    return out


def num_batches(num_examples: int, batch_size: int) -> int:
  """Whole global batches in an eval set of `num_examples`."""
  return num_examples // batch_size
