"""Run-directory paths: local paths as before, bucket URLs kept intact."""
import json
import os

import numpy as np

from jaxalign import paths
from jaxalign.train import metrics


def test_urls_are_not_mangled_and_local_paths_are_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("gs://bucket/runs/x") == "gs://bucket/runs/x"
  assert paths.join("gs://bucket/runs/x", "checkpoints") == "gs://bucket/runs/x/checkpoints"
  assert paths.resolve("runs/x") == os.path.join(str(tmp_path), "runs", "x")
  assert paths.is_remote("s3://b/k") and not paths.is_remote("/tmp/x")


def test_npy_and_atomic_writes_round_trip(tmp_path):
  table = np.arange(6, dtype=np.float32).reshape(3, 2)
  p = str(tmp_path / "sub" / "ref_logps.npy")
  paths.makedirs(str(tmp_path / "sub"))
  paths.save_npy(p, table)
  np.testing.assert_array_equal(paths.load_npy(p), table)
  assert paths.exists(p) and not paths.exists(p + ".tmp")


def test_metrics_on_a_bucket_are_rewritten_whole_and_kept_on_resume(tmp_path, monkeypatch):
  """A bucket object cannot be appended to: the remote branch rewrites the file, and
  a resumed writer starts from what is there (exercised on a local directory)."""
  monkeypatch.setattr(paths, "is_remote", lambda p: True)
  monkeypatch.setattr(metrics, "_tensorboardx_can_write", lambda url: False)
  w = metrics.MetricWriter(str(tmp_path))
  w.write(1, {"loss": 0.5})
  w.write(2, {"loss": float("nan")})
  w.close()
  w = metrics.MetricWriter(str(tmp_path))
  w.write(3, {"loss": 0.25})
  w.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == "nan"
  assert not (tmp_path / "tensorboard").exists()   # no GCS writer: skipped, warned
