"""Sources read lazily: one streaming validation pass, then rows tokenized on demand.

How a run reads every source but a prepared set (`examples.open_examples`):
instead of a list of every tokenized example, `open_source` builds a
random-access view of the source's raw rows, makes one streaming pass that
validates them and keeps only the positions of the usable rows (an int64
array, 8 bytes a row). `LazyExamples[i]` then reads usable row i, validates and
tokenizes it. `pipeline.make_dataset` wraps it in `grain.MapDataset.source`, so
tokenization runs in Grain's read threads, only for the elements of this
process's batches (the per-process slice comes before any read).

The checks, messages and order are the list reader's, the one `jaxalign
prepare` uses (`reading.read_records`, then `formats.validate_records`: TRL's
conventions, `formats.validate_record`, the optional-column agreement; then the
group-size rule and `tokenize.tokenize_records`); tests/data/reference.py
composes it into the reference this path is tested against.

Raw rows, per source (each keeps `source_file` and the list reader's 1-based `row`):
  .jsonl        byte offset and length of every non-blank line (a pass that only
                splits lines, 16 bytes a row), read back with `os.pread`.
  .json         a top-level array is indexed in the same kind of pass: a byte
                scanner finds each element's span (depth, strings and escapes
                tracked), so one element is `json.loads`-ed at a time; a file that
                is not an array is read as JSONL, as the list reader does.
  .parquet      row groups through `pyarrow.parquet.ParquetFile.read_row_group`
                (the last few decoded groups are cached per reading thread).
  datasets      a `save_to_disk` directory (`datasets.load_from_disk`) or a hub
                name / data directory (`datasets.load_dataset`, the split
                materialized in datasets' memory-mapped Arrow cache): `ds[i]`,
                Arrow random access, no Python list. `datasets` streaming has no
                random access (no global shuffle, no exact resume), so it is not used.
  directory     of .jsonl/.json/.parquet split files: their rows one after another.
  toy:          the generator's records (see `reading.toy_rows`).

Errors: validation is up front, in the streaming pass, before anything is
compiled, with bounded memory. With several processes the pass is split: each
process validates a contiguous block of the rows (in file order) and the
blocks' usable positions, skip counts and first errors are all-gathered, so
each process parses only its block. With on_error="raise" every process then
raises the same one line, the list reader's (`{file}:{row}: {field}: ...`):
the error of the lowest block that has one, which is the first bad row in
file order. With "skip" each process counts the rows it dropped; the counts are
summed. Either way the dataset's length, shuffle and resume position are
fixed before training. Why up front and not at the first bad row met: a skipped
row met mid-run would change the batches after it, so the same data on a
different number of processes, or a resumed run, would see other batches.
Tokenization cannot fail on a validated row (every response ends in an EOS, so
none is empty after truncation; more responses than group_size is checked in
the pass).

Every format and run path reads lazily:
  online methods   their record rewrite (`map_record`) runs on each row as it is
                   read (`MappedRows`), inside the validation pass and on access,
                   so a bad row still names its file, row and field.
  unpaired formats a pass over the rows puts them in the list reader's order
                   (`unpaired_order`: rows that are not pairwise first, then
                   TRL's unpairing per block of UNPAIR_BLOCK pairwise rows, chosen
                   copies then rejected ones), read through `UnpairedRows`
                   (16 bytes a record); unpaired_kl's KL sequence of example i is
                   built on access from the previous example of its chunk of
                   `kl_chunk_size` (the first takes the chunk's last), as
                   `tokenize.add_kl_sequences` does over the list.
  packing, share_prompt  need no list: the packer's buckets are fitted to a
                   seeded sample of lengths (`packing.length_sample`).

The data fingerprint's content hash of a lazy source is its bytes' sha256 and
split (`content_hash`, `source_hash`: with the tokenizer and settings
beside it, it fixes every example; for unpaired_kl also the KL chunk size), as a
prepared set of that source has it, so a run may resume on the prepared set of
the data it started on. (Runs of older versions that read a list of every
example hashed the tokenized examples: resuming one reads as a data change.)
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import threading
from array import array
from typing import Any, Callable, Sequence

import numpy as np

from jaxalign.data import conventions, formats, tokenize
from jaxalign.data.formats import DataError


# ---------------------------------------------------------------------------
# Raw rows: random access to a source's records, with provenance.

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
  return _provenance(obj, path, row)


def _provenance(obj: Any, path: str, row: int) -> dict:
  if not isinstance(obj, dict):
    raise DataError(f"{path}:{row}: <record>: expected a JSON object, got "
                    f"{type(obj).__name__}")
  return {**obj, "source_file": path, "row": row}


class _FileRows(Sequence):
  """Rows stored as byte spans of one file ([N, 2] offset, length; [N] row numbers)."""

  def __init__(self, path: str, spans: np.ndarray, rows: np.ndarray, file_hash: str):
    self.path, self.spans, self.rows, self.file_hash = path, spans, rows, file_hash
    self._fd = None

  def _bytes(self, i: int) -> bytes:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    start, length = (int(v) for v in self.spans[i])
    data = os.pread(self._fd, length, start)   # thread-safe: no shared file position
    if len(data) != length:
      raise DataError(f"{self.path}:{int(self.rows[i])}: the file changed after it was "
                      "indexed (shorter); restart the run")
    return data

  def __len__(self) -> int:
    return len(self.spans)

  def __getitem__(self, i: int) -> dict:
    record = self._record(int(self.rows[i]), self._bytes(i))
    if record is None:
      raise DataError(f"{self.path}:{int(self.rows[i])}: the file changed after it was "
                      "indexed (blank line); restart the run")
    return record

  def _record(self, row: int, raw: bytes) -> dict | None:
    return _parse(self.path, row, raw)

  def __getstate__(self):
    return {**self.__dict__, "_fd": None}

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      try:
        os.close(self._fd)
      except OSError:
        pass


class JsonlRows(_FileRows):
  """The non-blank lines of a .jsonl file (row = line number)."""


class JsonArrayRows(_FileRows):
  """The elements of a top-level JSON array (row = element index + 1)."""

  def _record(self, row: int, raw: bytes) -> dict:
    try:
      obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{self.path}:{row}: invalid JSON: {e}") from None
    return _provenance(obj, self.path, row)


def index_jsonl(path: str) -> JsonlRows:
  """The line-splitting pass (no parsing): spans of the non-blank lines, the file's sha256."""
  spans, rows = array("q"), array("q")
  h = hashlib.sha256()
  offset = 0
  with open(path, "rb") as f:
    for row, raw in enumerate(f, start=1):
      h.update(raw)
      if raw.strip():
        spans.extend((offset, len(raw)))
        rows.append(row)
      offset += len(raw)
  return JsonlRows(path, np.frombuffer(spans, np.int64).reshape(-1, 2).copy(),
                   np.frombuffer(rows, np.int64).copy(), h.hexdigest())


# A whole string (escapes included) or one structural character.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)


def index_json_array(path: str) -> JsonArrayRows:
  """Spans of the elements of a top-level JSON array, in one streaming byte scan.

  The file is memory-mapped and scanned once for strings and structural
  characters; element k is the bytes between the array's commas at depth 1, so
  one element is parsed at a time (its own JSON errors surface, with its row,
  in the validation pass). A bracket imbalance or data after the array:
  DataError naming the file and element.
  """
  import mmap
  spans = array("q")
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if not size:
      raise DataError(f"{path}:1: invalid JSON: empty file")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
      file_hash = hashlib.sha256(data).hexdigest()
      depth, start, end = 0, None, None
      for m in _JSON_TOKENS.finditer(data):
        c = data[m.start():m.start() + 1]
        if c == b'"':
          continue
        if c in (b"[", b"{"):
          depth += 1
          if depth == 1:
            if c != b"[":
              raise DataError(f"{path}:1: invalid JSON: not a top-level array")
            start = m.end()
        elif c in (b"]", b"}"):
          depth -= 1
          if depth == 0:
            if data[start:m.start()].strip():
              spans.extend((start, m.start() - start))
            end = m.end()
            break
          if depth < 0:
            raise DataError(f"{path}:{len(spans) + 1}: invalid JSON: unbalanced {c.decode()}")
        elif depth == 1:   # a comma between elements
          spans.extend((start, m.start() - start))
          start = m.end()
      if end is None:
        raise DataError(f"{path}:{len(spans) + 1}: invalid JSON: the array is not closed")
      if data[end:].strip():
        raise DataError(f"{path}:{len(spans) + 1}: invalid JSON: data after the array")
  spans_np = np.frombuffer(spans, np.int64).reshape(-1, 2).copy()
  return JsonArrayRows(path, spans_np, np.arange(1, len(spans_np) + 1, dtype=np.int64),
                       file_hash)


class ParquetRows(Sequence):
  """Rows of a Parquet file, read a row group at a time (row = index + 1)."""

  CACHED_GROUPS = 4

  def __init__(self, path: str):
    import pyarrow.parquet as pq
    self.path = path
    meta = pq.ParquetFile(path).metadata
    self.starts = np.cumsum([0] + [meta.row_group(g).num_rows
                                   for g in range(meta.num_row_groups)])
    self._local = threading.local()

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _group(self, g: int) -> list[dict]:
    local = self._local
    if not hasattr(local, "cache"):
      import pyarrow.parquet as pq
      local.file, local.cache = pq.ParquetFile(self.path), collections.OrderedDict()
    if g not in local.cache:
      local.cache[g] = local.file.read_row_group(g).to_pylist()
      if len(local.cache) > self.CACHED_GROUPS:
        local.cache.popitem(last=False)
    local.cache.move_to_end(g)
    return local.cache[g]

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    g = int(np.searchsorted(self.starts, i, side="right")) - 1
    return _provenance(self._group(g)[i - int(self.starts[g])], self.path, i + 1)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_local"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()


class ArrowRows(Sequence):
  """Rows of a `datasets.Dataset` (memory-mapped Arrow), row = index + 1."""

  def __init__(self, ds: Any, name: str):
    self.ds, self.name = ds, name

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> dict:
    return _provenance(self.ds[int(i)], self.name, int(i) + 1)


class ConcatRows(Sequence):
  """Several row sources one after another (a directory's split files)."""

  def __init__(self, parts: Sequence[Sequence[dict]]):
    self.parts = list(parts)
    self.starts = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    k = int(np.searchsorted(self.starts, i, side="right")) - 1
    return self.parts[k][i - int(self.starts[k])]


class MappedRows(Sequence):
  """`map_record(rows[i])`: an online method's record rewrite, applied per row on read.

  The rewritten record keeps the row's provenance (`source_file`, `row`), so a
  bad row still names its file, row and field in the validation pass; an
  exception of `map_record` itself is a DataError naming the file and row.
  """

  def __init__(self, rows: Sequence[dict], map_record: Callable[[dict], dict]):
    self.rows, self.map_record = rows, map_record

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    record = self.rows[i]   # a DataError of its own (invalid JSON) passes through
    try:
      out = self.map_record(record)
    except DataError:
      raise
    except Exception as e:  # a user's rewrite: any failure is this row's
      raise DataError(f"{record.get('source_file', '<memory>')}:{record.get('row', '?')}: "
                      f"<record>: {type(e).__name__}: {e}") from None
    provenance = {k: record[k] for k in ("source_file", "row") if k in record}
    return {**out, **provenance}


class UnpairedRows(Sequence):
  """The records an unpaired format reads, in the list reader's order.

  `conventions.normalize_records` puts the rows that are not pairwise first (in
  file order), then the pairwise rows unpaired per block of UNPAIR_BLOCK of
  them: the block's desirable (chosen) copies, then its undesirable (rejected)
  ones. `order` [M, 2] holds (row position, copy) per record: copy 0 the row
  as it is, 1 its chosen copy, 2 its rejected copy (`unpaired_order`).
  """

  def __init__(self, rows: Sequence[dict], order: np.ndarray):
    self.rows, self.order = rows, order

  def __len__(self) -> int:
    return len(self.order)

  def __getitem__(self, k: int) -> dict:
    position, copy = (int(v) for v in self.order[k])
    record = self.rows[position]
    return record if copy == 0 else conventions.unpair_record(record, copy == 1)


def unpaired_order(rows: Sequence[dict], *, on_error: str,
                   block: int = conventions.UNPAIR_BLOCK) -> np.ndarray:
  """[M, 2] (row position, copy) of `UnpairedRows`, from one pass parsing every row.

  A row that does not parse counts as not pairwise (the list reader's marker
  record); with on_error="raise" it raises here, at the first such row in file
  order, as the list reader does.
  """
  plain, pairs = array("q"), array("q")
  for i in range(len(rows)):
    try:
      is_pair = conventions.is_pairwise(rows[i])
    except DataError:
      if on_error == "raise":
        raise
      is_pair = False
    (pairs if is_pair else plain).append(i)
  plain_np = np.frombuffer(plain, np.int64)
  pairs_np = np.frombuffer(pairs, np.int64)
  parts = [np.stack([plain_np, np.zeros_like(plain_np)], 1)]
  for start in range(0, len(pairs_np), block):
    chunk = pairs_np[start:start + block]
    parts += [np.stack([chunk, np.full_like(chunk, copy)], 1) for copy in (1, 2)]
  return np.concatenate(parts).astype(np.int64)


# ---------------------------------------------------------------------------
# The validation pass and the lazy examples.

def _validate(record: dict, fmt: str) -> dict:
  return formats.validate_record(conventions.normalize_records([record], fmt)[0], fmt)


def _check_group(record: dict, fmt: str, want: int | None,
                 group_size: int | None) -> int | None:
  """Without group_size every group record needs the first one's number of responses;
  with it, none may have more."""
  if fmt not in tokenize.GROUP_FIELDS:
    return None
  field = tokenize.GROUP_FIELDS[fmt][1]
  n = len(record[field])
  where = f"{record.get('source_file', '<memory>')}:{record.get('row', '?')}"
  if group_size is not None:
    if n > group_size:
      raise DataError(f"{where}: {field}: {n} responses > group_size {group_size}")
    return None
  if want is not None and n != want:
    raise DataError(f"{where}: {field}: {n} responses, earlier records have {want}; "
                    "set config.data.group_size to pad groups")
  return n


class _Checker:
  """Validates row i of `rows` against the first usable row's schema and group size."""

  def __init__(self, rows, fmt, group_size):
    self.rows, self.fmt, self.group_size = rows, fmt, group_size
    self.schema, self.want = None, None

  def check(self, i: int) -> tuple[tuple, int | None]:
    record = _validate(self.rows[i], self.fmt)
    sig = formats.check_columns(record, self.fmt, self.schema)
    return sig, _check_group(record, self.fmt, self.want, self.group_size)

  def fix_reference(self, on_error: str, log) -> int:
    """Finds the first usable row (every process the same), fixing schema and group
    size; returns its position (len(rows) if none). With "raise" a bad first row raises."""
    for i in range(len(self.rows)):
      try:
        self.schema, self.want = self.check(i)
        return i
      except DataError:
        if on_error == "raise":
          raise
    return len(self.rows)


def _allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def validate_rows(rows: Sequence[dict], fmt: str, *, on_error: str,
                  group_size: int | None, log=None, process_index: int = 0, process_count: int = 1,
                  allgather: Callable[[np.ndarray], np.ndarray] | None = None
                  ) -> tuple[np.ndarray, int, int]:
  """The validation pass: ([M] positions of the usable rows in order, rows skipped
  by this process, rows skipped by all), each process validating its own block.

  Raises:
    DataError: on_error="raise" and a bad row: on every process the first in file order.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  checker = _Checker(rows, fmt, group_size)
  first = checker.fix_reference(on_error, log)   # rows before it are bad (skip)
  n = len(rows)
  per = -(-(n - first) // process_count) if n > first else 0
  lo = min(first + process_index * per, n)
  hi = min(lo + per, n)
  keep = array("q")
  skipped, error_at = 0, -1
  if process_index == 0:
    skipped = first
  for i in range(lo, hi):
    try:
      if i != first:
        checker.check(i)
    except DataError as e:
      if on_error == "raise":
        error_at = i
        break
      skipped += 1
      if log is not None:
        log.warning("skipping malformed record: %s", e)
      continue
    keep.append(i)
  keep_np = np.frombuffer(keep, np.int64).copy()
  if process_count == 1:
    if error_at >= 0:
      checker.check(error_at)   # raises its DataError
    return keep_np, skipped, skipped
  gather = allgather or _allgather
  # One fixed-shape gather of (error row, skipped, kept), then of the padded positions.
  stats = gather(np.array([error_at, skipped, len(keep_np)], np.int32))   # [P, 3]
  errors = [int(e) for e in stats[:, 0] if e >= 0]
  if errors:
    checker.check(min(errors))   # the same DataError line on every process
    raise AssertionError("unreachable: the row failed in its own block")
  width = max(int(stats[:, 2].max()), 1)
  padded = np.full(width, -1, np.int32)
  padded[:len(keep_np)] = keep_np
  blocks = gather(padded)   # [P, width]
  keep_all = np.concatenate([blocks[p, :int(stats[p, 2])] for p in range(process_count)])
  return keep_all.astype(np.int64), skipped, int(stats[:, 1].sum())


class LazyExamples(Sequence):
  """Item k: usable row `keep[k]` of `rows`, validated and tokenized on access."""

  def __init__(self, rows: Sequence[dict], keep: np.ndarray, fmt: str, tokenizer: Any,
               cfg: tokenize.TokenizeConfig, content_hash: str, name: str = ""):
    self.rows, self.keep, self.fmt, self.tokenizer, self.cfg = rows, keep, fmt, tokenizer, cfg
    self.content_hash = content_hash   # fingerprint.compute reads this
    self.name = name

  def __len__(self) -> int:
    return len(self.keep)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"example {i} of {len(self)}")
    example = self._example(i)
    if self.fmt != "unpaired_kl":
      return example
    # KTO: the completion of the previous example of its chunk (the first takes the
    # last's), as tokenize.add_kl_sequences over a list does.
    chunk = self.cfg.kl_chunk_size or len(self)
    start = i - i % chunk
    prev = i - 1 if i > start else min(start + chunk, len(self)) - 1
    pad = self.tokenizer.pad_token_id
    pad = (self.tokenizer.eos_token_id or 0) if pad is None else pad
    if prev == i:
      return tokenize.add_kl_sequences([example], 1, pad_id=pad)[0]
    return tokenize.add_kl_sequences([self._example(prev), example], 2, pad_id=pad)[1]

  def _example(self, i: int) -> dict:
    record = _validate(self.rows[int(self.keep[i])], self.fmt)
    return tokenize.tokenize_example(record, self.fmt, self.tokenizer, self.cfg)

  def __repr__(self) -> str:
    return f"LazyExamples({self.name!r}, {len(self)} rows)"


def source_content_hash(source_hash: str, split: str) -> str:
  """A lazy run's (and a prepared set's) data content hash: its source's and split's."""
  return hashlib.sha256(f"source|{source_hash}|{split}".encode()).hexdigest()


def source_hash(path: str) -> str:
  """sha256 of a source's bytes: a file (not its name: the same data moved keeps its
  hash), every file under a directory (by relative path), or the name itself for a
  generated (toy:) or hub source."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    files = [("", path)]
  elif os.path.isdir(path):
    files = sorted((os.path.relpath(os.path.join(d, f), path), os.path.join(d, f))
                   for d, _, names in os.walk(path) for f in names)
  else:
    h.update(f"name|{path}".encode())
    return h.hexdigest()
  for rel, full in files:
    h.update(f"file|{rel}|".encode())
    with open(full, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


_READERS = (".jsonl", ".json", ".parquet")


def _file_rows(path: str) -> Sequence[dict]:
  lower = path.lower()
  if lower.endswith(".jsonl"):
    return index_jsonl(path)
  if lower.endswith(".json"):
    with open(path, "rb") as f:
      head = f.read(4096).lstrip()
    return index_json_array(path) if head.startswith(b"[") else index_jsonl(path)
  if lower.endswith(".parquet"):
    return ParquetRows(path)
  raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")


def open_rows(path: str, *, split: str) -> tuple[Sequence[dict], str]:
  """(random-access raw rows, content hash) of any source `sources.load_records` reads.

  Raises:
    DataError: an unsupported file, a missing split, a malformed JSON array.
    FileNotFoundError: a path that is neither a file, a directory nor a dataset name.
  """
  from jaxalign.data import sources
  content = source_content_hash(source_hash(path), split)
  if path.startswith("toy:"):
    from jaxalign.data import reading
    return reading.toy_rows(path), content
  if os.path.isfile(path):
    return _file_rows(path), content
  import datasets
  saved = ("dataset_info.json", "state.json", "dataset_dict.json")
  if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in saved):
    ds = datasets.load_from_disk(path)
    return ArrowRows(_split(ds, path, split), path), content
  if os.path.isdir(path):
    files = sources._split_files(path, split)
    if files and all(f.lower().endswith(_READERS) for f in files):
      parts = [_file_rows(f) for f in files]
      _check_directory_fields(path, files, parts)
      return ConcatRows(parts), content
  ds = datasets.load_dataset(path, split=split)
  return ArrowRows(ds, path), source_content_hash(
      f"datasets|{path}|{getattr(ds, '_fingerprint', '')}", split)


def _split(ds: Any, name: str, split: str) -> Any:
  import datasets
  if isinstance(ds, (datasets.DatasetDict, dict)):
    if split not in ds:
      raise DataError(f"{name}: no split {split!r}; available: {sorted(ds)}")
    ds = ds[split]
  return ds


def _check_directory_fields(path: str, files: list[str], parts) -> None:
  """The list reader's rule (sources.read_directory): the files' fields agree; compared
  on each file's first row (the validation pass then checks every row)."""
  kinds: dict[tuple, list[str]] = {}
  for f, rows in zip(files, parts):
    if len(rows):
      names = tuple(sorted(k for k in rows[0] if k not in ("source_file", "row")))
      kinds.setdefault(names, []).append(f)
  if len(kinds) > 1:
    described = "; ".join(
        f"{os.path.relpath(fs[0], path)}{f' (and {len(fs) - 1} more)' if len(fs) > 1 else ''}"
        f" has {list(names)}" for names, fs in kinds.items())
    raise DataError(f"{path}: its data files have different fields: {described}; "
                    "give one schema per directory")


def open_source(path: str, fmt: str, tokenizer: Any, *, split: str = "train",
                max_length: int, max_prompt_length: int, on_error: str,
                group_size: int | None = None, log=None,
                process_index: int | None = None, process_count: int | None = None,
                map_record: Callable[[dict], dict] | None = None, kl_chunk_size: int = 0
                ) -> tuple[LazyExamples, int]:
  """(lazy examples, rows skipped by all processes) of any source; see the module docstring.

  Args:
    map_record: record -> record of `fmt` (an online method's rewrite), applied to
      each raw row when it is read (`MappedRows`).
    kl_chunk_size: unpaired_kl: its KL sequences pair examples within chunks of
      this many (the per-process batch); 0: one chunk of all.

  Raises:
    DataError: a malformed row (on_error="raise"), or no usable rows.
  """
  import jax
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  cfg = tokenize.TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length,
                                group_size=group_size,
                                kl_chunk_size=kl_chunk_size if fmt == "unpaired_kl" else 0)
  rows, content = open_rows(path, split=split)
  if map_record is not None:
    rows = MappedRows(rows, map_record)
  if fmt in conventions.UNPAIRED_FORMATS:
    rows = UnpairedRows(rows, unpaired_order(rows, on_error=on_error))
  if cfg.kl_chunk_size:   # the KL pairs depend on the chunks: part of what fixes the data
    content = hashlib.sha256(f"{content}|kl_chunk|{cfg.kl_chunk_size}".encode()).hexdigest()
  keep, mine, skipped = validate_rows(rows, fmt, on_error=on_error, group_size=group_size,
                                      log=log, process_index=pi,
                                      process_count=pc)
  if log is not None and pc > 1 and mine:
    log.warning("process %d skipped %d malformed records of %s", pi, mine, path)
  if not len(keep):
    raise DataError(f"{path}: no usable records")
  return LazyExamples(rows, keep, fmt, tokenizer, cfg, content, path), skipped

