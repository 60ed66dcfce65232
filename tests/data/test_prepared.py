"""`jaxalign prepare`: shards equal to the raw path's examples, resumable, refused when
they do not match the run, and a run from them equals (and resumes like) a raw run."""

import json
import os

import numpy as np
import pytest

from jaxalign import fingerprint
from jaxalign.data import examples as examples_lib
from jaxalign.data import formats, lazy, pipeline, prepared, reading, tables, toy
from jaxalign.workflows import prepare as prepare_lib
from tests.data.reference import list_examples
from tests.reliability.helpers import (TINY_CLI_CONFIG, assert_bit_identical, params,
                                       run_cli)
from tests.train.helpers import read_metrics, resolved, tiny_config, train_loop

STEPS = 4


def _write_pairs(path, n=64, seed=0, bad_row=None):
  records = toy.ArithmeticTask().pairwise_records(n, seed=seed)
  with open(path, "w") as f:
    for i, r in enumerate(records):
      if i + 1 == bad_row:
        r = {**r, "chosen": 7}   # not a string: a malformed row
      f.write(json.dumps(r) + "\n")


def _settings(cfg):
  d = cfg.data
  return dict(split=d.split, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
              on_error=d.on_error, group_size=d.group_size)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """pairs.jsonl (64 rows) and its prepared set (4 shards of 16, 2 workers)."""
  root = tmp_path_factory.mktemp("prepared")
  _write_pairs(root / "pairs.jsonl")
  cfg = tiny_config(**{"data.train_path": str(root / "pairs.jsonl")})
  manifest = prepare_lib.prepare_from_config(resolved(cfg), str(root / "prep"), shard_size=16, workers=2)
  assert manifest["written_shards"] == 4 and manifest["examples"] == 64
  return root


def test_prepared_examples_equal_the_raw_path_and_skip_the_same_rows(tmp_path):
  _write_pairs(tmp_path / "pairs.jsonl", n=40, bad_row=7)
  cfg = tiny_config(**{"data.train_path": str(tmp_path / "pairs.jsonl"),
                       "data.on_error": "skip"})
  manifest = prepare_lib.prepare_from_config(resolved(cfg), str(tmp_path / "prep"), shard_size=8, workers=2)
  tok = reading.load_tokenizer("toy")
  raw, raw_skipped = list_examples(str(tmp_path / "pairs.jsonl"), "pairwise", tok,
                                   **_settings(cfg))
  prep, prep_skipped = examples_lib.open_examples(str(tmp_path / "prep"), "pairwise", tok,
                                                  **_settings(cfg))
  assert (len(prep), prep_skipped) == (len(raw), raw_skipped) == (39, 1)
  assert len(manifest["shards"]) == 5
  for a, b in zip(prep, raw):
    assert sorted(a) == sorted(b)
    for k in a:
      assert a[k].dtype == b[k].dtype
      np.testing.assert_array_equal(a[k], b[k])
  assert manifest["content_hash"] == fingerprint.examples_hash(raw)
  lazy_raw, _ = examples_lib.open_examples(str(tmp_path / "pairs.jsonl"), "pairwise", tok,
                                           **_settings(cfg))
  assert prep.content_hash == lazy_raw.content_hash   # what a run's fingerprint stores
  assert manifest["settings"]["tokenizer_hash"] == fingerprint.tokenizer_hash(tok)
  assert manifest["source_hash"] == lazy.source_hash(str(tmp_path / "pairs.jsonl"))


def test_batched_reads_give_the_per_example_pipelines_batches_and_state(data):
  """A prepared set reads a batch at once (pipeline._index_dataset); the batches, the
  "index" column, a joined table and a restored iterator equal the per-example path's."""
  cfg = tiny_config(**{"data.train_path": str(data / "pairs.jsonl")})
  prep, _ = examples_lib.open_examples(str(data / "prep"), "pairwise",
                                       reading.load_tokenizer("toy"), **_settings(cfg))
  table = np.arange(len(prep) * 2, dtype=np.float32).reshape(len(prep), 2)
  fast = tables.with_column(prep, "ref_logps", table)
  slow = tables.with_column([prep[i] for i in range(len(prep))], "ref_logps", table)
  assert fast.batched_reads and not slow.batched_reads

  def batches(src, n, state=None):
    it = iter(pipeline.make_dataset(src, seed=3, batch_size=6, add_index=True,
                                    process_index=1, process_count=2))
    if state is not None:
      it.set_state(state)
    return [next(it) for _ in range(n)], it.get_state()

  (want, _), (got, _) = batches(slow, 7), batches(fast, 7)   # 7 > one epoch of 5
  for a, b in zip(want, got):
    assert sorted(a) == sorted(b)
    for k in a:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  (_, state) = batches(fast, 3)
  (resumed, _) = batches(fast, 4, state)
  for a, b in zip(want[3:], resumed):
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_malformed_row_names_its_file_row_and_field(tmp_path):
  _write_pairs(tmp_path / "pairs.jsonl", n=20, bad_row=5)
  cfg = tiny_config(**{"data.train_path": str(tmp_path / "pairs.jsonl")})
  with pytest.raises(formats.DataError, match=r"pairs\.jsonl:5: chosen"):
    prepare_lib.prepare_from_config(resolved(cfg), str(tmp_path / "prep"), shard_size=8, workers=2)
  assert not prepared.is_prepared(str(tmp_path / "prep"))


def test_rerun_keeps_complete_shards_and_rewrites_a_damaged_one(tmp_path):
  _write_pairs(tmp_path / "pairs.jsonl", n=32)
  cfg = tiny_config(**{"data.train_path": str(tmp_path / "pairs.jsonl")})
  out = tmp_path / "prep"
  first = prepare_lib.prepare_from_config(resolved(cfg), str(out), shard_size=8)
  files = {s["file"]: (out / s["file"]).read_bytes() for s in first["shards"]}
  damaged = out / first["shards"][2]["file"]
  damaged.write_bytes(damaged.read_bytes()[:100])   # a torn write
  os.remove(out / first["shards"][3]["file"])
  again = prepare_lib.prepare_from_config(resolved(cfg), str(out), shard_size=8, workers=2)
  assert (again["written_shards"], again["reused_shards"]) == (2, 2)
  assert again["content_hash"] == first["content_hash"]
  assert {f: (out / f).read_bytes() for f in files} == files
  # Other settings: no shard is reused.
  other = tiny_config(**{"data.train_path": str(tmp_path / "pairs.jsonl"),
                         "data.max_prompt_length": 6})
  assert prepare_lib.prepare_from_config(resolved(other), str(out), shard_size=8)["written_shards"] == 4


def test_run_from_prepared_equals_raw_and_resumes_bit_exact(data, tmp_path):
  over = {"total_steps": STEPS, "checkpoint.every": 2}
  raw_cfg = tiny_config(**over, **{"data.train_path": str(data / "pairs.jsonl")})
  prep_cfg = tiny_config(**over, **{"data.train_path": str(data / "prep")})
  train_loop(raw_cfg, str(tmp_path / "raw"), progress=False)
  train_loop(prep_cfg, str(tmp_path / "prep"), progress=False)
  losses = [[m["loss"] for m in read_metrics(str(tmp_path / d))] for d in ("raw", "prep")]
  assert len(losses[0]) == STEPS and losses[0] == losses[1]
  straight = params(tmp_path / "prep", prep_cfg)
  assert_bit_identical(params(tmp_path / "raw", raw_cfg), straight)
  # The same data fingerprint (and reference table) from either source: a run may
  # resume on the prepared set of the data it started on.
  fps = [json.loads((tmp_path / d / fingerprint.RUN_FILE).read_text()) for d in ("raw", "prep")]
  assert fingerprint.same_data(*fps)
  np.testing.assert_array_equal(np.load(tmp_path / "raw" / "ref_logps.npy"),
                                np.load(tmp_path / "prep" / "ref_logps.npy"))

  # Stopped at step 2 and resumed from the prepared set: bit-identical.
  train_loop(prep_cfg, str(tmp_path / "resumed"), progress=False, stop_after=2)
  train_loop(prep_cfg, str(tmp_path / "resumed"), progress=False)
  assert_bit_identical(params(tmp_path / "resumed", prep_cfg), straight)


def _train_cli(capsys, data, tmp_path, *overrides):
  return run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={tmp_path / 'run'}",
                 "--noprogress", f"--config.data.train_path={data}", "--config.total_steps=1",
                 *overrides)


def test_prepare_command_then_a_mismatched_run_is_refused_in_one_line(tmp_path, capsys):
  from jaxalign import cli
  out = tmp_path / "prep"
  status = cli.main(["prepare", f"--config={TINY_CLI_CONFIG}", f"--out={out}",
                     "--workers=2", "--shard_size=20"])
  printed = capsys.readouterr().out
  assert status == 0 and "prepared 64 examples (0 skipped) in 4 shards" in printed
  status, err = _train_cli(capsys, out, tmp_path, "--config.data.max_length=10")
  assert status == 2 and len(err) == 1, err
  assert "config.data.train_path" in err[0] and "max_length 12 (prepared) vs 10" in err[0]
  assert not (tmp_path / "run").exists()
  manifest = json.loads((out / prepared.MANIFEST).read_text())
  manifest["settings"]["tokenizer_hash"] = "0" * 64   # made with another tokenizer
  (out / prepared.MANIFEST).write_text(json.dumps(manifest))
  status, err = _train_cli(capsys, out, tmp_path)
  assert status == 2 and len(err) == 1 and "tokenizer hash 000000000000" in err[0], err


@pytest.mark.parametrize("fault", ["truncated", "absent"])
def test_a_truncated_or_absent_shard_is_one_line_naming_the_file(data, tmp_path, capsys,
                                                                 fault):
  import shutil
  copy = tmp_path / "prep"
  shutil.copytree(data / "prep", copy)
  shard = copy / json.loads((copy / prepared.MANIFEST).read_text())["shards"][1]["file"]
  if fault == "truncated":
    shard.write_bytes(shard.read_bytes()[:-10])
  else:
    os.remove(shard)
  status, err = _train_cli(capsys, copy, tmp_path)
  assert status == 1 and len(err) == 1, err
  assert str(shard) in err[0] and ("truncated" in err[0] if fault == "truncated"
                                   else "missing" in err[0])


@pytest.mark.parametrize("state", ["killed", "running"])
def test_a_half_written_prepared_set_is_refused_in_one_line_before_anything_is_written(
    data, tmp_path, capsys, state):
  """`jaxalign prepare` killed after 2 of 4 shards (or still writing the third): no
  manifest, so its sidecars must not be read as JSONL rows (a 64-line traceback)."""
  import shutil
  copy = tmp_path / "prep"
  shutil.copytree(data / "prep", copy)
  shards = json.loads((copy / prepared.MANIFEST).read_text())["shards"]
  os.remove(copy / prepared.MANIFEST)
  for shard in shards[2:]:
    os.remove(copy / shard["file"])
    os.remove(copy / (shard["file"][:-len(".arrayrecord")] + ".json"))
  if state == "running":   # the third shard half-written under its temporary name
    (copy / (shards[2]["file"] + ".tmp")).write_bytes(b"\0" * 100)
  status, err = _train_cli(capsys, copy, tmp_path)
  assert status == 2 and len(err) == 1, err
  assert f"config.data.train_path: {copy} is an incomplete prepared dataset" in err[0], err
  assert "2 of 4 shards written" in err[0] and "jaxalign prepare" in err[0], err
  assert not (tmp_path / "run").exists()
  # What the line says finishes it: a rerun of prepare into the directory keeps the shards.
  cfg = tiny_config(**{"data.train_path": str(data / "pairs.jsonl")})
  again = prepare_lib.prepare_from_config(resolved(cfg), str(copy), shard_size=16)
  assert (again["reused_shards"], again["written_shards"]) == (2, 2)
  status, err = _train_cli(capsys, copy, tmp_path)
  assert status == 0, err


def test_a_corrupted_shard_of_the_same_size_is_one_line_naming_it_before_training(
    data, tmp_path, capsys):
  """One byte flipped in a shard: found by its sha256 when the set is opened, not by
  ArrayRecord's checksum mid-run; no workdir."""
  import shutil
  copy = tmp_path / "prep"
  shutil.copytree(data / "prep", copy)
  shard = copy / json.loads((copy / prepared.MANIFEST).read_text())["shards"][1]["file"]
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  shard.write_bytes(bytes(raw))
  status, err = _train_cli(capsys, copy, tmp_path)
  assert status == 1 and len(err) == 1, err
  assert err[0].startswith(f"jaxalign train: error: {shard}: corrupted"), err
  assert "rerun jaxalign prepare" in err[0]
  assert not (tmp_path / "run").exists()
