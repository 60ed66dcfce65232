"""The bundled demo end to end: DPO must beat SFT by >= 10 points (seed 0).

Runs `jaxalign demo` in a subprocess with one CPU device, as a user would:
under the suite's 8 fake devices the same tiny model runs several times slower.
"""

import json
import os
import subprocess
import sys


def _demo(workdir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "jaxalign.cli", "demo", f"--workdir={workdir}",
                         "--no-progress"], env=env, capture_output=True, text=True, timeout=900)


def test_demo_aligned_beats_sft_by_10_points(tmp_path):
  workdir = tmp_path / "demo"
  run = _demo(workdir)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "SFT (before)" in run.stdout and "DPO (after)" in run.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["method"] == "dpo"
  assert summary["devices"] == "1 x cpu"
  assert summary["aligned_accuracy"] >= summary["sft_accuracy"] + 0.10, summary
  # A second run into the same directory is refused instead of mixing runs.
  again = _demo(workdir)
  assert again.returncode == 2 and "already holds a dpo demo run" in again.stderr
