"""Tests for reading raw records with provenance."""
import json

import pytest

from jaxalign.data.formats import DataError
from jaxalign.data.sources import load_records

RECORDS = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]


def test_jsonl_provenance(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
  out = load_records(path)
  assert [r["prompt"] for r in out] == ["1+1=", "2+2="]
  assert [r["row"] for r in out] == [1, 3]
  assert out[0]["source_file"] == str(path)


def test_json_array(tmp_path):
  path = tmp_path / "d.json"
  path.write_text(json.dumps(RECORDS))
  assert [r["row"] for r in load_records(path)] == [1, 2]


def test_bad_json_line_names_file_and_row(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
  with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON: "):
    load_records(path)
  path.write_text("[1, 2]\n")
  with pytest.raises(DataError, match=r":1: <record>: expected a JSON object"):
    load_records(path)


def test_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "d.parquet"
  pq.write_table(pa.Table.from_pylist(RECORDS), path)
  out = load_records(path)
  assert [{k: r[k] for k in ("prompt", "completion")} for r in out] == RECORDS
  assert [r["row"] for r in out] == [1, 2]


def test_save_to_disk_roundtrip(tmp_path):
  import datasets
  dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                             "test": datasets.Dataset.from_list(RECORDS[:1])})
  dd.save_to_disk(str(tmp_path / "dd"))
  out = load_records(tmp_path / "dd", split="test")
  assert len(out) == 1 and out[0]["prompt"] == "1+1=" and out[0]["row"] == 1
  datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
  assert [r["completion"] for r in load_records(tmp_path / "ds")] == ["2", "4"]
  with pytest.raises(DataError, match="no split"):
    load_records(tmp_path / "dd", split="validation")
