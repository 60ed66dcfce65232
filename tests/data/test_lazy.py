"""A JSONL file indexed in one validation pass and tokenized row by row equals the
list reference (tests/data/reference.py: examples, skips, error lines, a run and its
resume), and a process reads only the rows of its own batches."""

import json

import numpy as np
import pytest

from jaxalign.data import formats, lazy, pipeline, reading, toy
from tests.data.reference import list_examples, reads
from tests.reliability.helpers import assert_bit_identical, params
from tests.train.helpers import read_metrics, tiny_config, train_loop


def _write(path, records, bad=None):
  with open(path, "w") as f:
    for i, r in enumerate(records):
      row = i + 1
      if bad and row in bad:
        f.write(bad[row] + "\n")
      else:
        f.write(json.dumps(r) + "\n")
      if row == 3:
        f.write("\n")   # blank lines are skipped but counted


def _open_lazy(path, fmt, tok, **kw):
  """The lazy read of `path` in this process alone."""
  return lazy.open_source(str(path), fmt, tok, process_index=0, process_count=1, **kw)


def _both(path, fmt, **kw):
  tok = reading.load_tokenizer("toy")
  args = dict(max_length=12, max_prompt_length=8, **kw)
  eager = list_examples(str(path), fmt, tok, split="train", **args)
  lazy_examples = _open_lazy(path, fmt, tok, **args)
  return eager, lazy_examples


@pytest.mark.parametrize("fmt", ["pairwise", "groups"])
def test_lazy_examples_equal_the_eager_ones_and_skip_the_same_rows(tmp_path, fmt):
  task = toy.ArithmeticTask()
  records = (task.pairwise_records(30, seed=1) if fmt == "pairwise"
             else task.group_records(30, 3, seed=1))
  field = "chosen" if fmt == "pairwise" else "completions"
  bad = {5: json.dumps({**records[4], field: 7}), 9: "{not json", 12: "[1, 2]"}
  if fmt == "groups":   # a group of another size is a bad row without group_size
    bad[20] = json.dumps({**records[19], "completions": records[19]["completions"][:2],
                          "rewards": records[19]["rewards"][:2]})
  _write(tmp_path / "d.jsonl", records, bad)
  (eager, eager_skipped), (lazy_examples, lazy_skipped) = _both(
      tmp_path / "d.jsonl", fmt, on_error="skip")
  assert lazy_skipped == eager_skipped == len(bad)
  assert len(lazy_examples) == len(eager) == 30 - len(bad)
  for a, b in zip(lazy_examples, eager):
    assert sorted(a) == sorted(b)
    for k in a:
      assert a[k].dtype == b[k].dtype
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "1+1=", "chosen": 7, "rejected": "3"}', r"d\.jsonl:5: chosen"),
    ("{not json", r"d\.jsonl:5: invalid JSON"),
])
def test_with_raise_the_first_bad_row_is_the_eager_paths_line(tmp_path, line, expected):
  records = toy.ArithmeticTask().pairwise_records(10, seed=0)
  _write(tmp_path / "d.jsonl", records[:3] + [{}] + records[4:], bad={4: line})
  tok = reading.load_tokenizer("toy")
  with pytest.raises(formats.DataError, match=expected) as eager:
    list_examples(str(tmp_path / "d.jsonl"), "pairwise", tok, split="train",
                  max_length=12, max_prompt_length=8, on_error="raise")
  with pytest.raises(formats.DataError) as lazy_error:
    _open_lazy(tmp_path / "d.jsonl", "pairwise", tok, max_length=12,
               max_prompt_length=8, on_error="raise")
  assert str(lazy_error.value) == str(eager.value)


class _Spy:
  """A sequence recording which items are read."""

  def __init__(self, examples):
    self.examples, self.read = examples, []

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.read.append(int(i))
    return self.examples[i]


def test_each_process_reads_only_the_rows_of_its_own_batches(tmp_path):
  _write(tmp_path / "d.jsonl", toy.ArithmeticTask().pairwise_records(128, seed=0))
  tok = reading.load_tokenizer("toy")
  examples, _ = _open_lazy(tmp_path / "d.jsonl", "pairwise", tok, max_length=12,
                           max_prompt_length=8, on_error="raise")
  shares = []
  for p in range(2):
    args = dict(seed=0, batch_size=4, process_index=p, process_count=2, add_index=True,
                repeat=False)
    share = {int(i) for b in pipeline.make_dataset(examples, **args) for i in b["index"]}
    spy = _Spy(examples)
    it = iter(pipeline.make_dataset(spy, **args))
    taken = [int(i) for _ in range(3) for i in next(it)["index"]]
    assert len(share) == 64 and set(taken) <= share
    # Only this process's rows are read, and not all of them: the 3 batches taken and
    # Grain's prefetch of the next few.
    assert set(spy.read) <= share and set(taken) <= set(spy.read)
    assert len(spy.read) < 64
    shares.append(share)
  assert not shares[0] & shares[1]


def test_a_lazy_run_equals_the_eager_run_and_resumes_bit_exact(tmp_path, monkeypatch):
  _write(tmp_path / "d.jsonl", toy.ArithmeticTask().pairwise_records(64, seed=0))
  over = {"total_steps": 4, "checkpoint.every": 2, "data.train_path": str(tmp_path / "d.jsonl")}
  eager_cfg, lazy_cfg = tiny_config(**over), tiny_config(**over)
  with reads(monkeypatch, as_list=True) as read:   # the eager run: the list reference
    train_loop(eager_cfg, str(tmp_path / "eager"), progress=False)
  assert read == [list]
  train_loop(lazy_cfg, str(tmp_path / "lazy"), progress=False, stop_after=2)
  train_loop(lazy_cfg, str(tmp_path / "lazy"), progress=False)
  losses = [[m["loss"] for m in read_metrics(str(tmp_path / d))] for d in ("eager", "lazy")]
  assert len(losses[0]) == 4 and losses[0] == losses[1]
  assert_bit_identical(params(tmp_path / "lazy", lazy_cfg), params(tmp_path / "eager", eager_cfg))
