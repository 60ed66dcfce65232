"""Prepared datasets: a source tokenized once into ArrayRecord shards, read back lazily.

`jaxalign prepare` reads a source, validates it exactly as training does
(`reading.read_records`, `formats.validate_records`, the group-size check), then
tokenizes it in shards of `shard_size` validated records, optionally in worker
processes, one ArrayRecord file per shard:

  DIR/manifest.json                  written last; its presence means complete
  DIR/shard-00003-of-00010.arrayrecord
  DIR/shard-00003-of-00010.json      the shard's rows, bytes and sha256, after the file

A record is one example: its columns' raw bytes, concatenated in the manifest's
column order, each of a fixed dtype and shape (the same for every example). A
rerun with the same source and settings keeps every shard whose sidecar matches
its file (resumable); the manifest holds the tokenizer's fingerprint
(`fingerprint.tokenizer_hash`), the tokenization settings, the record layout, the
source's content hash, the example count, the skipped count, the shard list and
`content_hash`: `fingerprint.examples_hash` of the examples in order. A run on
the set stores `lazy.source_content_hash` of the source's hash and split, as a
run on the raw source does, so a run's data fingerprint is the same from either.

`open_prepared` is the training side (through `examples.open_examples`, the
entry point of every source): a random-access sequence over the shards
(one thread-safe `ArrayRecordReader` per shard, opened on first read), which
`pipeline.make_dataset` reads a batch at a time (`read_batch`), so a process
decodes only the records it reads. It
refuses (ConfigError, one line) a manifest made with another tokenizer or other
settings, and names the file of an absent, truncated or corrupted shard
(DataError; every shard's sha256 is checked when the set is opened). A directory
of shards without a manifest (`prepare` interrupted or still running) is refused
by `examples.open_examples` (`incomplete_reason`), never read as raw data.

What prepare itself keeps in memory: the source's validated records (not their
tokens). Not supported yet: unpaired_kl data (its KL sequences pair examples
within the run's batches) and online methods (they rewrite records first).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import time
from typing import Any, Sequence

import threading

import numpy as np

from jaxalign import errors, fingerprint
from jaxalign.errors import ConfigError
from jaxalign.data import formats, lazy as lazy_lib, reading, tokenize

MANIFEST = "manifest.json"
KIND = "jaxalign-prepared-dataset"
VERSION = 1
RECORD_FORMAT = "arrayrecord"
# One record per chunk: random reads decode one example, not a group of them.
_WRITER_OPTIONS = "group_size:1"


def is_prepared(path: str) -> bool:
  """Whether `path` is a directory written by `prepare` (it has a manifest)."""
  return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


# A shard file of `prepare` (complete or still being written), its sidecar, or the
# manifest being written: what a directory of `prepare`'s output holds before its manifest.
_PREPARE_FILE = re.compile(r"^(shard-\d{5}-of-\d{5}\.(arrayrecord|json)|manifest\.json)(\.tmp)?$")


def incomplete_reason(path: str) -> str | None:
  """Why `path` is an unfinished `prepare` output (shard files, no manifest), else None.

  Such a directory must not be read as raw data: its sidecars are JSON objects,
  not JSONL rows. Shards are complete when their sidecar is written (after the
  shard file), so "k of n shards written" counts sidecars.
  """
  if not path or not os.path.isdir(path) or is_prepared(path):
    return None
  try:
    names = os.listdir(path)
  except OSError:
    return None
  ours = [n for n in names if _PREPARE_FILE.match(n)]
  if not any(n.endswith((".arrayrecord", ".arrayrecord.tmp")) for n in ours):
    return None   # sidecar-looking JSON alone may be a user's data
  totals = {int(n.split("-")[3][:5]) for n in ours if n.startswith("shard-")}
  done = sum(n.endswith(".json") and n.startswith("shard-") for n in ours)
  of = f"{done} of {totals.pop()}" if len(totals) == 1 else str(done)
  return f"{of} shards written and no {MANIFEST}"


def settings(fmt: str, tokenizer: Any, *, max_length: int, max_prompt_length: int,
             group_size: int | None, on_error: str, split: str) -> dict[str, Any]:
  """What decides the examples besides the source: compared when a run opens a set."""
  return {"format": fmt, "max_length": int(max_length),
          "max_prompt_length": int(max_prompt_length),
          "group_size": None if group_size is None else int(group_size),
          "on_error": on_error, "split": split,
          "tokenizer_hash": fingerprint.tokenizer_hash(tokenizer)}


def _shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}.arrayrecord"


def _sidecar(path: str) -> str:
  return path[:-len(".arrayrecord")] + ".json"


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _remove_partial(tmp: str) -> None:
  try:
    os.remove(tmp)
  except OSError:   # never created, or the directory went away
    pass


def _write_json(path: str, obj: dict) -> None:
  """Writes `path` whole or not at all (OutputWriteError naming it: disk full, read-only)."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError as e:
    _remove_partial(tmp)
    raise errors.write_failure(path, e) from e


def _layout(example: dict) -> list[list]:
  """[[column, dtype, shape], ...] in a fixed (sorted) order."""
  return [[k, np.asarray(example[k]).dtype.str, list(np.shape(example[k]))]
          for k in sorted(example)]


def encode(example: dict, layout: list[list]) -> bytes:
  return b"".join(np.ascontiguousarray(example[k], dtype=np.dtype(d)).tobytes()
                  for k, d, _ in layout)


def decode(data: bytes, layout: list[list]) -> dict[str, np.ndarray]:
  out, offset = {}, 0
  for k, d, shape in layout:
    dtype = np.dtype(d)
    count = int(np.prod(shape, dtype=np.int64))
    out[k] = np.frombuffer(data, dtype, count, offset).reshape(shape)
    offset += count * dtype.itemsize
  return out


def decode_batch(data: bytes, layout: list[list], n: int) -> dict[str, np.ndarray]:
  """`n` records of one layout, joined end to end -> {column: [n, *shape]}."""
  fields = [(k, np.dtype(d), tuple(shape)) for k, d, shape in layout]
  size = sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for _, dt, shape in fields)
  rows = np.frombuffer(data, np.uint8).reshape(n, size)
  out, offset = {}, 0
  for k, dt, shape in fields:
    width = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    out[k] = rows[:, offset:offset + width].copy().view(dt).reshape((n, *shape))
    offset += width
  return out


# The job's fixed part (format, tokenizer, settings, output), set once per worker
# process by `_init_worker` (and in this process when there are no workers).
_JOB: dict[str, Any] = {}


def _init_worker(job: dict[str, Any]) -> None:
  _JOB.clear()
  _JOB.update(job)


def _tokenize_shard(task: tuple[int, list[dict]]) -> dict[str, Any]:
  """Tokenizes and writes shard i of `records`; returns its sidecar (rows, layout, ...)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  i, records = task
  job = _JOB
  examples, skipped = tokenize.tokenize_records(records, job["fmt"], job["tokenizer"],
                                                job["tcfg"], on_error=job["on_error"])
  layout = _layout(examples[0]) if examples else None
  path = os.path.join(job["out"], _shard_name(i, job["num_shards"]))
  tmp = path + ".tmp"
  for ex in examples:
    if _layout(ex) != layout:
      raise formats.DataError(
          f"{job['source']}: shard {i}: an example's columns {_layout(ex)} differ from the "
          f"first example's {layout}; the records' optional fields disagree")
  try:
    writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
      for ex in examples:
        writer.write(encode(ex, layout))
    finally:
      writer.close()   # flushes the last chunk: where a full disk usually shows
    os.replace(tmp, path)
  except (OSError, RuntimeError) as e:   # ArrayRecord: RuntimeError("write() failed: ...")
    _remove_partial(tmp)
    raise errors.write_failure(path, e) from e
  meta = {"job": job["key"], "file": os.path.basename(path), "rows": len(examples),
          "skipped": skipped, "layout": layout, "bytes": os.path.getsize(path),
          "sha256": _file_sha256(path)}
  _write_json(_sidecar(path), meta)
  return meta


def _complete_shard(out: str, i: int, num_shards: int, key: str) -> dict[str, Any] | None:
  """The sidecar of shard i when the shard is complete and made by this job, else None."""
  path = os.path.join(out, _shard_name(i, num_shards))
  try:
    with open(_sidecar(path)) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  if meta.get("job") != key or not os.path.isfile(path):
    return None
  if os.path.getsize(path) != meta.get("bytes") or _file_sha256(path) != meta.get("sha256"):
    return None
  return meta


def prepare(source: str, out: str, fmt: str, tokenizer: Any, *, max_length: int,
            max_prompt_length: int, group_size: int | None = None, on_error: str = "raise",
            split: str = "train", shard_size: int = 10_000, workers: int = 1,
            tokenizer_name: str = "") -> dict[str, Any]:
  """Tokenizes `source` into shards under `out` and writes its manifest; returns it.

  The manifest also carries "reused_shards"/"written_shards" of this call (not
  saved) for the caller to report.

  Raises:
    ConfigError: a format prepare does not handle (unpaired_kl), bad shard_size/workers.
    DataError: a malformed record, `{file}:{row}: {field}: ...` (with on_error="raise").
  """
  if fmt == "unpaired_kl":
    raise ConfigError(
        "jaxalign prepare: unpaired_kl data (KTO) pairs its KL sequences within the run's "
        "batches; train it from the raw source")
  if shard_size < 1 or workers < 1:
    raise ConfigError(f"jaxalign prepare: need shard_size >= 1 and workers >= 1, "
                      f"got {shard_size} and {workers}")
  start = time.perf_counter()
  tcfg = tokenize.TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length,
                                 group_size=group_size)
  sets = settings(fmt, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                  group_size=group_size, on_error=on_error, split=split)
  src_hash = lazy_lib.source_hash(source)
  # The same validation, in the same order, as a run on the raw source.
  records = reading.read_records(source, split=split, on_error=on_error)
  valid, skipped = formats.validate_records(records, fmt, on_error=on_error)
  del records
  if group_size is None:
    valid, bad = reading.check_group_sizes(valid, fmt, on_error=on_error)
    skipped += bad
  if not valid:
    raise formats.DataError(f"{source}: no usable records")
  key = hashlib.sha256(json.dumps({"settings": sets, "source": src_hash, "rows": len(valid),
                                   "shard_size": shard_size}, sort_keys=True).encode()
                       ).hexdigest()
  os.makedirs(out, exist_ok=True)
  if os.path.exists(os.path.join(out, MANIFEST)):
    os.remove(os.path.join(out, MANIFEST))   # incomplete again until rewritten
  num_shards = -(-len(valid) // shard_size)
  metas: dict[int, dict] = {}
  for i in range(num_shards):
    meta = _complete_shard(out, i, num_shards, key)
    if meta is not None:
      metas[i] = meta
  todo = [i for i in range(num_shards) if i not in metas]
  job = dict(fmt=fmt, tokenizer=tokenizer, tcfg=tcfg, on_error=on_error, out=out,
             num_shards=num_shards, key=key, source=source)
  tasks = ((i, valid[i * shard_size:(i + 1) * shard_size]) for i in todo)
  try:
    _write_shards(tasks, job, metas, workers=min(workers, len(todo)))
  except errors.OutputWriteError as e:   # disk full, read-only: the finished shards stay
    raise errors.OutputWriteError(
        f"{e}; {len(metas)} of {num_shards} shards are complete and kept: free space and "
        f"rerun the same jaxalign prepare --out {out} to finish") from e
  return _finish(out, source, src_hash, tokenizer_name, sets, metas, skipped=skipped,
                 num_shards=num_shards, shard_size=shard_size, reused=num_shards - len(todo),
                 start=start)


def _write_shards(tasks, job: dict[str, Any], metas: dict[int, dict], *, workers: int) -> None:
  """Tokenizes and writes each (i, records) of `tasks`, adding its sidecar to `metas`."""
  if workers > 1:
    # spawn, not fork: the caller may have started JAX's threads. Each worker gets the
    # tokenizer once and its shards' records as they are handed out.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
      for meta in pool.imap_unordered(_tokenize_shard, tasks):
        metas[int(meta["file"].split("-")[1])] = meta
  else:
    _init_worker(job)
    try:
      for task in tasks:
        meta = _tokenize_shard(task)
        metas[task[0]] = meta
    finally:
      _JOB.clear()


def _finish(out: str, source: str, src_hash: str, tokenizer_name: str, sets: dict,
            metas: dict[int, dict], *, skipped: int, num_shards: int, shard_size: int,
            reused: int, start: float) -> dict[str, Any]:
  """Checks the shards agree, writes the manifest (last) and returns it."""
  layouts = {json.dumps(m["layout"]) for m in metas.values() if m["layout"] is not None}
  if len(layouts) > 1:
    raise formats.DataError(f"{source}: the shards' examples have different columns "
                            f"({sorted(layouts)}); the records' optional fields disagree")
  if not layouts:
    raise formats.DataError(f"{source}: no usable records")
  shards = [{k: metas[i][k] for k in ("file", "rows", "bytes", "sha256")}
            for i in range(num_shards)]
  manifest = {
      "kind": KIND, "version": VERSION, "record_format": RECORD_FORMAT,
      "source": source, "source_hash": src_hash, "tokenizer": tokenizer_name,
      "settings": sets, "layout": json.loads(layouts.pop()),
      "examples": sum(s["rows"] for s in shards),
      "skipped": skipped + sum(metas[i]["skipped"] for i in range(num_shards)),
      "shard_size": shard_size, "shards": shards,
  }
  manifest["content_hash"] = fingerprint.examples_hash(
      PreparedExamples(out, manifest, check_sizes=False))
  _write_json(os.path.join(out, MANIFEST), manifest)
  return {**manifest, "reused_shards": reused, "written_shards": num_shards - reused,
          "seconds": time.perf_counter() - start}


def read_manifest(path: str) -> dict[str, Any]:
  """DIR/manifest.json; DataError naming it when unreadable or not a prepared set."""
  file = os.path.join(path, MANIFEST)
  try:
    with open(file) as f:
      manifest = json.load(f)
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise formats.DataError(f"{file}: not a readable manifest ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
    raise formats.DataError(f"{file}: not a jaxalign prepared-dataset manifest")
  if manifest.get("version") != VERSION or manifest.get("record_format") != RECORD_FORMAT:
    raise formats.DataError(f"{file}: version {manifest.get('version')} / record format "
                            f"{manifest.get('record_format')!r}, this jaxalign reads version "
                            f"{VERSION} / {RECORD_FORMAT!r}; rerun jaxalign prepare")
  return manifest


class PreparedExamples(Sequence):
  """Random-access examples of a prepared set: item i is decoded from its shard on read.

  Picklable (Grain worker processes): it holds paths and the layout, and the
  ArrayRecord readers open lazily in each process.
  """

  def __init__(self, path: str, manifest: dict[str, Any] | None = None, *,
               check_sizes: bool = True):
    self.path = path
    self.manifest = read_manifest(path) if manifest is None else manifest
    self.layout = self.manifest["layout"]
    # As a lazy run on the source stores it (lazy.open_rows), so either may resume
    # the other; the manifest's "content_hash" is the examples' own hash.
    self.content_hash = lazy_lib.source_content_hash(
        self.manifest["source_hash"], self.manifest["settings"].get("split", "train"))
    files = []
    for shard in self.manifest["shards"]:
      file = os.path.join(path, shard["file"])
      if check_sizes:
        if not os.path.isfile(file):
          raise formats.DataError(f"{file}: shard missing from prepared dataset {path} "
                                  f"(listed in its {MANIFEST}); rerun jaxalign prepare")
        size = os.path.getsize(file)
        if size != shard["bytes"]:
          raise formats.DataError(f"{file}: {size} bytes, the manifest says {shard['bytes']} "
                                  f"(truncated or rewritten); rerun jaxalign prepare")
      if shard["rows"]:
        files.append(file)
    self._files = files
    rows = [int(s["rows"]) for s in self.manifest["shards"] if s["rows"]]
    self._starts = np.cumsum([0, *rows])             # shard k: examples [starts[k], starts[k+1])
    self._len = int(self._starts[-1])
    self._readers: list = [None] * len(files)
    self._lock = threading.Lock()

  def _reader(self, k: int):
    """Shard k's reader (thread-safe; Grain's threads share it), opened on first use."""
    if self._readers[k] is None:
      with self._lock:
        if self._readers[k] is None:
          from array_record.python.array_record_module import ArrayRecordReader
          self._readers[k] = ArrayRecordReader(self._files[k], "readahead_buffer_size:0")
    return self._readers[k]

  def _read(self, indices: np.ndarray) -> list[bytes]:
    """The records of examples `indices` (in [0, len)), in their order: one `read` per
    shard (not ArrayRecordDataSource.__getitems__, which starts a thread pool each call:
    4.5x slower on the pipeline's 32-example batches)."""
    shard = np.searchsorted(self._starts, indices, side="right") - 1
    out: list = [None] * len(indices)
    for k in np.unique(shard):
      where = np.flatnonzero(shard == k)
      records = self._reader(int(k)).read((indices[where] - self._starts[k]).tolist())
      for j, record in zip(where, records):
        out[j] = record
    return out

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._len))]
    i = int(i)
    if i < 0:
      i += self._len
    if not 0 <= i < self._len:
      raise IndexError(f"example {i} of {self._len}")
    return decode(self._read(np.array([i]))[0], self.layout)

  batched_reads = True   # read_batch below: jaxalign.data.pipeline's fast path

  def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Examples `indices` stacked ({column: [len(indices), ...]}): one batched read of
    the shards (ArrayRecord's `__getitems__`) and one decode of the joined bytes,
    since every record of a set has the same layout. The pipeline's fast path."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if ((indices < 0) | (indices >= self._len)).any():
      raise IndexError(f"examples {indices.tolist()} of {self._len}")
    return decode_batch(b"".join(self._read(indices)), self.layout, len(indices))

  def __getstate__(self):   # readers and the lock stay in their process
    return {**self.__dict__, "_readers": [None] * len(self._files), "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __repr__(self) -> str:
    return f"PreparedExamples({self.path!r}, {self._len} examples)"


def open_prepared(path: str, fmt: str, tokenizer: Any, *, max_length: int,
                  max_prompt_length: int, group_size: int | None, on_error: str, split: str,
                  key: str = "config.data.train_path") -> tuple[PreparedExamples, int]:
  """(examples, records skipped at prepare time) of prepared set `path`, for this run.

  Raises:
    ConfigError: one line naming `key` when the set was made with another
      tokenizer or other settings than the run's.
    DataError: an unreadable manifest, or an absent, truncated or corrupted shard,
      naming the file.
  """
  manifest = read_manifest(path)
  want = settings(fmt, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                  group_size=group_size, on_error=on_error, split=split)
  have = manifest.get("settings", {})
  diffs = [f"{k} {have.get(k)!r} (prepared) vs {want[k]!r} (this run)"
           for k in sorted(want) if k != "tokenizer_hash" and have.get(k) != want[k]]
  if have.get("tokenizer_hash") != want["tokenizer_hash"]:
    diffs.append(f"tokenizer hash {str(have.get('tokenizer_hash'))[:12]} (prepared, "
                 f"{manifest.get('tokenizer') or '?'}) vs {want['tokenizer_hash'][:12]} "
                 "(this run)")
  if diffs:
    raise ConfigError(
        f"{key}: prepared dataset {path} does not match this run: {', '.join(diffs)}; rerun "
        "jaxalign prepare with this run's config")
  examples = PreparedExamples(path, manifest)
  verify_checksums(path, manifest)
  return examples, int(manifest.get("skipped", 0))


def verify_checksums(path: str, manifest: dict[str, Any]) -> None:
  """Each shard's sha256 against the manifest's, before anything is compiled or written.

  One streamed read of the set (hashlib's sha256 runs at about 1 GB/s, well under
  the raw path's validation pass), so a corrupted shard (a flipped byte keeps its
  size) is named here rather than as a checksum traceback from ArrayRecord inside
  the Grain pipeline mid-run.

  Raises:
    DataError: naming the first shard whose bytes differ from the manifest's hash.
  """
  for shard in manifest["shards"]:
    file = os.path.join(path, shard["file"])
    if _file_sha256(file) != shard["sha256"]:
      raise formats.DataError(
          f"{file}: corrupted (its sha256 differs from the one in {os.path.join(path, MANIFEST)}"
          f", same size); rerun jaxalign prepare into {path} to rewrite it")

