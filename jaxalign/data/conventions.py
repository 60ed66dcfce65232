"""TRL's dataset conventions, read into jaxalign's formats before validation.

TRL users have preference data in four shapes (standard or conversational
text, each with an explicit or an implicit prompt); jaxalign's formats
(`formats.py`) want an explicit prompt. This module closes the gap the way
TRL's `data_utils` does, so the same files load here:

  * implicit prompt: a pairwise record with `chosen` and `rejected` but no
    `prompt` gets prompt = their longest common prefix (characters of a
    string, or whole turns of a message list), and keeps the rest as the
    responses (`extract_prompt`, TRL `extract_prompt`).
  * unpairing: an unpaired loss (BCO, KTO, APO-zero unpaired) reading a
    pairwise record makes two examples of it: chosen -> desirable (label
    True), rejected -> undesirable (label False) (`unpair_records`, TRL
    `unpair_preference_dataset`: within each block of `UNPAIR_BLOCK` rows,
    all desirable examples come first, then all undesirable ones).
  * KL completions (KTO): each example gets a mismatched completion, the one of
    the previous example of its batch-sized chunk, the first taking the last's
    (`add_kl_completions`, TRL `KTOTrainer._prepare_dataset`'s rotation).

`normalize_records` applies the first two where a record needs them.
"""

from __future__ import annotations

from typing import Any, Sequence

Record = dict[str, Any]

# TRL's unpair_preference_dataset maps with batched=True and datasets' default
# batch size, 1000 rows: desirable copies first, then undesirable, per block.
UNPAIR_BLOCK = 1000

# Formats whose records are one completion with a binary label.
UNPAIRED_FORMATS = ("unpaired", "unpaired_kl")


def extract_prompt(record: Record) -> Record:
  """The record with prompt = the common prefix of `chosen` and `rejected`.

  Strings are compared by character, message lists by whole turn. As TRL: the
  split is at the first position where they differ, moved one back when the
  character before it is a space (the space stays with the responses); when
  one response is a prefix of the other the split is one before the shorter's
  end.
  """
  chosen, rejected = record["chosen"], record["rejected"]
  n = min(len(chosen), len(rejected))
  cut = max(n - 1, 0)
  for i in range(n):
    if chosen[i] != rejected[i]:
      cut = i - 1 if i > 0 and chosen[i - 1] == " " else i
      break
  out = dict(record)
  out["prompt"], out["chosen"], out["rejected"] = chosen[:cut], chosen[cut:], rejected[cut:]
  return out


def is_pairwise(record: Any) -> bool:
  """Whether `record` is a pairwise (chosen/rejected) record."""
  return isinstance(record, dict) and "chosen" in record and "rejected" in record


def unpair_record(record: Record, desirable: bool) -> Record:
  """One unpaired copy of a pairwise record: chosen (desirable) or rejected, with
  the implicit prompt extracted first when it has none (as `normalize_records`)."""
  if "prompt" not in record:
    record = extract_prompt(record)
  field = "chosen" if desirable else "rejected"
  rest = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
  return {**rest, "completion": record[field], "label": desirable}


def unpair_records(records: Sequence[Record], *, block: int = UNPAIR_BLOCK) -> list[Record]:
  """Each pairwise record -> a desirable and an undesirable unpaired record.

  Other keys (provenance, ids) are copied to both. Order: per block of `block`
  input rows, the desirable copies in row order, then the undesirable ones.
  """
  out: list[Record] = []
  for start in range(0, len(records), block):
    rows = records[start:start + block]
    for label in (True, False):
      out.extend(unpair_record(r, label) for r in rows)
  return out


def normalize_records(records: Sequence[Any], fmt: str) -> list[Any]:
  """Records in TRL's conventions -> records of `fmt` (others pass unchanged).

  Pairwise records without a prompt get the implicit one; for an unpaired
  format, pairwise records are unpaired (their order as `unpair_records`).
  """
  records = [extract_prompt(r) if is_pairwise(r) and "prompt" not in r else r
             for r in records]
  if fmt in UNPAIRED_FORMATS and any(is_pairwise(r) for r in records):
    pairs = [r for r in records if is_pairwise(r)]
    rest = [r for r in records if not is_pairwise(r)]
    records = rest + unpair_records(pairs)
  return records


def add_kl_completions(records: Sequence[Record], chunk_size: int) -> list[Record]:
  """Each record with `kl_completion`: a completion of another record of its chunk.

  Records are taken in chunks of `chunk_size` consecutive rows (the batch the
  pipeline keeps together, see `pipeline.make_dataset(keep_blocks=True)`); in
  each chunk the completions are rotated by one: record j gets record j-1's,
  the first gets the last's (TRL: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})).
  A chunk of one pairs a record with its own completion.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  out = []
  for start in range(0, len(records), chunk_size):
    chunk = records[start:start + chunk_size]
    for j, r in enumerate(chunk):
      out.append({**r, "kl_completion": chunk[j - 1]["completion"]})
  return out
