"""Read raw records from JSONL / JSON / Parquet files or Hugging Face datasets.

Every record gets provenance keys ``source_file`` and ``row`` (1-based: the line
number for JSONL, the row index + 1 otherwise) so validation errors can name
them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxalign.data.formats import DataError

Record = dict[str, Any]


def _with_provenance(obj: Any, file: str, row: int) -> Record:
  if not isinstance(obj, dict):
    raise DataError(f"{file}:{row}: <record>: expected a JSON object, got {type(obj).__name__}")
  return {**obj, "source_file": file, "row": row}


def read_jsonl(path: str, *, on_error: str = "raise") -> list[Record]:
  """One JSON object per line; blank lines are skipped (but still counted).

  With on_error="skip" a line that is not valid UTF-8, not JSON or not an
  object becomes a marker record (`_invalid` holds the problem) that
  validation counts and drops like any other bad row.
  """
  out = []
  with open(path, "rb") as f:
    for row, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{row}: invalid JSON: {e}") from None
        out.append(_with_provenance(obj, path, row))
      except UnicodeDecodeError as e:
        if on_error != "skip":
          raise DataError(f"{path}:{row}: invalid UTF-8: {e}") from None
        out.append({"_invalid": f"invalid UTF-8: {e}", "source_file": path, "row": row})
      except DataError as e:
        if on_error != "skip":
          raise
        problem = str(e).split(f"{path}:{row}: ", 1)[-1]
        out.append({"_invalid": problem, "source_file": path, "row": row})
  return out


def read_json(path: str) -> list[Record]:
  """A JSON array of objects, or else one object per line (JSONL)."""
  with open(path, "rb") as f:
    head = f.read(4096).lstrip()
  if not head.startswith(b"["):
    return read_jsonl(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    line = getattr(e, "lineno", "?")
    raise DataError(f"{path}:{line}: invalid JSON: {e}") from None
  return [_with_provenance(obj, path, i + 1) for i, obj in enumerate(data)]


def read_parquet(path: str) -> list[Record]:
  import pyarrow.parquet as pq
  rows = pq.read_table(path).to_pylist()
  return [_with_provenance(r, path, i + 1) for i, r in enumerate(rows)]


def _from_hf(ds: Any, name: str, split: str) -> list[Record]:
  import datasets
  if isinstance(ds, (datasets.DatasetDict, dict)):
    if split not in ds:
      raise DataError(f"{name}: no split {split!r}; available: {sorted(ds)}")
    ds = ds[split]
  return [_with_provenance(r, name, i + 1) for i, r in enumerate(ds)]


def load_records(path: str | os.PathLike, *, split: str = "train",
                 on_error: str = "raise") -> list[Record]:
  """Loads raw records with provenance.

  Args:
    path: ``.jsonl`` / ``.json`` / ``.parquet`` file; a directory of such files
      (the split's files, found as ``datasets`` finds them, each read with its own
      file and row; their fields must agree); a directory written by
      ``datasets.Dataset(Dict).save_to_disk``; or anything
      ``datasets.load_dataset`` accepts (hub name, data directory, script).
    split: split to take from a DatasetDict / ``load_dataset``.
    on_error: "skip" turns unreadable JSONL lines into marker records that
      validation drops and counts (see `read_jsonl`); "raise" stops at them.

  Returns:
    A list of dicts, each with the file's keys plus ``source_file`` and ``row``.

  Raises:
    DataError: a malformed line, ``"{file}:{row}: invalid JSON: ..."``.
  """
  path = os.fspath(path)
  lower = path.lower()
  if os.path.isfile(path):
    if lower.endswith(".jsonl"):
      return read_jsonl(path, on_error=on_error)
    if lower.endswith(".json"):
      return read_json(path)
    if lower.endswith(".parquet"):
      return read_parquet(path)
    raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")
  import datasets
  saved = ("dataset_info.json", "state.json", "dataset_dict.json")
  if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in saved):
    return _from_hf(datasets.load_from_disk(path), path, split)
  if os.path.isdir(path):
    files = _split_files(path, split)
    if files and all(f.lower().endswith(_READERS) for f in files):
      return read_directory(path, files, on_error=on_error)
  return _from_hf(datasets.load_dataset(path, split=split), path, split)


_READERS = (".jsonl", ".json", ".parquet")
_PROVENANCE = ("source_file", "row", "_invalid")


def _split_files(path: str, split: str) -> list[str]:
  """The data files of `split` in directory `path`, found as `datasets.load_dataset`
  finds them (train.jsonl / test.jsonl, train-0000.parquet, or every file for "train")."""
  from datasets import data_files
  try:
    patterns = data_files.get_data_patterns(path)
  except data_files.EmptyDatasetError:
    return []
  resolved = data_files.DataFilesDict.from_patterns(patterns, base_path=path)
  if split not in resolved:
    raise DataError(f"{path}: no split {split!r}; available: {sorted(resolved)}")
  return sorted(str(f) for f in resolved[split])


def read_directory(path: str, files: list[str], *, on_error: str = "raise") -> list[Record]:
  """Records of several data files, each keeping its own file and row.

  Raises:
    DataError: the files' fields differ (one line naming a file of each kind), or
      a malformed line (`{file}:{row}: ...`).
  """
  per_file, fields = [], {}
  for f in files:
    records = load_records(f, on_error=on_error)
    per_file.append(records)
    names = set()
    for r in records:
      names.update(k for k in r if k not in _PROVENANCE)
    fields[f] = tuple(sorted(names))
  kinds: dict[tuple[str, ...], list[str]] = {}
  for f, names in fields.items():
    if names:   # an empty file has no schema to disagree with
      kinds.setdefault(names, []).append(f)
  if len(kinds) > 1:
    described = "; ".join(
        f"{os.path.relpath(fs[0], path)}{f' (and {len(fs) - 1} more)' if len(fs) > 1 else ''}"
        f" has {list(names)}" for names, fs in kinds.items())
    raise DataError(f"{path}: its data files have different fields: {described}; "
                    "give one schema per directory")
  return [r for records in per_file for r in records]
