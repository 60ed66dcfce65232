"""What a run's state depends on besides its config: the data, the tokenizer and the
tokenization settings, as content hashes stored with the run.

A resumed run continues from a data-iterator position and, for precomputed
references, from a table of log-probs with one row per example. Both are only
right for the examples they were made from. `compute` hashes the tokenized
examples (every column, streamed one example at a time, so it costs one pass of
sha256 over arrays already in memory), the tokenizer (its vocabulary, special
tokens, BOS/EOS behaviour and chat template) and the settings that turned records
into examples. The result is written to WORKDIR/data_fingerprint.json when a run
starts and beside ref_logps.npy as ref_logps.fingerprint.json; `diff` names what
changed between two of them, in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterable

import numpy as np
from etils import epath

from jaxalign import paths
from jaxalign.errors import ResumeMismatchError, RunError

log = logging.getLogger("jaxalign")

RUN_FILE = "data_fingerprint.json"
REF_FILE = "ref_logps.fingerprint.json"
# Columns added to examples after tokenization (the reference table itself).
_DERIVED_COLUMNS = ("ref_logps",)
VERSION = 1


def _update_array(h, name: str, value) -> None:
  a = np.ascontiguousarray(np.asarray(value))
  h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
  h.update(a.tobytes())


def examples_hash(examples: Iterable[dict]) -> str:
  """sha256 over every column of every example, in order (derived columns excluded)."""
  h = hashlib.sha256()
  for ex in examples:
    for key in sorted(ex):
      if key in _DERIVED_COLUMNS:
        continue
      value = ex[key]
      if isinstance(value, str):
        h.update(f"{key}|str|{value}|".encode())
      else:
        _update_array(h, key, value)
    h.update(b"\x00")
  return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
  """sha256 of what decides a tokenizer's ids: vocabulary, specials, template, pipeline."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  facts = {
      "class": type(tokenizer).__name__,
      "vocab": sorted(tokenizer.get_vocab().items()),
      "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
      "chat_template": getattr(tokenizer, "chat_template", None),
      "add_bos": getattr(tokenizer, "add_bos_token", None),
      "add_eos": getattr(tokenizer, "add_eos_token", None),
      # The fast tokenizer's full pipeline (normalizer, pre-tokenizer, model, post-processor).
      "backend": backend.to_str() if backend is not None else None,
  }
  return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def compute(examples: list[dict], tokenizer: Any, *, train_path: str,
            settings: dict[str, Any]) -> dict[str, Any]:
  """The fingerprint of a run's data: {rows, examples, tokenizer, tokenization, train_path}."""
  return {
      "version": VERSION,
      "train_path": str(train_path),
      "rows": len(examples),
      # What examples.open_examples returns (lazy or prepared) carries its source's hash;
      # a plain list (older versions' list read, a test's reference) is hashed as examples.
      "examples": getattr(examples, "content_hash", None) or examples_hash(examples),
      # How "examples" was hashed: the source's bytes (content: source) or the examples.
      "content": "source" if getattr(examples, "content_hash", None) else "examples",
      "tokenizer": tokenizer_hash(tokenizer),
      "tokenization": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in sorted(settings.items())},
  }


def settings_from_config(config, data_format: str) -> dict[str, Any]:
  """The tokenization settings that turn the config's records into examples."""
  d = config.data
  return {"format": data_format, "max_length": int(d.max_length),
          "max_prompt_length": int(d.max_prompt_length), "group_size": d.group_size,
          "on_error": d.on_error, "tokenizer": d.tokenizer or config.model.get("hf_path", "")}


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """What differs between two fingerprints, one short phrase each; [] when the same."""
  changes = []
  if old.get("train_path") != new.get("train_path"):
    changes.append(f"data.train_path {old.get('train_path')!r} -> {new.get('train_path')!r}")
  if old.get("rows") != new.get("rows"):
    changes.append(f"rows {old.get('rows')} -> {new.get('rows')}")
  if old.get("tokenizer") != new.get("tokenizer"):
    changes.append(f"tokenizer hash {str(old.get('tokenizer'))[:12]} -> "
                   f"{str(new.get('tokenizer'))[:12]}")
  old_t, new_t = old.get("tokenization", {}), new.get("tokenization", {})
  for key in sorted(set(old_t) | set(new_t)):
    if old_t.get(key) != new_t.get(key):
      changes.append(f"tokenization {key} {old_t.get(key)!r} -> {new_t.get(key)!r}")
  if old.get("examples") != new.get("examples"):
    changes.append(f"content hash {str(old.get('examples'))[:12]} -> "
                   f"{str(new.get('examples'))[:12]}")
  return changes


def same_data(old: dict[str, Any], new: dict[str, Any]) -> bool:
  """Whether two fingerprints describe the same examples (the path may differ)."""
  return all(old.get(k) == new.get(k) for k in ("rows", "examples", "tokenizer", "tokenization"))


def read(path: str) -> dict[str, Any] | None:
  """A stored fingerprint, or None when there is none (a run from before fingerprints)."""
  if not paths.exists(path):
    return None
  try:
    return json.loads(epath.Path(path).read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise RunError(f"{path}: not a readable fingerprint ({e}); delete it to "
                             "accept the data as it is now") from None


def write(path: str, fingerprint: dict[str, Any]) -> None:
  paths.write_bytes_atomic(path, json.dumps(fingerprint, indent=2, sort_keys=True).encode())


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a complete step (Orbax names them by number;
  a torn write keeps a temporary name)."""
  directory = epath.Path(paths.join(workdir, "checkpoints"))
  if not directory.is_dir():
    return False
  return any(p.name.isdigit() for p in directory.iterdir())


def check_resume(workdir: str, current: dict[str, Any], *, allow_change: bool) -> bool:
  """Compares the data with the fingerprint saved by the run being resumed.

  Returns True when the data changed and `allow_change` lets the run go on with
  it (the reference log-probs must then be recomputed); False when nothing is
  resumed or the data is the same.

  Raises:
    ResumeMismatchError: the data changed and `allow_change` is off; one line naming
      what (a refused resume is a usage error: the CLI exits 2).
  """
  if not has_checkpoints(workdir):
    return False
  saved = read(paths.join(workdir, RUN_FILE))
  if saved is None:
    log.warning("%s has checkpoints but no %s (a run from before data fingerprints): the "
                "data cannot be checked against it", workdir, RUN_FILE)
    return False
  if same_data(saved, current):
    return False
  changes = diff(saved, current)
  what = ", ".join(changes)
  if (changes and changes[-1].startswith("content hash")
      and saved.get("content") != current.get("content")):
    # Hashed the other way: saved by an older version's list read (data.lazy=False, or
    # before "content" was stored), which hashed the tokenized examples.
    what += (" (the run hashed its tokenized examples, as an older jaxalign's list read, "
             "data.lazy=False, did; this one hashes the source: if the data is the same, "
             "resume with that version)")
  if not allow_change:
    raise ResumeMismatchError(
        f"cannot resume {workdir}: the data differs from the run's "
        f"({paths.join(workdir, RUN_FILE)}): {what}; restore the data, use a new workdir, or "
        "set config.allow_config_change=True to continue on the new data (the reference "
        "log-probs are then recomputed)")
  log.warning("resuming %s on changed data (allow_config_change): %s; the data iterator "
              "starts over and reference log-probs are recomputed", workdir, what)
  return True


def reference_plan(ref_path: str, current: dict[str, Any], *, resuming: bool,
                   allow_change: bool, data_changed: bool):
  """Whether the precomputed reference at `ref_path` can be used for `current` data.

  Returns the table (rows aligned with the examples) to reuse, or None when it
  must be computed from the initial policy (a fresh run, or a deliberate change
  under `allow_change`). A stale table is never reused.

  Raises:
    ResumeMismatchError: on a resume without `allow_change`, the file has the wrong
      row count or was made for other data (the CLI exits 2).
    RunError: on a resume without `allow_change`, the file is missing or truncated
      (exit 1).
  """
  fp_path = reference_fingerprint_path(ref_path)
  fix = ("rerun with --config.allow_config_change=True to recompute it from the initial "
         "policy (config.init_from / model.hf_path / the seed)")

  def refuse_or_recompute(problem: str, *, stale: bool = True):
    # A table made for other data refuses the resume (a usage error, exit 2); a missing
    # or unreadable one is a run fault (exit 1).
    if resuming and not allow_change:
      raise (ResumeMismatchError if stale else RunError)(f"{ref_path}: {problem}; {fix}")
    log.warning("%s: %s; recomputing the reference log-probs", ref_path, problem)
    return None

  if data_changed:
    return refuse_or_recompute("made for the previous data")
  if not paths.exists(ref_path):
    if not resuming:
      return None
    return refuse_or_recompute("missing, but checkpoints exist", stale=False)
  try:
    table = paths.load_npy(ref_path)
  except (ValueError, OSError, EOFError) as e:
    return refuse_or_recompute(f"truncated or not a .npy file ({str(e).splitlines()[0]})",
                               stale=False)
  if table.ndim < 1 or len(table) != current["rows"]:
    return refuse_or_recompute(f"has {len(table) if table.ndim else 0} rows, the data has "
                               f"{current['rows']}")
  stored = read(fp_path)
  if stored is None:
    log.warning("%s has no %s (made before data fingerprints): reusing it unchecked",
                ref_path, fp_path)
    return table
  if not same_data(stored, current):
    return refuse_or_recompute(f"made for other data ({', '.join(diff(stored, current))})")
  return table


def reference_fingerprint_path(ref_path: str) -> str:
  """ref_logps.npy -> ref_logps.fingerprint.json beside it."""
  return (ref_path[:-len(".npy")] if ref_path.endswith(".npy") else ref_path) + ".fingerprint.json"
