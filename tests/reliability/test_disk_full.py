"""Disk full at save time: a clear error naming the checkpoint directory; the previous
checkpoint stays complete and loads bit-identical to a clean run's.

Running as root makes a read-only directory writable anyway, so the fault is
injected where Orbax writes: synchronously (the manager's save raises) or in the
background thread of an async save (the file write raises ENOSPC), which surfaces
at the next save or when the run closes.
"""

import errno
import logging

import orbax.checkpoint as ocp
import pytest

from jaxalign import checkpoint as ckpt
from tests.reliability.helpers import (TINY_CLI_CONFIG, assert_bit_identical, complete_steps,
                                       params, run_cli)
from tests.train.helpers import tiny_config, train_loop

TOTAL_STEPS = 6
EVERY = 2  # saves at 2 (fine), 4 (disk full), 6


def _config():
  return tiny_config(total_steps=TOTAL_STEPS, **{"checkpoint.every": EVERY})


def _disk_full(*_, path="") -> OSError:
  return OSError(errno.ENOSPC, "No space left on device", str(path))


def _fail_sync_saves_after_the_first(monkeypatch):
  original = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step > EVERY:
      raise _disk_full(path=self.directory)
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def _fail_async_writes_after_the_first(monkeypatch):
  # The config item is written by JsonCheckpointHandler in the background thread.
  original = ocp.handlers.JsonCheckpointHandler._save_fn
  calls = []

  async def write(self, item, directory):
    calls.append(directory)
    if len(calls) > 1:
      raise _disk_full(path=directory)
    return await original(self, item, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", write)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("clean") / "run"
  train_loop(_config(), str(workdir), progress=False, stop_after=EVERY)
  return workdir


@pytest.mark.parametrize("inject", [_fail_sync_saves_after_the_first,
                                    _fail_async_writes_after_the_first])
def test_disk_full_at_save_names_the_directory_and_keeps_the_previous_checkpoint(
    tmp_path, capsys, caplog, monkeypatch, clean_run, inject):
  inject(monkeypatch)
  workdir = tmp_path / "run"
  status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                        "--noprogress", f"--config.total_steps={TOTAL_STEPS}",
                        f"--config.checkpoint.every={EVERY}")
  monkeypatch.undo()
  assert status == 1, err
  # The whole of stderr is one line naming the step whose write failed (step 4, also
  # when it failed in the background and surfaced at step 6's save) ...
  assert len(err) == 1, err
  assert err[0].startswith(f"jaxalign train: error: saving checkpoint step {2 * EVERY} in "
                           f"{workdir / 'checkpoints'} failed: OSError: [Errno 28] No space "
                           f"left"), err
  assert f"latest complete checkpoint: step {EVERY}" in err[0]
  # ... and Orbax's tracebacks of the failure are not logged either (pytest's log capture
  # takes them from stderr in this process; `jaxalign train` prints them with --verbose).
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert complete_steps(workdir) == [EVERY]
  assert_bit_identical(params(workdir, _config()), params(clean_run, _config()))


def test_unusable_checkpoint_directory_fails_before_training(tmp_path, capsys):
  # A file where the checkpoints directory should be: no write can succeed there.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a directory")
  status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                        "--noprogress", f"--config.total_steps={TOTAL_STEPS}")
  assert status == 1, err
  assert err == [f"jaxalign train: error: checkpoint directory {workdir / 'checkpoints'} is not "
                 f"writable: [Errno 17] File exists: '{workdir / 'checkpoints'}'"]
  assert not (workdir / "metrics.jsonl").exists()  # stopped before the first step


def test_read_only_checkpoint_directory_fails_before_training(tmp_path, monkeypatch):
  # As root a read-only directory stays writable, so the refusal is simulated at open().
  directory = tmp_path / "checkpoints"
  real_open = open

  def read_only_open(file, mode="r", *args, **kwargs):
    if str(file).startswith(str(directory)) and any(m in mode for m in "wax+"):
      raise PermissionError(errno.EACCES, "Permission denied", str(file))
    return real_open(file, mode, *args, **kwargs)

  checkpointer = ckpt.Checkpointer(str(directory), every=1, keep=1)
  monkeypatch.setattr("builtins.open", read_only_open)
  with pytest.raises(ckpt.CheckpointWriteError,
                     match=f"checkpoint directory {directory} is not writable: .*Permission"):
    checkpointer.check_writable()
  monkeypatch.undo()
  checkpointer.close()


# Output commands: `jaxalign export` and `jaxalign prepare` onto a full or read-only disk.

class _FullDisk:
  """`open` for writing under `directory` gets files that raise ENOSPC once `free`
  bytes, counted over all of them, are spent (a full disk, root or not)."""

  def __init__(self, monkeypatch, directory, *, free: int):
    self.directory, self.free = str(directory), free
    self._open = open
    monkeypatch.setattr("builtins.open", self.open)

  def open(self, file, mode="r", *args, **kwargs):
    f = self._open(file, mode, *args, **kwargs)
    if str(file).startswith(self.directory) and any(m in mode for m in "wax+"):
      return _Filling(f, self)
    return f


class _Filling:
  def __init__(self, f, disk: _FullDisk):
    self._f, self._disk = f, disk

  def write(self, data):
    if len(data) > self._disk.free:
      self._f.write(data[:self._disk.free])   # what fit before the disk filled up
      self._disk.free = 0
      raise OSError(errno.ENOSPC, "No space left on device")
    self._disk.free -= len(data)
    return self._f.write(data)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self._f.__exit__(*exc)


def _read_only(monkeypatch, directory):
  real_open = open

  def read_only_open(file, mode="r", *args, **kwargs):
    if str(file).startswith(str(directory)) and any(m in mode for m in "wax+"):
      raise PermissionError(errno.EROFS, "Read-only file system", str(file))
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr("builtins.open", read_only_open)


def _cli(capsys, *argv) -> tuple[int, list[str]]:
  from jaxalign import cli
  status = cli.main(list(argv))
  return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_export_onto_a_full_or_read_only_disk_is_one_line_and_leaves_nothing_that_looks_complete(
    tmp_path, capsys, monkeypatch, clean_run, disk):
  out = tmp_path / "hf"
  status, err = _cli(capsys, "export", f"--checkpoint={clean_run}", f"--out={out}")
  assert status == 0 and (out / "config.json").exists(), err   # an earlier complete export
  if disk == "full":   # room for the config files, not for the weights (about 120 kB)
    _FullDisk(monkeypatch, out, free=4096)
    cause = "No space left on device"
  else:
    _read_only(monkeypatch, out)
    cause = "Read-only file system"
  status, err = _cli(capsys, "export", f"--checkpoint={clean_run}", f"--out={out}")
  monkeypatch.undo()
  assert status == 1 and len(err) == 1, err
  assert err[0] == (f"jaxalign export: error: {out / 'model.safetensors'}: cannot be written "
                    f"({cause}); export not completed: {out} holds no weights and no "
                    f"config.json from it"), err
  # Nothing a loader would take for a model: no weights, no partial file, no config.json
  # (the earlier export's is removed with its weights before anything new is written).
  left = sorted(p.name for p in out.iterdir())
  assert not [n for n in left if n.endswith((".safetensors", ".tmp")) or n == "config.json"], left


def test_prepare_onto_a_full_disk_is_one_line_and_keeps_the_complete_shards(
    tmp_path, capsys, monkeypatch):
  from array_record.python import array_record_module
  out = tmp_path / "prep"
  real_writer = array_record_module.ArrayRecordWriter

  class DiskFullAtSecondShard:
    """ArrayRecord's own report when the disk fills while it flushes shard 1."""

    def __init__(self, path, options):
      self._path = path
      self._writer = real_writer(path, options)

    def write(self, record):
      self._writer.write(record)

    def close(self):
      self._writer.close()
      if "shard-00001-" in self._path:
        raise RuntimeError(f"write() failed: No space left on device; writing {self._path}; "
                           "at byte 69632; Failed to close chunk_writer")

  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", DiskFullAtSecondShard)
  argv = ("prepare", f"--config={TINY_CLI_CONFIG}", f"--out={out}", "--shard_size=20")
  status, err = _cli(capsys, *argv)
  monkeypatch.undo()
  assert status == 1 and len(err) == 1, err
  assert err[0] == (f"jaxalign prepare: error: {out / 'shard-00001-of-00004.arrayrecord'}: "
                    f"cannot be written (write() failed: No space left on device); 1 of 4 "
                    f"shards are complete and kept: free space and rerun the same jaxalign "
                    f"prepare --out {out} to finish"), err
  # The complete shard and its sidecar stay; no partial shard, no manifest.
  assert sorted(p.name for p in out.iterdir()) == ["shard-00000-of-00004.arrayrecord",
                                                   "shard-00000-of-00004.json"]
  # The rerun the line asks for writes only the three missing shards.
  from jaxalign import cli
  assert cli.main(list(argv)) == 0
  assert "in 4 shards (3 written, 1 kept)" in capsys.readouterr().out


def test_metrics_onto_a_full_disk_stop_the_run_naming_the_file_and_print_no_thread_traceback(
    tmp_path, capsys, monkeypatch):
  """A full disk also stops tensorboardX's event-writer thread (before, its traceback was
  printed from the thread beside the run's line) and metrics.jsonl's appends (before, an
  OSError naming no file). Each is one OutputWriteError naming the file."""
  import threading
  import time

  from tensorboardX import record_writer

  from jaxalign import errors
  from jaxalign.train import metrics

  def disk_full(self, data):
    raise OSError(errno.ENOSPC, "No space left on device")

  printed = []   # what threading's default hook would print
  monkeypatch.setattr(threading, "excepthook", printed.append)
  writer = metrics.MetricWriter(str(tmp_path / "run"))
  monkeypatch.setattr(record_writer.RecordWriter, "write", disk_full)   # full from now on
  raised = None
  # The thread takes events from a queue of 10 (a put blocks once it is full): at most 8
  # writes, 0.2 s apart; the thread dies on the first event.
  for step in range(1, 9):
    try:
      writer.write(step, {"loss": 0.5})
    except errors.OutputWriteError as e:
      raised = e
      break
    time.sleep(0.2)
  assert printed == [] and capsys.readouterr().err == ""
  assert str(raised) == f"{tmp_path / 'run' / 'tensorboard'}: cannot be written (No space left on device)"

  jsonl = metrics.MetricWriter(str(tmp_path / "run2"), report_to=())
  _FullDisk(monkeypatch, tmp_path / "run2", free=0)
  jsonl._jsonl = open(jsonl._jsonl.name, "a")   # reopened on the full disk
  with pytest.raises(errors.OutputWriteError,
                     match=f"^{tmp_path / 'run2' / 'metrics.jsonl'}: cannot be written "
                           r"\(No space left on device\)$"):
    jsonl.write(1, {"loss": 0.5})
