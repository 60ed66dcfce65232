"""Bad data end to end: stop before training naming `file:row: field: problem`, or
skip, count and log every bad row and train to the end.

The validators themselves are fuzzed with hypothesis in tests/data/test_formats.py
(test_fuzzed_records_are_accepted_or_rejected_with_file_row_field); the missing
field case through the CLI is tests/test_cli.py::test_bad_data_row_names_file_row_and_field.
"""

import json
import logging
import math

import pytest

from jaxalign.data import toy
from tests.reliability.helpers import RECIPES, run_cli
from tests.train.helpers import read_metrics

NUM_GOOD = 24  # 3 batches of 8
TOTAL_STEPS = 4

# A prompt and answers far over max_length=12 tokens: truncated, never an error.
OVERLONG = {"prompt": "1+" * 4000 + "1=", "chosen": "2" * 20000, "rejected": "3" * 20000}

# name -> (bad pairwise row, the message after "file:row: ")
PAIRWISE_BAD = {
    "missing_field": ({"prompt": "1+1=", "chosen": "2"}, "rejected: missing field"),
    "wrong_type": ({"prompt": "1+1=", "chosen": 2, "rejected": "3"},
                   "chosen: expected a string, got int"),
    "empty_string": ({"prompt": "1+1=", "chosen": "2", "rejected": "   "},
                     "rejected: empty string"),
    # A lone surrogate: JSON carries it, UTF-8 cannot encode it.
    "non_utf8_text": ({"prompt": "1+1=\udcff", "chosen": "2", "rejected": "3"},
                      "prompt: invalid UTF-8"),
}

# name -> (bad groups row, message); the good rows have 2 completions each.
GROUPS_BAD = {
    "nan_reward": ({"prompt": "1+1=", "reference": "2", "completions": ["2", "3"],
                    "rewards": [float("nan"), 0.0]}, "rewards[0]: not finite (nan)"),
    "rewards_length": ({"prompt": "1+1=", "reference": "2", "completions": ["2", "3"],
                        "rewards": [1.0, 0.0, 0.0]}, "rewards: length 3 != len(completions) 2"),
    "group_size": ({"prompt": "1+1=", "reference": "2", "completions": ["2", "3", "4"],
                    "rewards": [1.0, 0.0, 0.0]},
                   "completions: 3 responses, earlier records have 2; set config.data.group_size"),
    "wrong_type": ({"prompt": "1+1=", "reference": "2", "completions": ["2", "3"],
                    "rewards": "high"}, "rewards: expected a non-empty list of numbers"),
    "empty_group": ({"prompt": "1+1=", "reference": "2", "completions": [], "rewards": []},
                    "completions: expected a non-empty list"),
}


def _good_rows(fmt: str) -> list[dict]:
  task = toy.ArithmeticTask()
  if fmt == "pairwise":
    rows = task.pairwise_records(NUM_GOOD, seed=1)
    keys = ("prompt", "chosen", "rejected")
  else:
    rows = task.group_records(NUM_GOOD, 2, seed=1)
    keys = ("prompt", "reference", "completions", "rewards")
  return [{k: r[k] for k in keys} for r in rows]


def _write_jsonl(path, rows) -> None:
  # allow_nan: a NaN reward is written as the bare NaN token, as pandas and json do.
  path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))


def _args(tmp_path, data, recipe: str, *extra: str) -> list[str]:
  return [f"--config={RECIPES}:{recipe}", f"--workdir={tmp_path / 'run'}", "--noprogress",
          f"--config.data.train_path={data}", f"--config.total_steps={TOTAL_STEPS}", *extra]


def _assert_stopped_before_training(tmp_path, status, err, where, problem):
  assert status == 1, err
  assert len(err) == 1 and err[0].startswith(f"jaxalign train: error: {where}: {problem}"), err
  # Nothing trained, nothing written.
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(PAIRWISE_BAD))
def test_bad_pairwise_row_stops_before_training_naming_file_row_field(tmp_path, capsys, name):
  bad, problem = PAIRWISE_BAD[name]
  rows = _good_rows("pairwise")
  rows.insert(5, OVERLONG)  # row 6: valid; the bad row is row 11
  rows.insert(10, bad)
  data = tmp_path / "pairs.jsonl"
  _write_jsonl(data, rows)
  status, err = run_cli(capsys, *_args(tmp_path, data, "dpo"))
  _assert_stopped_before_training(tmp_path, status, err, f"{data}:11", problem)


# Lines that are not a JSON object at all (checked while reading the file).
BAD_LINES = {
    "non_utf8_bytes": (b'{"prompt": "1+1=", "chosen": "\xff\xfe", "rejected": "3"}\n',
                       "invalid UTF-8"),
    "invalid_json": (b'{"prompt": "1+1=", "chosen": "2", "rejected": \n', "invalid JSON"),
    "not_an_object": (b'["1+1=", "2", "3"]\n', "<record>: expected a JSON object, got list"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_line_stops_before_training_naming_file_and_row(tmp_path, capsys, name):
  line, problem = BAD_LINES[name]
  data = tmp_path / "pairs.jsonl"
  _write_jsonl(data, _good_rows("pairwise"))
  with open(data, "ab") as f:
    f.write(line)
  status, err = run_cli(capsys, *_args(tmp_path, data, "dpo"))
  _assert_stopped_before_training(tmp_path, status, err, f"{data}:{NUM_GOOD + 1}", problem)


@pytest.mark.parametrize("name", sorted(GROUPS_BAD))
def test_bad_groups_row_stops_before_training_naming_file_row_field(tmp_path, capsys, name):
  bad, problem = GROUPS_BAD[name]
  rows = _good_rows("groups")
  rows.insert(3, bad)
  data = tmp_path / "groups.jsonl"
  _write_jsonl(data, rows)
  status, err = run_cli(capsys, *_args(tmp_path, data, "grao"))
  _assert_stopped_before_training(tmp_path, status, err, f"{data}:4", problem)


@pytest.mark.parametrize("fmt, recipe, bad_rows", [
    ("pairwise", "dpo", [row for row, _ in PAIRWISE_BAD.values()]),
    ("groups", "grao", [row for row, _ in GROUPS_BAD.values()]),
])
def test_skip_policy_counts_logs_and_trains_to_the_end(tmp_path, capsys, caplog, fmt, recipe,
                                                       bad_rows):
  rows = _good_rows(fmt)
  if fmt == "pairwise":
    rows.insert(0, OVERLONG)
  for i, bad in enumerate(bad_rows):  # spread through the file, not at its start
    rows.insert(2 + 3 * i, bad)
  data = tmp_path / "data.jsonl"
  _write_jsonl(data, rows)
  with caplog.at_level(logging.WARNING):
    status, err = run_cli(capsys, *_args(tmp_path, data, recipe, "--config.data.on_error=skip"))
  assert status == 0, err
  workdir = tmp_path / "run"

  # Counted: in data_stats.json ...
  stats = json.loads((workdir / "data_stats.json").read_text())
  assert stats["skipped"] == len(bad_rows)
  assert stats["records"] == len(rows)
  assert stats["examples"] == len(rows) - len(bad_rows)  # the over-long row is kept
  # ... and logged: the total, and each skipped row by file:row.
  messages = [r.getMessage() for r in caplog.records]
  assert f"skipped {len(bad_rows)} malformed records of {data}" in messages
  assert sum(f"{data}:" in m and "skipping" in m for m in messages) == len(bad_rows)

  # Trained to the end with finite losses.
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics] == list(range(1, TOTAL_STEPS + 1))
  assert all(math.isfinite(m["loss"]) for m in metrics)


def test_skip_policy_also_skips_unreadable_lines(tmp_path, capsys):
  data = tmp_path / "pairs.jsonl"
  _write_jsonl(data, _good_rows("pairwise"))
  with open(data, "ab") as f:
    for line, _ in BAD_LINES.values():
      f.write(line)
  status, err = run_cli(capsys, *_args(tmp_path, data, "dpo", "--config.data.on_error=skip"))
  assert status == 0, err
  stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
  assert stats["skipped"] == len(BAD_LINES)
