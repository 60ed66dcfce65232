"""Tests for record validation: every error names file:row: field."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxalign.data.formats import (FORMATS, OPTIONAL_FIELDS, DataError, validate_record,
                                   validate_records)


def _bad(record, fmt, match):
  with pytest.raises(DataError, match=match):
    validate_record(record, fmt, file="f.jsonl", row=7)


def test_valid_records_normalize():
  r = validate_record({"prompt": "a", "chosen": "b", "rejected": "c", "id": 3}, "pairwise")
  assert r == {"prompt": "a", "chosen": "b", "rejected": "c", "id": 3}
  r = validate_record({"prompt": [{"role": "user", "content": "a"}], "chosen": "b",
                       "rejected": [{"role": "assistant", "content": "c"}]}, "pairwise")
  assert r["chosen"] == [{"role": "assistant", "content": "b"}]
  r = validate_record({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}]}, "sft")
  assert r["prompt"] == [{"role": "user", "content": "q"}]
  assert r["completion"] == [{"role": "assistant", "content": "a"}]
  r = validate_record({"prompt": "p", "completion": "c", "label": 1}, "unpaired")
  assert r["label"] is True
  r = validate_record({"prompt": "p", "reference": "r", "completions": ["a", "b"],
                       "rewards": [1, 0.5]}, "groups")
  assert r["rewards"] == [1.0, 0.5]


def test_errors_name_file_row_field():
  _bad({"prompt": "a", "chosen": "b"}, "pairwise", r"^f\.jsonl:7: rejected: missing field$")
  _bad({"prompt": "a", "chosen": "", "rejected": "c"}, "pairwise", r"^f\.jsonl:7: chosen: empty")
  _bad({"prompt": 3, "completion": "c"}, "sft", r"^f\.jsonl:7: prompt: expected a string")
  _bad({"prompt": "\ud800", "completion": "c"}, "sft", r"^f\.jsonl:7: prompt: invalid UTF-8")
  _bad({"prompt": b"\xff", "completion": "c"}, "sft", r"^f\.jsonl:7: prompt: invalid UTF-8")
  _bad({"prompt": "p", "completion": "c", "label": "yes"}, "unpaired", r"f\.jsonl:7: label:")
  _bad({"prompt": "p", "rejected": "r", "samples": []}, "negatives", r"f\.jsonl:7: samples:")
  _bad({"prompt": "p", "reference": "r", "completions": ["a", "b"],
        "rewards": [1.0, math.nan]}, "groups", r"^f\.jsonl:7: rewards\[1\]: not finite")
  _bad({"prompt": "p", "reference": "r", "completions": ["a", "b"],
        "rewards": [1.0]}, "groups", r"^f\.jsonl:7: rewards: length 1 != len\(completions\) 2")
  _bad({"prompt": [{"role": "user", "content": "q"}], "chosen": "b",
        "rejected": [{"role": "user", "content": "c"}]}, "pairwise",
       r"^f\.jsonl:7: rejected\[0\]\.role: a response must end with an assistant turn")
  _bad({"prompt": [{"role": "user"}], "completion": "c"}, "sft",
       r"^f\.jsonl:7: prompt\[0\]: missing key 'content'")
  _bad(["not a dict"], "sft", r"^f\.jsonl:7: <record>: expected a dict")


def test_provenance_from_record_and_unknown_format():
  with pytest.raises(DataError, match=r"^data\.jsonl:12: completion: missing field"):
    validate_record({"prompt": "p", "source_file": "data.jsonl", "row": 12}, "sft")
  with pytest.raises(ValueError, match="unknown data format"):
    validate_record({}, "nope")


def test_validate_records_raise_and_skip(caplog):
  records = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "c", "completion": "d"}]
  with pytest.raises(DataError, match=r"^<memory>:2: completion: missing field"):
    validate_records(records, "sft")
  valid, skipped = validate_records(records, "sft", on_error="skip")
  assert [r["prompt"] for r in valid] == ["a", "c"] and skipped == 1
  assert "<memory>:2: completion" in caplog.text


_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                  st.binary(max_size=5))
_value = st.recursive(
    _leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                               st.dictionaries(st.sampled_from(["role", "content", "x"]), c,
                                               max_size=3)),
    max_leaves=8)
_keys = st.sampled_from(sorted({k for f in FORMATS.values() for k in f}
                              | {k for f in OPTIONAL_FIELDS.values() for k in f}
                              | {"messages", "x"}))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(record=st.one_of(st.dictionaries(_keys, _value, max_size=6), _value),
       fmt=st.sampled_from(sorted(FORMATS)))
def test_fuzz_only_data_errors(record, fmt):
  try:
    out = validate_record(record, fmt, file="fuzz", row=1)
  except DataError as e:
    assert str(e).startswith("fuzz:1: ")
  else:
    assert set(FORMATS[fmt]) <= set(out)


_VALID = {
    "sft": {"prompt": "p", "completion": "c"},
    "pairwise": {"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"},
    "unpaired": {"prompt": "p", "completion": "c", "label": True},
    "negatives": {"prompt": "p", "rejected": "r", "samples": ["a", "b"]},
    "groups": {"prompt": "p", "reference": "r", "completions": ["a", "b"], "rewards": [1.0, 0.0]},
    "ranked": {"prompt": "p", "completions": ["a", "b"], "labels": [True, False],
               "reference": "r"},
}
_VALID_EXTRA = [  # optional-field variants, fuzzed as well
    ("ranked", {"prompt": "p", "completions": ["a", "b", "c"], "ranks": [1, 2, 2]}),
    ("unpaired", {"prompt": "p", "completion": "c", "label": False, "embedding": [0.5, -1.0]}),
]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(sorted(_VALID.items()) + _VALID_EXTRA), data=st.data())
def test_fuzz_one_mutated_field(case, data):
  fmt, record = case
  validate_record(record, fmt)
  record = dict(record)
  key = data.draw(st.sampled_from(sorted(record)))
  if data.draw(st.booleans()):
    record[key] = data.draw(_value)
  else:
    del record[key]
  try:
    validate_record(record, fmt, file="fuzz", row=2)
  except DataError as e:
    fields = list(FORMATS[fmt]) + list(OPTIONAL_FIELDS.get(fmt, ()))
    assert any(str(e).startswith(f"fuzz:2: {f}") for f in fields), str(e)


def test_ranked_valid_and_normalized():
  r = validate_record({"prompt": "p", "completions": ["a", "b"], "labels": [1, False]}, "ranked")
  assert r["labels"] == [True, False] and "reference" not in r
  r = validate_record({"prompt": "p", "completions": ["a", "b", "c"], "ranks": [2, 1, 2],
                       "reference": [{"role": "assistant", "content": "r"}]}, "ranked")
  assert r["ranks"] == [2, 1, 2]  # ties allowed; 1 = best
  assert r["prompt"] == [{"role": "user", "content": "p"}]
  assert r["completions"][0] == [{"role": "assistant", "content": "a"}]


def test_ranked_errors():
  base = {"prompt": "p", "completions": ["a", "b"]}
  _bad(base, "ranked", r"^f\.jsonl:7: labels: expected exactly one of labels or ranks, got neither$")
  _bad({**base, "labels": [True, False], "ranks": [1, 2]}, "ranked",
       r"^f\.jsonl:7: ranks: expected exactly one of labels or ranks, got both$")
  _bad({**base, "labels": [True]}, "ranked",
       r"^f\.jsonl:7: labels: length 1 != len\(completions\) 2$")
  _bad({**base, "ranks": [1, 2, 3]}, "ranked",
       r"^f\.jsonl:7: ranks: length 3 != len\(completions\) 2$")
  _bad({**base, "labels": [True, "no"]}, "ranked", r"^f\.jsonl:7: labels\[1\]: expected a bool")
  _bad({**base, "labels": [True, 2]}, "ranked", r"^f\.jsonl:7: labels\[1\]: expected a bool")
  _bad({**base, "ranks": [1, 1.5]}, "ranked", r"^f\.jsonl:7: ranks\[1\]: expected an integer rank")
  _bad({**base, "ranks": [True, 1]}, "ranked", r"^f\.jsonl:7: ranks\[0\]: expected an integer rank")
  _bad({**base, "ranks": [1, 0]}, "ranked", r"^f\.jsonl:7: ranks\[1\]: rank must be >= 1")
  _bad({**base, "ranks": []}, "ranked", r"^f\.jsonl:7: ranks: expected a non-empty list")
  _bad({**base, "ranks": [1, 2], "reference": ""}, "ranked", r"^f\.jsonl:7: reference: empty")
  _bad({"prompt": "p", "completions": [], "labels": []}, "ranked", r"^f\.jsonl:7: completions:")


def test_unpaired_embedding():
  r = validate_record({"prompt": "p", "completion": "c", "label": True,
                       "embedding": [1, 0.5, -2]}, "unpaired")
  assert r["embedding"] == [1.0, 0.5, -2.0]
  base = {"prompt": "p", "completion": "c", "label": True}
  _bad({**base, "embedding": [1.0, math.inf]}, "unpaired", r"^f\.jsonl:7: embedding\[1\]: not finite")
  _bad({**base, "embedding": [1e300]}, "unpaired",
       r"^f\.jsonl:7: embedding\[0\]: not finite in float32")
  _bad({**base, "embedding": ["x"]}, "unpaired", r"^f\.jsonl:7: embedding\[0\]: expected a number")
  _bad({**base, "embedding": []}, "unpaired", r"^f\.jsonl:7: embedding: expected a non-empty")


def test_validate_records_columns_agree():
  u = {"prompt": "p", "completion": "c", "label": True}
  with pytest.raises(DataError, match=r"^<memory>:2: embedding: length 3 != 2 of earlier"):
    validate_records([{**u, "embedding": [1, 2]}, {**u, "embedding": [1, 2, 3]}], "unpaired")
  with pytest.raises(DataError, match=r"^<memory>:2: embedding: missing field"):
    validate_records([{**u, "embedding": [1, 2]}, u], "unpaired")
  with pytest.raises(DataError, match=r"^<memory>:3: embedding: unexpected field"):
    validate_records([u, u, {**u, "embedding": [1.0]}], "unpaired")
  r = {"prompt": "p", "completions": ["a"]}
  with pytest.raises(DataError, match=r"^<memory>:2: ranks: earlier records use labels"):
    validate_records([{**r, "labels": [True]}, {**r, "ranks": [1]}], "ranked")
  valid, skipped = validate_records([{**r, "ranks": [1]}, {**r, "labels": [True]},
                                     {**r, "ranks": [2]}], "ranked", on_error="skip")
  assert [v["ranks"] for v in valid] == [[1], [2]] and skipped == 1


def test_rewards_outside_float32_range_are_bad_data():
  record = {"prompt": "1+1=", "reference": "2", "completions": ["2"], "rewards": [1e39]}
  with pytest.raises(DataError, match=r"f\.jsonl:3: rewards\[0\]: not finite in float32"):
    validate_record(record, "groups", file="f.jsonl", row=3)
