"""Directory sources keep each file's own rows and refuse mixed schemas; chat roles
outside what templates render are bad data."""

import json

import pytest

from jaxalign.data import formats, sources
from tests.reliability.helpers import RECIPES, run_cli

PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train(capsys, tmp_path, data):
  return run_cli(capsys, f"--config={RECIPES}", f"--workdir={tmp_path / 'run'}", "--noprogress",
                 f"--config.data.train_path={data}")


def test_directory_whose_files_have_different_schemas_is_one_line_naming_them(tmp_path,
                                                                               capsys):
  data = tmp_path / "data"
  data.mkdir()
  _write(data / "a.jsonl", [PAIR] * 3)
  _write(data / "b.jsonl", [PAIR] * 2)
  _write(data / "c.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 2)
  status, err = _train(capsys, tmp_path, data)
  assert status == 1, err
  assert len(err) == 1, err
  assert err[0].startswith(f"jaxalign train: error: {data}: its data files have different "
                           "fields: "), err[0]
  assert "a.jsonl (and 1 more) has ['chosen', 'prompt', 'rejected']" in err[0], err[0]
  assert "c.jsonl has ['completion', 'prompt']" in err[0], err[0]
  assert not (tmp_path / "run").exists()


def test_bad_row_in_a_directory_names_its_own_file_and_row(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  _write(data / "a.jsonl", [PAIR] * 5)
  _write(data / "b.jsonl", [PAIR, {**PAIR, "chosen": 7}, PAIR])
  status, err = _train(capsys, tmp_path, data)
  assert status == 1, err
  assert err == [f"jaxalign train: error: {data / 'b.jsonl'}:2: chosen: expected a string, "
                 "got int"], err


def test_directory_splits_are_found_as_datasets_finds_them(tmp_path):
  _write(tmp_path / "train.jsonl", [PAIR] * 3)
  _write(tmp_path / "test.jsonl", [PAIR] * 2)
  train = sources.load_records(tmp_path, split="train")
  test = sources.load_records(tmp_path, split="test")
  assert [(r["source_file"], r["row"]) for r in train] == [
      (str(tmp_path / "train.jsonl"), i) for i in (1, 2, 3)]
  assert len(test) == 2
  with pytest.raises(formats.DataError, match=r"no split 'validation'"):
    sources.load_records(tmp_path, split="validation")


@pytest.mark.parametrize("record, where", [
    ({"prompt": [{"role": "human", "content": "1+1="}], "chosen": "2", "rejected": "3"},
     "prompt[0].role: unknown role 'human'"),
    ({"prompt": "1+1=", "chosen": [{"role": "gpt", "content": "2"}], "rejected": "3"},
     "chosen[0].role: unknown role 'gpt'"),
    ({"prompt": [{"role": "System", "content": "be brief"}, {"role": "user", "content": "1+1="}],
      "chosen": "2", "rejected": "3"},
     "prompt[0].role: unknown role 'System'"),
])
def test_unknown_chat_role_names_file_row_and_field(record, where):
  records = [{**PAIR, "source_file": "f.jsonl", "row": 1},
             {**record, "source_file": "f.jsonl", "row": 2}]
  with pytest.raises(formats.DataError) as e:
    formats.validate_records(records, "pairwise")
  assert str(e.value).startswith(f"f.jsonl:2: {where}; chat templates take "
                                 "['system', 'user', 'assistant']"), str(e.value)
  valid, skipped = formats.validate_records(records, "pairwise", on_error="skip")
  assert len(valid) == 1 and skipped == 1
