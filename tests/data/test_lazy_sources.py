"""Every source read lazily (JSON arrays, Parquet, `datasets` save_to_disk and data
directories, TRL standard and conversational rows, the toy task) gives the list
reference's examples, skips and error lines (tests/data/reference.py); the validation pass split over processes
gives the one-process result."""

import json

import numpy as np
import pytest

from jaxalign.data import formats, lazy, reading, toy
from tests.data.reference import list_examples

ARGS = dict(max_length=24, max_prompt_length=12)


def _records(n=24, conversational=False):
  records = toy.ArithmeticTask().pairwise_records(n, seed=3)
  if conversational:   # TRL conversational with an implicit prompt
    records = [{"chosen": [{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "user", "content": r["prompt"]},
                             {"role": "assistant", "content": r["rejected"]}]}
               for r in records]
  return records


def _same(path, fmt="pairwise", split="train", **kw):
  kw.setdefault("on_error", "raise")
  tok = reading.load_tokenizer("toy")
  eager, eager_skipped = list_examples(str(path), fmt, tok, split=split, **ARGS, **kw)
  got, skipped = lazy.open_source(str(path), fmt, tok, split=split, **ARGS, **kw,
                                  process_index=0, process_count=1)
  assert not isinstance(got, list) and skipped == eager_skipped
  assert len(got) == len(eager)
  for a, b in zip(got, eager):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  return got


@pytest.mark.parametrize("conversational", [False, True])
def test_a_json_array_equals_the_eager_path(tmp_path, conversational):
  records = _records(conversational=conversational)
  # Strings with brackets, commas, quotes and escapes inside the elements.
  records[2] = {**records[2], "note": 'a "quoted", [bracketed] {x} \\ value\n'}
  (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
  got = _same(tmp_path / "d.json")
  assert len(got) == 24 and isinstance(got.rows, lazy.JsonArrayRows)


def test_a_bad_json_array_element_names_its_row_and_field(tmp_path):
  records = _records()
  records[6] = {**records[6], "chosen": 5}
  (tmp_path / "d.json").write_text(json.dumps(records))
  tok = reading.load_tokenizer("toy")
  with pytest.raises(formats.DataError, match=r"d\.json:7: chosen") as e:
    lazy.open_source(str(tmp_path / "d.json"), "pairwise", tok, **ARGS, on_error="raise",
                     process_index=0, process_count=1)
  with pytest.raises(formats.DataError) as eager:
    list_examples(str(tmp_path / "d.json"), "pairwise", tok, split="train", **ARGS,
                  on_error="raise")
  assert str(e.value) == str(eager.value)
  _same(tmp_path / "d.json", on_error="skip")
  (tmp_path / "open.json").write_text(json.dumps(records)[:-1])
  with pytest.raises(formats.DataError, match=r"open\.json:\d+: invalid JSON: the array is"):
    lazy.open_source(str(tmp_path / "open.json"), "pairwise", tok, **ARGS, on_error="raise",
                     process_index=0, process_count=1)


def test_parquet_row_groups_equal_the_eager_path(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(_records(40)), tmp_path / "d.parquet", row_group_size=7)
  got = _same(tmp_path / "d.parquet")
  assert isinstance(got.rows, lazy.ParquetRows) and len(got.rows.starts) == 7


def test_datasets_save_to_disk_and_a_split_directory_equal_the_eager_path(tmp_path):
  import datasets
  datasets.DatasetDict({"train": datasets.Dataset.from_list(_records(20)),
                        "test": datasets.Dataset.from_list(_records(8))}
                       ).save_to_disk(str(tmp_path / "saved"))
  assert len(_same(tmp_path / "saved", split="test")) == 8
  assert isinstance(_same(tmp_path / "saved").rows, lazy.ArrowRows)
  (tmp_path / "dir").mkdir()
  for name, rows in (("train", _records(20, conversational=True)), ("test", _records(6))):
    with open(tmp_path / "dir" / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  assert len(_same(tmp_path / "dir")) == 20
  assert len(_same(tmp_path / "dir", split="test")) == 6


@pytest.mark.parametrize("source", ["toy:pairwise?n=30&seed=2", "toy:groups?n=12&g=3",
                                    "toy:sft?n=10"])
def test_the_toy_task_equals_the_eager_path(source):
  fmt = source[4:].split("?")[0]
  _same(source, fmt=fmt, on_error="raise")


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_the_pass_split_over_processes_equals_one_process(tmp_path, on_error):
  """P blocks validated apart and all-gathered (here a gather over in-process
  calls): the same positions, the per-process skips summing to the total, and
  with "raise" every process's error is the first bad row's, as one process's."""
  records = _records(50)
  bad = {4, 17, 18, 33, 49} if on_error == "skip" else {33, 17}
  with open(tmp_path / "d.jsonl", "w") as f:
    for i, r in enumerate(records):
      f.write(json.dumps({**r, "chosen": 1} if i + 1 in bad else r) + "\n")
  rows = lazy.index_jsonl(str(tmp_path / "d.jsonl"))
  kw = dict(on_error=on_error, group_size=None)
  if on_error == "raise":
    with pytest.raises(formats.DataError) as one:
      lazy.validate_rows(rows, "pairwise", **kw)
    assert "d.jsonl:17: chosen" in str(one.value)
  else:
    keep, mine, total = lazy.validate_rows(rows, "pairwise", **kw)
    assert mine == total == len(bad) and len(keep) == 50 - len(bad)
  for pc in (2, 3):
    # Each process's pass up to its gathers, then the gathers over all of them.
    stats, blocks = {}, {}

    def run(p, gathered_stats=None, gathered_blocks=None):
      calls = []

      def gather(x):
        calls.append(x)
        if len(calls) == 1:
          if gathered_stats is None:
            raise _Stop(x)
          return gathered_stats
        if gathered_blocks is None:
          raise _Stop(x)
        return gathered_blocks
      return lazy.validate_rows(rows, "pairwise", **kw, process_index=p, process_count=pc,
                                allgather=gather)

    for p in range(pc):
      with pytest.raises(_Stop) as s:
        run(p)
      stats[p] = s.value.x
    all_stats = np.stack([stats[p] for p in range(pc)])
    if on_error == "raise":
      for p in range(pc):
        with pytest.raises(formats.DataError) as e:
          run(p, all_stats)
        assert str(e.value) == str(one.value)
      continue
    for p in range(pc):
      with pytest.raises(_Stop) as s:
        run(p, all_stats)
      blocks[p] = s.value.x
    all_blocks = np.stack([blocks[p] for p in range(pc)])
    results = [run(p, all_stats, all_blocks) for p in range(pc)]
    for got_keep, _, got_total in results:
      np.testing.assert_array_equal(got_keep, keep)
      assert got_total == total
    assert sum(r[1] for r in results) == total
    assert all(0 < int(all_stats[p, 2]) < len(keep) for p in range(pc))   # split work


class _Stop(Exception):
  def __init__(self, x):
    super().__init__("gather")
    self.x = x
