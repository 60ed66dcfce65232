"""A JSONL source read lazily: one streaming validation pass, then rows on demand.

`data.lazy=True` with a .jsonl training file: instead of a list of every
tokenized example, `open_jsonl` makes one pass over the file that parses and
validates each row (the same checks and messages as the eager path:
`sources.read_jsonl`, `formats.validate_record`, the optional-column and
group-size agreement) and keeps only the byte offset, length and row number
of each usable row (24 bytes a row) and the file's sha256. `LazyJsonl[i]` then
reads row i with one `os.pread`, validates and tokenizes it. `pipeline.make_dataset` wraps it in
`grain.MapDataset.source`, so tokenization runs in Grain's read threads, only
for the elements of this process's batches (the per-process slice comes
before any read).

Errors: validation is up front, in the streaming pass, in file order: with
on_error="raise" the first bad row stops the run before anything is compiled,
with the eager path's one line (`{file}:{row}: {field}: ...`); with "skip" the
pass counts and drops bad rows, so the dataset's length, the shuffle and the
resume position are fixed before training. Tokenization cannot fail on a
validated row (every response ends in an EOS, so none is empty after
truncation; more responses than group_size is checked in the pass).

Not lazy (the eager path is used, with a warning): other file types, the
unpaired formats (they unpair pairwise records across rows), online methods
(their record rewrite), data.packing and share_prompt still read every
example's length (their plan is fitted to all of them).

The data fingerprint's content hash of a lazy source is the file's sha256 (with
the tokenizer and settings beside it, it fixes every example); an eager run on
the same file hashes the tokenized examples instead, so switching between the
two on a resume reads as a data change.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from typing import Any, Sequence

import numpy as np

from jaxalign.data import conventions, formats, tokenize
from jaxalign.data.formats import DataError

LAZY_FORMATS = ("sft", "pairwise", "negatives", "groups", "ranked")


def _parse(path: str, row: int, raw: bytes) -> dict | None:
  """One line -> its record with provenance; None for a blank line (as read_jsonl)."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}:{row}: invalid UTF-8: {e}") from None
  if not line.strip():
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{row}: invalid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise DataError(f"{path}:{row}: <record>: expected a JSON object, got "
                    f"{type(obj).__name__}")
  return {**obj, "source_file": path, "row": row}


def _validate(record: dict, fmt: str) -> dict:
  return formats.validate_record(conventions.normalize_records([record], fmt)[0], fmt)


def _check_group(record: dict, fmt: str, want: int | None) -> int | None:
  """Without group_size every group record needs the first one's number of responses."""
  if fmt not in tokenize.GROUP_FIELDS:
    return None
  field = tokenize.GROUP_FIELDS[fmt][1]
  n = len(record[field])
  if want is not None and n != want:
    raise DataError(f"{record['source_file']}:{record['row']}: {field}: {n} responses, "
                    f"earlier records have {want}; set config.data.group_size to pad groups")
  return n


def index_jsonl(path: str, fmt: str, *, on_error: str, group_size: int | None,
                log=None) -> tuple[np.ndarray, np.ndarray, int, str]:
  """The streaming pass: ([N, 2] byte offset and length, [N] 1-based row of the N
  usable lines, number skipped, sha256 of the file)."""
  offsets, rows = array("q"), array("q")
  skipped, schema, want = 0, None, None
  h = hashlib.sha256()
  offset = 0
  with open(path, "rb") as f:
    for row, raw in enumerate(f, start=1):
      h.update(raw)
      start, offset = offset, offset + len(raw)
      try:
        record = _parse(path, row, raw)
        if record is None:
          continue
        record = _validate(record, fmt)
        sig = formats.check_columns(record, fmt, schema)
        if group_size is None:
          n = _check_group(record, fmt, want)
        elif fmt in tokenize.GROUP_FIELDS and len(
            record[tokenize.GROUP_FIELDS[fmt][1]]) > group_size:
          field = tokenize.GROUP_FIELDS[fmt][1]
          raise DataError(f"{path}:{row}: {field}: {len(record[field])} responses > "
                          f"group_size {group_size}")
        else:
          n = None
      except DataError as e:
        if on_error == "raise":
          raise
        skipped += 1
        if log is not None:
          log.warning("skipping malformed record: %s", e)
        continue
      schema = sig if schema is None else schema
      want = n if want is None else want
      offsets.extend((start, len(raw)))
      rows.append(row)
  return (np.frombuffer(offsets, np.int64).reshape(-1, 2).copy(),
          np.frombuffer(rows, np.int64).copy(), skipped, h.hexdigest())


class LazyJsonl(Sequence):
  """Item i: usable row i of a JSONL file, read, validated and tokenized on access."""

  def __init__(self, path: str, offsets: np.ndarray, rows: np.ndarray, file_hash: str,
               fmt: str, tokenizer: Any, cfg: tokenize.TokenizeConfig):
    self.path, self.offsets, self.rows = path, offsets, rows
    self.fmt, self.tokenizer, self.cfg = fmt, tokenizer, cfg
    self.content_hash = f"jsonl-sha256:{file_hash}"   # fingerprint.compute reads this
    self._fd = None

  def _line(self, i: int) -> bytes:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    start, length = (int(v) for v in self.offsets[i])
    data = os.pread(self._fd, length, start)   # thread-safe: no shared file position
    if len(data) != length:
      raise DataError(f"{self.path}:{int(self.rows[i])}: the file changed after it was "
                      "indexed (shorter); restart the run")
    return data

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"example {i} of {len(self)}")
    record = _parse(self.path, int(self.rows[i]), self._line(i))
    if record is None:
      raise DataError(f"{self.path}:{int(self.rows[i])}: the file changed after it was "
                      "indexed (blank line); restart the run")
    return tokenize.tokenize_example(_validate(record, self.fmt), self.fmt, self.tokenizer,
                                     self.cfg)

  def __getstate__(self):
    return {**self.__dict__, "_fd": None}

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      try:
        os.close(self._fd)
      except OSError:
        pass

  def __repr__(self) -> str:
    return f"LazyJsonl({self.path!r}, {len(self)} rows)"


def can_read_lazily(path: str, fmt: str) -> bool:
  return os.path.isfile(path) and path.lower().endswith(".jsonl") and fmt in LAZY_FORMATS


def open_jsonl(path: str, fmt: str, tokenizer: Any, *, max_length: int,
               max_prompt_length: int, on_error: str, group_size: int | None = None,
               log=None) -> tuple[LazyJsonl, int]:
  """(lazy examples, number of rows skipped) of a .jsonl file; see the module docstring.

  Raises:
    DataError: a malformed row (on_error="raise"), or no usable rows.
  """
  cfg = tokenize.TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length,
                                group_size=group_size)
  offsets, rows, skipped, file_hash = index_jsonl(path, fmt, on_error=on_error,
                                                  group_size=group_size, log=log)
  if not len(offsets):
    raise DataError(f"{path}: no usable records")
  return LazyJsonl(path, offsets, rows, file_hash, fmt, tokenizer, cfg), skipped
