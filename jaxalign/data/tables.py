"""Per-example tables joined to a dataset by index, lazily.

A precomputed column (reference log-probs: one row per example, in the
dataset's order) stays one array, indexed by example id; `with_column` returns
a random-access view whose item i is example i plus that row, so no list of
every example is built and a lazy source (a prepared set) stays lazy.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class WithColumn(Sequence):
  """examples[i] plus {name: table[i]}; picklable when `examples` and `table` are."""

  def __init__(self, examples: Sequence[dict], name: str, table: np.ndarray):
    if len(table) != len(examples):
      raise ValueError(f"{name}: {len(table)} rows for {len(examples)} examples")
    self.examples, self.name, self.table = examples, name, table

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return {**self.examples[i], self.name: self.table[i]}

  @property
  def batched_reads(self) -> bool:
    return bool(getattr(self.examples, "batched_reads", False))

  def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Examples `indices` stacked, with their rows of the table (pipeline's fast path;
    only when `examples` reads batches itself)."""
    return {**self.examples.read_batch(indices),
            self.name: self.table[np.asarray(indices, np.int64)]}

  def __getattr__(self, attr: str) -> Any:   # e.g. a prepared set's content_hash
    if attr in ("examples", "name", "table"):
      raise AttributeError(attr)
    return getattr(self.examples, attr)


def with_column(examples: Sequence[dict], name: str, table: np.ndarray) -> Sequence[dict]:
  return WithColumn(examples, name, np.asarray(table))
