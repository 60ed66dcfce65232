"""Two real processes joined over loopback (gloo) read a raw JSONL lazily: each
validates and tokenizes only its share, the shares are disjoint and together are
the dataset, and the run's losses equal a one-process run's.

The children are this file run as a script (`--child`): `jaxalign.distributed`
joins them, then `loop.train` runs with the reads of the lazy source recorded
(the validation pass's rows, the reference precompute's and the training
pipeline's examples), each process to its own file.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROWS, STEPS = 128, 3


def _config(train_path):
  from tests.train.helpers import tiny_config
  return tiny_config(**{"data.train_path": train_path, "total_steps": STEPS,
                        "checkpoint.every": STEPS})


def _child(port: int, pid: int, train_path: str, workdir: str, log: str) -> None:
  from jaxalign import distributed
  distributed.initialize(distributed.Cluster(f"127.0.0.1:{port}", 2, pid, timeout_s=60))
  from jaxalign.data import lazy, pipeline
  from tests.train.helpers import train_loop
  reads = {"pass": [], "ref": [], "train": []}
  phase = ["train"]
  check, getitem = lazy._Checker.check, lazy.LazyExamples.__getitem__

  def spy_check(self, i):
    reads["pass"].append(int(i))
    return check(self, i)

  def spy_getitem(self, i):
    reads[phase[0]].append(int(i))
    return getitem(self, i)

  ordered = pipeline.ordered_batches

  def spy_ordered(*a, **k):
    phase[0] = "ref"
    try:
      yield from ordered(*a, **k)
    finally:
      phase[0] = "train"

  lazy._Checker.check, lazy.LazyExamples.__getitem__ = spy_check, spy_getitem
  pipeline.ordered_batches = spy_ordered
  train_loop(_config(train_path), workdir, progress=False)
  with open(log, "w") as f:
    json.dump(reads, f)


def _share(p, pc, n, global_batch, steps):
  """The dataset positions of process p's first `steps` batches (pipeline order)."""
  from jaxalign.data import pipeline
  ds = pipeline.make_dataset([{"x": np.int64(i)} for i in range(n)], seed=0,
                             batch_size=global_batch // pc, process_index=p,
                             process_count=pc, repeat=False)
  it = iter(ds)
  return {int(i) for _ in range(steps) for i in next(it)["x"]}


def test_two_processes_read_disjoint_shares_and_equal_one(tmp_path):
  from jaxalign.data import toy
  from tests.train.helpers import read_metrics, train_loop
  src = tmp_path / "pairs.jsonl"
  with open(src, "w") as f:
    for r in toy.ArithmeticTask().pairwise_records(ROWS, seed=0):
      f.write(json.dumps(r) + "\n")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(   # the suite's compile flags (conftest), 4 devices each
                 [f for f in os.environ.get("XLA_FLAGS", "").split()
                  if not f.startswith("--xla_force_host_platform_device_count")]
                 + ["--xla_force_host_platform_device_count=4"]))
  procs = [subprocess.Popen(
      [sys.executable, __file__, "--child", str(port), str(p), str(src), str(tmp_path / "multi"),
       str(tmp_path / f"reads{p}.json")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for p in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
  reads = [json.loads((tmp_path / f"reads{p}.json").read_text()) for p in range(2)]

  # The validation pass: after the first row (every process reads it for the schema),
  # contiguous disjoint blocks that together are every row.
  passes = [set(r["pass"]) - {0} for r in reads]
  assert not passes[0] & passes[1] and passes[0] | passes[1] == set(range(1, ROWS))
  assert max(passes[0]) < min(passes[1])
  # The reference precompute: each process tokenizes its own block of the examples.
  refs = [set(r["ref"]) for r in reads]
  assert not refs[0] & refs[1] and refs[0] | refs[1] == set(range(ROWS))
  # Training: only the examples of this process's batches (plus Grain's prefetch
  # of its next ones), disjoint from the other process's.
  trains = [set(r["train"]) for r in reads]
  for p in range(2):
    taken = _share(p, 2, ROWS, 8, STEPS)
    assert taken <= trains[p] <= _share(p, 2, ROWS, 8, ROWS // 8 // 2)
  assert not trains[0] & trains[1]

  # The same run in one process (8 devices, as the two processes' 4 + 4).
  train_loop(_config(str(src)), str(tmp_path / "single"), progress=False)
  # Wall-clock figures (counts and fills are summed over the processes: compared).
  timed = lambda k: k in ("tokens_per_sec", "eval/seconds") or k.startswith(("perf/", "time/"))
  rows = [{m["step"]: {k: v for k, v in m.items() if not timed(k)}
           for m in read_metrics(str(tmp_path / d))} for d in ("single", "multi")]
  assert sorted(rows[0]) == sorted(rows[1]) == list(range(1, STEPS + 1))
  for step, want in rows[0].items():
    for key, value in want.items():
      np.testing.assert_allclose(rows[1][step][key], value, rtol=1e-5, atol=1e-7,
                                 err_msg=f"step {step} {key}")


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
  sys.path.insert(0, str(ROOT))
  port, pid, train_path, workdir, log = sys.argv[2:7]
  _child(int(port), int(pid), train_path, workdir, log)
