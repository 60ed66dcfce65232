"""Grain input pipeline: map, shuffle(seed), repeat, batch, then each process its batches.

``make_dataset`` returns a ``grain.IterDataset`` whose iterator is
checkpointable (``get_state``/``set_state``, JSON-serializable state; saved with
``grain.checkpoint.CheckpointSave`` inside an Orbax ``Composite``).
``ordered_batches`` walks a dataset once in order, padding the last batch, for
precomputing per-example values such as reference log-probs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np

log = logging.getLogger(__name__)

Example = dict[str, Any]


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f"need 0 <= process_index < process_count, got {pi}, {pc}")
  return pi, pc


def _add_index(i: int, x: Example) -> Example:
  return {**x, "index": np.int64(i)}


def make_dataset(
    records_or_examples: Sequence[Example],
    *,
    seed: int,
    batch_size: int,
    shuffle: bool = True,
    repeat: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    transform: Callable[[Example], Example] | None = None,
    add_index: bool = False,
    read_options: grain.ReadOptions | None = None,
    keep_blocks: bool = False,
) -> grain.IterDataset:
  """Builds the per-process training input pipeline.

  Order: source -> map(transform) -> map_with_index(add "index") ->
  shuffle(seed, reshuffled each epoch) -> repeat -> batch(batch_size) -> every
  process_count-th batch from process_index on -> to_iter_dataset. The shuffle
  and the batches are the same in every process; process p takes batches
  p, p + P, p + 2P, ... of them. So global batch k (the P per-process batches
  of step k, in process order) is the same examples whatever P is: a run on 2
  processes sees the data of a run on 1 process with the same global batch.
  All steps are lazy and random-access, so a process transforms and reads only
  its own elements.

  Args:
    records_or_examples: random-access sequence of dicts (records or examples).
    seed: shuffle seed; same seed => same batches.
    batch_size: examples per batch for THIS process (global batch / process_count).
    shuffle: globally shuffle the data (reshuffled every epoch).
    repeat: repeat epochs; with ``num_epochs=None`` forever.
    num_epochs: number of epochs when ``repeat`` (None = infinite).
    process_index, process_count: default ``jax.process_index()/process_count()``.
      Every process gets the same number of batches: a last global batch that
      would be incomplete is dropped, like the last partial batch of one process.
    transform: ``example -> example`` map, e.g. `tokenize.make_tokenize_fn`.
    add_index: attach ``"index"`` int64, the position in records_or_examples,
      for joining with precomputed tables (kept after ``transform``).
    read_options: Grain threading; default 2 threads, small prefetch buffer.
    keep_blocks: batch b is always examples [b * batch_size, (b + 1) *
      batch_size) (a partial last block is dropped); the shuffle permutes
      whole blocks. For examples paired within their block (KTO's KL
      sequences, `tokenize.add_kl_sequences` with chunk_size = batch_size),
      so each pairing stays inside one training batch.

  Returns:
    IterDataset of dicts of numpy arrays with leading dim batch_size, e.g.
    ``tokens`` [batch_size, S, T].
  """
  pi, pc = _process(process_index, process_count)
  n = len(records_or_examples)
  if n == 0:
    raise ValueError("no examples to make a dataset of")
  if keep_blocks:
    return _block_dataset(records_or_examples, seed=seed, batch_size=batch_size,
                          shuffle=shuffle, repeat=repeat, num_epochs=num_epochs, pi=pi, pc=pc,
                          transform=transform, add_index=add_index, read_options=read_options)
  # A source that reads whole batches (`batched_reads`: a prepared set) is ordered
  # by example number instead: Grain's shuffle and repeat permute indices only, so
  # batch k holds the same examples, with the same "index" and iterator state,
  # and each batch is one `read_batch` (not a read, decode and stack per example).
  by_batch = transform is None and getattr(records_or_examples, "batched_reads", False)
  if by_batch:
    # Element = the number Grain gives example i in epoch e (e * n + i), which is
    # what map_with_index sees below a shuffle and a repeat on the other path.
    ds = grain.MapDataset.range(n).map_with_index(_position)
  else:
    ds = grain.MapDataset.source(records_or_examples)
    if transform is not None:
      ds = ds.map(transform)
    if add_index:
      ds = ds.map_with_index(_add_index)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=True)
  # Batches p, p + P, ... of a whole number of global batches.
  ds = ds.slice(slice(pi, pc * (len(ds) // pc), pc))
  if by_batch:
    ds = ds.map(functools.partial(_read_batch, records_or_examples, add_index))
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  return ds.to_iter_dataset(read_options)


def _position(i: int, _: int) -> int:
  return i


def _read_batch(examples, add_index: bool, numbers: np.ndarray) -> Example:
  numbers = np.asarray(numbers, np.int64)
  batch = examples.read_batch(numbers % len(examples))
  return {**batch, "index": numbers} if add_index else batch


def _block_dataset(examples, *, seed, batch_size, shuffle, repeat, num_epochs, pi, pc,
                   transform, add_index, read_options) -> grain.IterDataset:
  """make_dataset(keep_blocks=True): blocks of consecutive examples, shuffled as units."""
  num_blocks = len(examples) // batch_size
  if num_blocks == 0:
    raise ValueError(f"{len(examples)} examples make no batch of {batch_size}")

  def block(b: int) -> Example:
    rows = []
    for i in range(b * batch_size, (b + 1) * batch_size):
      row = examples[i] if transform is None else transform(examples[i])
      rows.append(_add_index(i, row) if add_index else row)
    return _stack(rows)

  ds = grain.MapDataset.range(num_blocks)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(num_epochs)
  ds = ds.map(block)
  ds = ds.slice(slice(pi, pc * (len(ds) // pc), pc))
  if read_options is None:
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  return ds.to_iter_dataset(read_options)


def _stack(examples: Sequence[Example]) -> Example:
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def ordered_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    transform: Callable[[Example], Example] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_batch: int = 0,
) -> Iterator[Example]:
  """Iterates this process's contiguous block of ``examples`` once, in order.

  ``start_batch``: the first batch yielded (an interrupted pass continues there); the
  batches before it are neither read nor tokenized.

  Every process yields the same number of batches,
  ``ceil(ceil(N / process_count) / batch_size)``. Missing rows of the final
  batch(es) repeat the last real row (same ``index``, so scattering results by
  index stays correct) and have ``valid`` False.

  Yields:
    dicts of stacked arrays [batch_size, ...] plus ``index`` int64 [batch_size]
    (position in ``examples``) and ``valid`` bool [batch_size].
  """
  pi, pc = _process(process_index, process_count)
  n = len(examples)
  if n == 0:
    return
  per = -(-n // pc)
  start, stop = min(pi * per, n), min((pi + 1) * per, n)
  num_batches = -(-per // batch_size)
  for b in range(start_batch, num_batches):
    lo = start + b * batch_size
    idx = np.arange(lo, lo + batch_size)
    valid = idx < stop
    last = stop - 1 if stop > start else n - 1
    idx = np.where(valid, idx, last).astype(np.int64)
    rows = [examples[int(i)] for i in idx]
    if transform is not None:
      rows = [transform(r) for r in rows]
    rows = [{k: v for k, v in r.items() if k != "index"} for r in rows]
    yield {**_stack(rows), "index": idx, "valid": valid}
