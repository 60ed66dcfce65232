"""A run's data is fingerprinted: a resume on other data is refused (or, deliberately,
continues with a recomputed reference); the reference file's faults are one line."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxalign import fingerprint
from jaxalign.data import toy
from tests.reliability.helpers import RECIPES, complete_steps, run_cli
from tests.train.helpers import read_metrics, tiny_config, train_loop

TOTAL_STEPS = 4


def _write_pairs(path, seed):
  records = toy.ArithmeticTask().pairwise_records(64, seed=seed)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """A DPO run on a JSONL file, stopped with a checkpoint at step 2 of 4."""
  root = tmp_path_factory.mktemp("fingerprint")
  data = root / "pairs.jsonl"
  _write_pairs(data, seed=0)
  workdir = root / "run"
  cfg = tiny_config(total_steps=TOTAL_STEPS, **{"checkpoint.every": 2,
                                                "data.train_path": str(data)})
  train_loop(cfg, str(workdir), progress=False, stop_after=2)
  assert complete_steps(workdir) == [2]
  return root


@pytest.fixture
def run_copy(stopped_run, tmp_path):
  shutil.copytree(stopped_run, tmp_path / "c")
  return tmp_path / "c"


def _resume(capsys, root, *overrides):
  return run_cli(capsys, f"--config={RECIPES}", f"--workdir={root / 'run'}", "--noprogress",
                 f"--config.data.train_path={root / 'pairs.jsonl'}",
                 f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint.every=2",
                 *overrides)


def test_fingerprint_is_stored_with_the_run_and_with_the_reference(stopped_run):
  run = json.loads((stopped_run / "run" / fingerprint.RUN_FILE).read_text())
  ref = json.loads((stopped_run / "run" / fingerprint.REF_FILE).read_text())
  assert run == ref
  assert run["rows"] == 64 and len(run["examples"]) == 64 and len(run["tokenizer"]) == 64
  assert run["tokenization"]["max_length"] == 12


@pytest.mark.parametrize("change, named", [
    ("replace", ["content hash"]),            # other text, same row count
    ("fewer", ["rows 64 -> 48", "content hash"]),
    ("max_length", ["tokenization max_length 12 -> 11"]),
])
def test_resume_on_changed_data_is_refused_naming_what_changed(run_copy, capsys, change, named):
  ref_before = np.load(run_copy / "run" / "ref_logps.npy")
  overrides = []
  if change == "replace":
    _write_pairs(run_copy / "pairs.jsonl", seed=1)
  elif change == "fewer":
    lines = (run_copy / "pairs.jsonl").read_text().splitlines(keepends=True)
    (run_copy / "pairs.jsonl").write_text("".join(lines[:48]))
  else:
    overrides = ["--config.data.max_length=11"]
  status, err = _resume(capsys, run_copy, *overrides)
  assert status == 2, err   # a refused resume is a usage error
  assert len(err) == 1 and err[0].startswith(
      f"jaxalign train: error: cannot resume {run_copy / 'run'}: the data differs"), err
  for text in named:
    assert text in err[0], err[0]
  assert "allow_config_change" in err[0]
  assert complete_steps(run_copy / "run") == [2]
  np.testing.assert_array_equal(np.load(run_copy / "run" / "ref_logps.npy"), ref_before)


def test_allowed_data_change_recomputes_the_reference_never_reuses_it(run_copy, capsys,
                                                                     caplog, tmp_path):
  _write_pairs(run_copy / "pairs.jsonl", seed=1)
  status, err = _resume(capsys, run_copy, "--config.allow_config_change=True")
  assert status == 0, err
  assert "recomputing the reference log-probs" in caplog.text
  # The recomputed table equals a fresh run's on the new data (the initial policy's).
  fresh = tmp_path / "fresh"
  cfg = tiny_config(total_steps=1, **{"data.train_path": str(run_copy / "pairs.jsonl")})
  train_loop(cfg, str(fresh), progress=False)
  np.testing.assert_array_equal(np.load(run_copy / "run" / "ref_logps.npy"),
                                np.load(fresh / "ref_logps.npy"))
  assert complete_steps(run_copy / "run")[-1] == TOTAL_STEPS


def test_same_data_under_another_path_resumes(run_copy, capsys):
  os.rename(run_copy / "pairs.jsonl", run_copy / "moved.jsonl")
  status, err = run_cli(capsys, f"--config={RECIPES}", f"--workdir={run_copy / 'run'}",
                        "--noprogress", f"--config.data.train_path={run_copy / 'moved.jsonl'}",
                        f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint.every=2")
  assert status == 0, err


# A missing or unreadable table is a run fault (exit 1); one made for other data refuses
# the resume, a usage error (exit 2).
@pytest.mark.parametrize("fault, expected, exit_status", [
    ("missing", "ref_logps.npy: missing, but checkpoints exist", 1),
    ("truncated", "ref_logps.npy: truncated or not a .npy file", 1),
    ("rows", "ref_logps.npy: has 10 rows, the data has 64", 2),
    ("other data", "ref_logps.npy: made for other data", 2),
])
def test_reference_file_faults_are_one_line_naming_the_file(run_copy, capsys, fault, expected,
                                                            exit_status):
  ref = run_copy / "run" / "ref_logps.npy"
  if fault == "missing":
    ref.unlink()
  elif fault == "truncated":
    ref.write_bytes(ref.read_bytes()[:100])
  elif fault == "rows":
    np.save(ref, np.zeros((10, 2), np.float32))
  else:
    fp = json.loads((run_copy / "run" / fingerprint.REF_FILE).read_text())
    fp["examples"] = "0" * 64
    (run_copy / "run" / fingerprint.REF_FILE).write_text(json.dumps(fp))
  status, err = _resume(capsys, run_copy)
  assert status == exit_status, err
  assert len(err) == 1 and err[0].startswith(f"jaxalign train: error: {ref}: "), err
  assert expected in err[0] and "allow_config_change=True to recompute" in err[0], err[0]
  assert complete_steps(run_copy / "run") == [2]


def test_resume_drops_metric_rows_past_the_restored_step_and_finished_run_says_so(run_copy,
                                                                                 capsys):
  # A run killed after logging steps 3 and 4 but before checkpointing them.
  metrics = run_copy / "run" / "metrics.jsonl"
  with open(metrics, "a") as f:
    f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0})
            + "\n")
  status, err = _resume(capsys, run_copy)
  assert status == 0, err
  steps = [row["step"] for row in read_metrics(str(run_copy / "run"))]
  assert steps == [1, 2, 3, 4]
  assert all(row["loss"] != 9.0 for row in read_metrics(str(run_copy / "run")))


def test_rerunning_a_finished_run_says_it_is_already_complete(run_copy, capsys):
  from jaxalign import cli
  args = ["train", f"--config={RECIPES}", f"--workdir={run_copy / 'run'}", "--noprogress",
          f"--config.data.train_path={run_copy / 'pairs.jsonl'}", "--config.total_steps=2",
          "--config.checkpoint.every=2"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert f"already complete: step 2 of 2 in {run_copy / 'run'}" in out, out
  assert "loss nan" not in out
