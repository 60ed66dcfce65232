"""Record formats (schemas) and validation with file:row: field error messages.

A *format* names the fields a loss consumes:

  sft        {prompt, completion}
  pairwise   {prompt, chosen, rejected}
  unpaired   {prompt, completion, label: bool}
  unpaired_kl  the same (KTO; tokenize.py adds the KL sequences)
  negatives  {prompt, rejected, samples: list}
  groups     {prompt, reference, completions: list, rewards: list[float]}
  ranked     {prompt, completions: list, labels: list[bool] | ranks: list[int],
              reference?}                                   (AFT)

Optional fields: pairwise ``margin: float`` (reward-model training: the score gap the
pair must clear, TRL's ``margin`` column); unpaired ``embedding: list[float]`` (finite,
float32-representable; a prompt embedding for BCO's underlying-distribution matching);
ranked ``reference`` (the reference answer / chain of thought for AFT's SFT term). A
ranked record has exactly one of ``labels`` (True = positive, correct) and ``ranks``
(integers >= 1, 1 = best, a lower rank is better, ties allowed; equal ranks form no
pair, as in docs/losses.md `aft`), of the same length as ``completions``. `validate_records`
also checks that such columns agree across records (all ranked records use labels or all
use ranks; embeddings present in all unpaired records or none, all of one dimension), so
examples stack into batches.

Every text field is either a string or chat messages (a list of ``{"role", "content"}``
dicts, each role one of ``CHAT_ROLES``). A record is *conversational* when any text
field is a message list; validation then normalizes all of its text fields to message
lists (a string prompt becomes one user turn, a string response one assistant turn) so
the tokenizer sees one kind or the other. Response message lists must
end with an assistant turn. An sft record may also be ``{"messages": [...]}``,
split into prompt = all but the last turn and completion = the last turn.

TRL's conventions load too (`conventions.py`): a pairwise record without
``prompt`` gets the implicit one (the common prefix of chosen and rejected),
and an unpaired format reads pairwise records as two examples each (chosen ->
label True, rejected -> label False).

Validated records keep every other key (e.g. provenance ``source_file``/``row``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Literal

import numpy as np

from jaxalign.data import conventions
from jaxalign.errors import DataError

log = logging.getLogger(__name__)

Record = dict[str, Any]
Messages = list[dict[str, str]]

# The roles every chat template (the toy one included) renders as themselves. A
# template meeting another role renders it as something else without a word (the
# toy template as a user turn), so any other role is bad data. Tool turns are not
# supported in training data.
CHAT_ROLES = ("system", "user", "assistant")

TEXT, TEXT_LIST, BOOL, FLOAT_LIST = "text", "text_list", "bool", "float_list"
FLOAT = "float"
BOOL_LIST, RANK_LIST, EMBEDDING = "bool_list", "rank_list", "embedding"

# format -> {field: kind}; prompt is always first.
FORMATS: dict[str, dict[str, str]] = {
    "sft": {"prompt": TEXT, "completion": TEXT},
    "pairwise": {"prompt": TEXT, "chosen": TEXT, "rejected": TEXT},
    "unpaired": {"prompt": TEXT, "completion": TEXT, "label": BOOL},
    # KTO: unpaired records; tokenization adds each example's mismatched KL sequence.
    "unpaired_kl": {"prompt": TEXT, "completion": TEXT, "label": BOOL},
    "negatives": {"prompt": TEXT, "rejected": TEXT, "samples": TEXT_LIST},
    "groups": {"prompt": TEXT, "reference": TEXT, "completions": TEXT_LIST,
               "rewards": FLOAT_LIST},
    "ranked": {"prompt": TEXT, "completions": TEXT_LIST},
}

# format -> {field: kind} for fields that may be absent.
OPTIONAL_FIELDS: dict[str, dict[str, str]] = {
    "pairwise": {"margin": FLOAT},   # reward-model training's per-pair margin (TRL)
    "unpaired": {"embedding": EMBEDDING},
    "ranked": {"labels": BOOL_LIST, "ranks": RANK_LIST, "reference": TEXT},
}

# format -> fields of which exactly one must be present.
_EXACTLY_ONE = {"ranked": ("labels", "ranks")}

# Fields holding equal-length lists: (list field, must match this list field).
_MATCHING_LENGTHS = {"groups": (("rewards", "completions"),),
                     "ranked": (("labels", "completions"), ("ranks", "completions"))}

_FLOAT32_MAX = float(np.finfo(np.float32).max)

PROVENANCE = ("source_file", "row")


_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _FieldError(Exception):
  """Internal: a problem with one (possibly nested) field."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"{field}: {problem}")
    self.field, self.problem = field, problem


def _where(record: Any, file: str | None, row: int | str | None) -> tuple[str, Any]:
  if isinstance(record, dict):
    file = record.get("source_file", "<memory>") if file is None else file
    row = record.get("row", "?") if row is None else row
  return ("<memory>" if file is None else str(file)), ("?" if row is None else row)


def _check_str(value: Any, field: str, *, allow_empty: bool = False) -> str:
  """Returns value as a valid-UTF-8 str or raises _FieldError."""
  if isinstance(value, (bytes, bytearray)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise _FieldError(field, f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
  if not isinstance(value, str):
    raise _FieldError(field, f"expected a string, got {type(value).__name__}")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise _FieldError(field, f"invalid UTF-8 ({e.reason} at char {e.start})") from None
  if not allow_empty and not value.strip():
    raise _FieldError(field, "empty string")
  return value


def _check_messages(value: Any, field: str, *, response: bool) -> Messages:
  """Validates a chat message list; a response must end with an assistant turn."""
  if not isinstance(value, (list, tuple)) or not value:
    raise _FieldError(field, "expected a non-empty list of messages")
  out = []
  for i, m in enumerate(value):
    f = f"{field}[{i}]"
    if not isinstance(m, dict):
      raise _FieldError(f, f"expected a message dict, got {type(m).__name__}")
    for key in ("role", "content"):
      if key not in m:
        raise _FieldError(f, f"missing key {key!r}")
    role = _check_str(m["role"], f + ".role")
    if role not in CHAT_ROLES:
      raise _FieldError(f + ".role", f"unknown role {role!r}; chat templates take "
                        f"{list(CHAT_ROLES)} (rename it, e.g. ShareGPT's human -> user, "
                        "gpt -> assistant)")
    content = _check_str(m["content"], f + ".content", allow_empty=True)
    out.append({"role": role, "content": content})
  if response:
    if out[-1]["role"] != "assistant":
      raise _FieldError(f"{field}[{len(out) - 1}].role",
                        f"a response must end with an assistant turn, got {out[-1]['role']!r}")
    _check_str(out[-1]["content"], f"{field}[{len(out) - 1}].content")
  return out


def _is_messages(value: Any) -> bool:
  return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)


def _check_text(value: Any, field: str, *, chat: bool, response: bool) -> str | Messages:
  """A string, or (if chat) messages; strings are wrapped as one turn when chat."""
  if _is_messages(value):
    return _check_messages(value, field, response=response)
  text = _check_str(value, field)
  if chat:
    return [{"role": "assistant" if response else "user", "content": text}]
  return text


def _check_text_list(value: Any, field: str, *, chat: bool) -> list:
  if not isinstance(value, (list, tuple)) or not value:
    raise _FieldError(field, "expected a non-empty list")
  return [_check_text(v, f"{field}[{i}]", chat=chat, response=True)
          for i, v in enumerate(value)]


def _check_bool(value: Any, field: str) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value in (0, 1):
    return bool(value)
  raise _FieldError(field, f"expected a bool, got {type(value).__name__} {value!r:.40}")


def _check_float_list(value: Any, field: str) -> list[float]:
  if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
    raise _FieldError(field, "expected a non-empty list of numbers")
  out = []
  for i, v in enumerate(value):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
      raise _FieldError(f"{field}[{i}]", f"expected a number, got {type(v).__name__}")
    try:
      x = float(v)
    except (OverflowError, ValueError):
      x = math.inf
    if not math.isfinite(x):
      raise _FieldError(f"{field}[{i}]", f"not finite ({v!r:.40})")
    if abs(x) > _FLOAT32_MAX:  # the batch holds float32: it would become inf there
      raise _FieldError(f"{field}[{i}]", f"not finite in float32 ({v!r:.40})")
    out.append(x)
  return out


def _check_float(value: Any, field: str) -> float:
  try:
    return _check_float_list([value], field)[0]
  except _FieldError as e:
    raise _FieldError(field, e.problem) from None


def _check_bool_list(value: Any, field: str) -> list[bool]:
  if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
    raise _FieldError(field, "expected a non-empty list of bools")
  return [_check_bool(v, f"{field}[{i}]") for i, v in enumerate(value)]


def _check_rank_list(value: Any, field: str) -> list[int]:
  if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
    raise _FieldError(field, "expected a non-empty list of integer ranks")
  out = []
  for i, v in enumerate(value):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
      raise _FieldError(f"{field}[{i}]",
                        f"expected an integer rank, got {type(v).__name__} {v!r:.40}")
    if not 1 <= int(v) <= np.iinfo(np.int32).max:
      raise _FieldError(f"{field}[{i}]", f"rank must be >= 1 (1 = best), got {int(v)}")
    out.append(int(v))
  return out


def _check_embedding(value: Any, field: str) -> list[float]:
  out = _check_float_list(value, field)
  for i, x in enumerate(out):
    if abs(x) > _FLOAT32_MAX:
      raise _FieldError(f"{field}[{i}]", f"not finite in float32 ({x!r:.40})")
  return out


def _is_conversational(record: Record, fields: dict[str, str]) -> bool:
  for name, kind in fields.items():
    value = record.get(name)
    if kind == TEXT and _is_messages(value):
      return True
    if kind == TEXT_LIST and isinstance(value, (list, tuple)) and any(
        _is_messages(v) for v in value):
      return True
  return False


def _split_messages(record: Record) -> Record:
  """sft {"messages": [...]} -> {prompt: all but last turn, completion: [last]}."""
  msgs = record["messages"]
  if not isinstance(msgs, (list, tuple)) or len(msgs) < 2:
    raise _FieldError("messages", "expected a list of at least 2 messages")
  out = {k: v for k, v in record.items() if k != "messages"}
  out["prompt"], out["completion"] = list(msgs[:-1]), [msgs[-1]]
  return out


def validate_record(record: Any, fmt: str, *, file: str | None = None,
                    row: int | str | None = None) -> Record:
  """Checks one record against a format and returns a normalized copy.

  Args:
    record: the raw record (normally a dict).
    fmt: one of ``FORMATS``.
    file: file name for error messages (default: ``record["source_file"]``).
    row: 1-based row for error messages (default: ``record["row"]``).

  Returns:
    A new dict: the format's fields (normalized: label/labels -> bool, rewards
    and embedding -> list[float], ranks -> list[int], conversational text ->
    message lists) plus all other keys.

  Raises:
    DataError: ``"{file}:{row}: {field}: {problem}"``.
    ValueError: unknown format (a programming error, not a data error).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")
  fields = FORMATS[fmt]
  file, row = _where(record, file, row)
  try:
    if not isinstance(record, dict):
      raise _FieldError("<record>", f"expected a dict, got {type(record).__name__}")
    if "_invalid" in record:  # an unreadable line kept by sources.read_jsonl(on_error="skip")
      raise _FieldError("<line>", record["_invalid"])
    if fmt == "sft" and "messages" in record and "prompt" not in record:
      record = _split_messages(record)
    for name in fields:
      if name not in record:
        raise _FieldError(name, "missing field")
    one_of = _EXACTLY_ONE.get(fmt)
    if one_of:
      present = [f for f in one_of if f in record]
      if len(present) != 1:
        need = " or ".join(one_of)
        raise _FieldError(present[-1] if present else one_of[0],
                          f"expected exactly one of {need}, got "
                          f"{'both' if present else 'neither'}")
    optional = OPTIONAL_FIELDS.get(fmt, {})
    fields = {**fields, **{k: v for k, v in optional.items() if k in record}}
    chat = _is_conversational(record, fields)
    out = dict(record)
    for name, kind in fields.items():
      value = record[name]
      if kind == TEXT:
        out[name] = _check_text(value, name, chat=chat, response=name != "prompt")
      elif kind == TEXT_LIST:
        out[name] = _check_text_list(value, name, chat=chat)
      elif kind == BOOL:
        out[name] = _check_bool(value, name)
      elif kind == FLOAT_LIST:
        out[name] = _check_float_list(value, name)
      elif kind == FLOAT:
        out[name] = _check_float(value, name)
      elif kind == BOOL_LIST:
        out[name] = _check_bool_list(value, name)
      elif kind == RANK_LIST:
        out[name] = _check_rank_list(value, name)
      elif kind == EMBEDDING:
        out[name] = _check_embedding(value, name)
    for name, other in _MATCHING_LENGTHS.get(fmt, ()):
      if name in out and len(out[name]) != len(out[other]):
        raise _FieldError(name, f"length {len(out[name])} != len({other}) {len(out[other])}")
  except _FieldError as e:
    raise DataError(f"{file}:{row}: {e.field}: {e.problem}") from None
  return out


def _column_signature(record: Record, fmt: str) -> tuple:
  """What decides a record's tokenized columns beyond its format (must agree)."""
  if fmt == "ranked":
    return ("labels" in record,)
  if fmt == "unpaired":
    return (len(record["embedding"]) if "embedding" in record else None,)
  if fmt == "pairwise":
    return ("margin" in record,)
  return ()


def _signature_mismatch(sig: tuple, schema: tuple, fmt: str) -> tuple[str, str]:
  if fmt == "ranked":
    has, want = ("labels", "ranks") if sig[0] else ("ranks", "labels")
    return has, f"earlier records use {want}; all records must use the same one"
  if fmt == "pairwise":
    return "margin", ("unexpected field (earlier records have none)" if sig[0]
                      else "missing field (earlier records have one)")
  if sig[0] is None:
    return "embedding", "missing field (earlier records have one)"
  if schema[0] is None:
    return "embedding", "unexpected field (earlier records have none)"
  return "embedding", f"length {sig[0]} != {schema[0]} of earlier records"


def check_columns(record: Record, fmt: str, schema: tuple | None) -> tuple:
  """A validated record's optional-column signature, checked against `schema`, the
  first valid record's (None: this is the first); for streaming validation.

  Raises:
    DataError: ``"{file}:{row}: {field}: ..."`` as `validate_records` words it.
  """
  sig = _column_signature(record, fmt)
  if schema is not None and sig != schema:
    file, where = _where(record, None, None)
    field, problem = _signature_mismatch(sig, schema, fmt)
    raise DataError(f"{file}:{where}: {field}: {problem}")
  return sig


def validate_records(records: Iterable[Any], fmt: str, *,
                     on_error: Literal["raise", "skip"] = "raise"
                     ) -> tuple[list[Record], int]:
  """Validates all records before training starts.

  Args:
    records: raw records; provenance is read from ``source_file``/``row`` keys,
      else ``<memory>`` and the 1-based position.
    fmt: one of ``FORMATS``.
    on_error: "raise" stops at the first bad record; "skip" logs and drops it.
      A record whose optional columns disagree with the first valid record's
      (ranked labels vs. ranks; unpaired embedding presence or dimension) is
      a bad record too.

  Returns:
    (valid records, number skipped).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  records = conventions.normalize_records(list(records), fmt)
  valid, skipped = [], 0
  schema: tuple | None = None  # the first valid record's optional-column signature
  for i, record in enumerate(records):
    row = None if isinstance(record, dict) and "row" in record else i + 1
    try:
      out = validate_record(record, fmt, row=row)
      sig = _column_signature(out, fmt)
      if schema is None:
        schema = sig
      elif sig != schema:
        file, where = _where(out, None, row)
        field, problem = _signature_mismatch(sig, schema, fmt)
        raise DataError(f"{file}:{where}: {field}: {problem}")
      valid.append(out)
    except DataError as e:
      if on_error == "raise":
        raise
      skipped += 1
      log.warning("skipping malformed record: %s", e)
  if skipped:
    log.warning("skipped %d of %d %s records", skipped, skipped + len(valid), fmt)
  return valid, skipped
