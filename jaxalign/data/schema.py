"""One table of the data formats: what a batch of each format holds, and what it binds to.

A tokenized example of format F holds its S sequences ([S, T] `tokens`,
`attention_mask`, `loss_mask`; see jaxalign/data/tokenize.py for their content)
and F's per-example columns. Everything that needs a format's layout reads it
here: tokenize (the order of the sequences and the columns it writes), the loss
binding in jaxalign.losses (a loss's arguments by name), the train step (which
columns describe sequences and which go to the loss), the host loops (which
columns stay on the host) and `jaxalign plan` (the abstract batch).

Sequences are named by a prefix: a loss on F takes `<prefix>logps`,
`<prefix>lengths`, `ref_<prefix>logps` (and, with a scalar head, `<prefix>scores`)
for each prefix of F, [B] for a single sequence, [B, G] for a group (a slice).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxalign.data import packing

# Stands for the group size G in a column's per-example shape.
GROUP = "G"


@dataclasses.dataclass(frozen=True)
class Column:
  """One per-example batch column of a format.

  Attributes:
    name: the batch key.
    dtype: its numpy dtype.
    shape: per-example shape; GROUP stands for the group size (one entry per
      group slot j, which is sequence `group_start + j`).
    arg: the loss argument it binds to (None: not a loss input).
    field: the record field tokenize reads it from (None: tokenize computes it,
      or online sampling adds it).
    optional: absent unless the record (or online sampling) gives it.
    planned: whether a plan's abstract batch lays it out (None: when not optional).
  """
  name: str
  dtype: Any
  shape: tuple = ()
  arg: str | None = None
  field: str | None = None
  optional: bool = False
  planned: bool | None = None

  @property
  def in_plan(self) -> bool:
    return not self.optional if self.planned is None else self.planned


@dataclasses.dataclass(frozen=True)
class Format:
  """One data format's layout.

  Attributes:
    name: the format's name (config.data.format, LossSpec.data).
    fields: the record field each leading sequence is tokenized from, in
      sequence order (None: a sequence built after tokenizing, KTO's KL one).
    group_field: the record's list field whose responses follow the leading
      sequences (None: no group); then S = len(fields) + G.
    sequences: loss-argument prefix -> sequence index, or a slice for the group.
    columns: the per-example columns besides the sequences.
    derived: loss argument -> batch -> array, for arguments computed from columns.
  """
  name: str
  fields: tuple[str | None, ...]
  sequences: dict[str, int | slice]
  columns: tuple[Column, ...] = ()
  group_field: str | None = None
  derived: dict[str, Callable[[dict], Any]] = dataclasses.field(default_factory=dict)

  @property
  def grouped(self) -> bool:
    return self.group_field is not None

  def num_sequences(self, group_size: int | None = None) -> int:
    """S: sequences per example (a grouped format needs `group_size`)."""
    if not self.grouped:
      return len(self.fields)
    if group_size is None:
      raise ValueError(f"format {self.name!r}: the number of sequences depends on the "
                       "group size; give one")
    return len(self.fields) + int(group_size)

  def column_shape(self, column: Column, group_size: int | None = None) -> tuple[int, ...]:
    """`column`'s per-example shape with GROUP resolved."""
    return tuple(int(group_size) if d == GROUP else d for d in column.shape)

  def arguments(self) -> dict[str, str]:
    """Loss argument -> batch column, for the columns a loss can take."""
    return {c.arg: c.name for c in self.columns if c.arg is not None}


def _is_positive(batch: dict):
  """ranked: [B, G] labels where the record gives them, else rank 1 is positive."""
  labels, ranks = batch.get("labels"), batch.get("ranks")
  if labels is not None:
    return labels
  return None if ranks is None else ranks == 1


_GROUP_MASK = Column("group_mask", np.int32, (GROUP,), arg="group_mask")

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("sft", fields=("completion",), sequences={"": 0}),
    Format("pairwise", fields=("chosen", "rejected"),
           sequences={"chosen_": 0, "rejected_": 1},
           # reward-model training's per-pair margin (TRL)
           columns=(Column("margin", np.float32, arg="margin", field="margin",
                           optional=True),)),
    Format("unpaired", fields=("completion",), sequences={"": 0},
           columns=(Column("label", np.int32, arg="labels", field="label"),
                    # a prompt embedding for BCO's UDM classifier (host side only)
                    Column("embedding", np.float32, ("E",), field="embedding",
                           optional=True))),
    # KTO: sequence 1 is the example's mismatched KL sequence (tokenize.add_kl_sequences).
    Format("unpaired_kl", fields=("completion", None), sequences={"": 0, "kl_": 1},
           columns=(Column("label", np.int32, arg="labels", field="label"),
                    Column("embedding", np.float32, ("E",), field="embedding",
                           optional=True))),
    # D2O: sequence 0 is the human negative, 1..G the self-generated samples.
    Format("negatives", fields=("rejected",), group_field="samples",
           sequences={"rejected_": 0, "group_": slice(1, None)}, columns=(_GROUP_MASK,)),
    # GRAO: sequence 0 is the dataset's reference answer, 1..G the sampled completions.
    Format("groups", fields=("reference",), group_field="completions",
           sequences={"answer_": 0, "group_": slice(1, None)},
           columns=(_GROUP_MASK,
                    Column("rewards", np.float32, (GROUP,), arg="group_rewards",
                           field="rewards"),
                    # the reference answer's reward, scored by online sampling
                    Column("answer_rewards", np.float32, arg="answer_rewards",
                           optional=True))),
    # AFT: sequence 0 is the reference chain of thought (all padding when absent).
    # A record gives labels or ranks; a plan lays out labels.
    Format("ranked", fields=("reference",), group_field="completions",
           sequences={"answer_": 0, "group_": slice(1, None)},
           columns=(_GROUP_MASK,
                    Column("has_reference", np.int32, arg="has_reference"),
                    Column("labels", np.int32, (GROUP,), arg="labels", field="labels",
                           optional=True, planned=True),
                    Column("ranks", np.int32, (GROUP,), arg="ranks", field="ranks",
                           optional=True)),
           derived={"is_positive": _is_positive}),
)}

# Columns that describe the sequences themselves (every layout: padded, packed,
# shared prompt); every other device column goes to the loss.
SEQUENCE_KEYS = (packing.SEQUENCE_COLUMNS + ("ref_logps",) + packing.PACKED_KEYS
                 + packing.SHARED_KEYS + packing.PACKED_SHARED_KEYS)
# Host-side bookkeeping columns (pipeline.make_dataset's example index, the
# held-out batches' valid flags) that never go to the device.
HOST_ONLY_KEYS = ("index", "valid")


def get(name: str) -> Format:
  """The format `name`.

  Raises:
    ValueError: an unknown format.
  """
  if name not in FORMATS:
    raise ValueError(f"unknown data format {name!r}; expected one of {list(FORMATS)}")
  return FORMATS[name]


def abstract_batch(fmt: str, *, batch_size: int, max_length: int,
                   group_size: int | None = None, ref_logps: bool = False,
                   extra: dict[str, tuple[tuple[int, ...], Any]] | None = None,
                   packed: tuple[int, int, int] | None = None, packed_shared: bool = False,
                   sharding=None) -> dict[str, Any]:
  """A global batch of format `fmt` as jax.ShapeDtypeStructs (no data).

  Args:
    fmt: the format's name.
    batch_size, max_length: B and T; `group_size`: G of a grouped format.
    ref_logps: add the precomputed reference column [B, S].
    extra: more columns, name -> (per-example shape, dtype) (a loss's prepared ones).
    packed: (G groups, R rows, L row length): the packed layout ([G, R, L] packed_*
      columns and packed_lengths [B, S]) in place of tokens/attention_mask/loss_mask.
    packed_shared: with `packed`, the packed shared-prompt columns too
      (packed_part_ids [G, R, L], packed_first_* [G, B / G * S]).
    sharding: every array's sharding (None: none).

  Returns:
    name -> ShapeDtypeStruct: the sequences [B, S, T] (or packed), the format's
    columns a plan lays out (Column.in_plan), [B, ...], and `extra`.
  """
  f = get(fmt)
  B, S = batch_size, f.num_sequences(group_size)

  def struct(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

  if packed is not None:
    batch = {k: struct(packed, np.int32) for k in packing.PACKED_KEYS if k != "packed_lengths"}
    batch["packed_lengths"] = struct((B, S), np.int32)
    if packed_shared:
      G = packed[0]
      batch["packed_part_ids"] = struct(packed, np.int32)
      for k in ("packed_first_index", "packed_first_token", "packed_first_loss"):
        batch[k] = struct((G, B // G * S), np.int32)
  else:
    batch = {k: struct((B, S, max_length), np.int32) for k in packing.SEQUENCE_COLUMNS}
  for c in f.columns:
    if c.in_plan:
      batch[c.name] = struct((B, *f.column_shape(c, group_size)), c.dtype)
  for name, (shape, dtype) in (extra or {}).items():
    batch[name] = struct((B, *shape), dtype)
  if ref_logps:
    batch["ref_logps"] = struct((B, S), np.float32)
  return batch
