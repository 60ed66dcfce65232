"""Host-side metric sinks: DIR/metrics.jsonl and TensorBoard event files.

DIR may be a gs:// URL. Objects in a bucket cannot be appended to, so there
metrics.jsonl is rewritten whole at each logged step (earlier rows are read
back first, so a resumed run keeps them). TensorBoard event files go to gs://
through tensorboardX only when google-cloud-storage is installed; otherwise
they are skipped with a warning that says so.
"""

import json
import logging
import math
import os
import threading

from jaxalign import errors, paths

log = logging.getLogger("jaxalign")

# OSErrors that ended a tensorboardX event-writer thread (disk full), taken by the
# next MetricWriter.write of this process to stop the run in one line.
_TB_THREAD_FAILURES: list[OSError] = []


def _route_tensorboard_thread_failures() -> None:
  """threading.excepthook: an OSError ending tensorboardX's writer thread is kept for
  MetricWriter.write to report, instead of a traceback printed from the thread."""
  previous = threading.excepthook
  if getattr(previous, "jaxalign_tensorboard", False):
    return

  def hook(args):
    thread_module = type(args.thread).__module__ if args.thread is not None else ""
    if (thread_module.startswith("tensorboardX") and isinstance(args.exc_value, OSError)
        and not errors.debug_enabled()):
      _TB_THREAD_FAILURES.append(args.exc_value)
      return
    previous(args)

  hook.jaxalign_tensorboard = True
  threading.excepthook = hook


def log_line(step: int, total: int, metrics: dict[str, float], keys) -> str:
  """One plain line of a logged step: `step 10/200 | loss 0.6931 | ...` (the keys present)."""
  return " | ".join([f"step {step}/{total}"] + [f"{k} {metrics[k]:.4g}" for k in keys
                                                 if k in metrics])


class MetricWriter:
  """Appends one JSON object per logged step; sends the scalars to the run's trackers
  (config.report_to: TensorBoard, W&B, MLflow; train/trackers.py)."""

  def __init__(self, workdir: str, *, report_to=("tensorboard",), config: dict | None = None,
               process_index: int = 0, resume_step: int | None = None):
    """`resume_step`: the step a resumed run restarts from; rows logged after it (by a
    run killed past its last checkpoint) are dropped from metrics.jsonl, and
    TensorBoard is told to purge them (its purge_step). `config`: the resolved config,
    sent to the trackers that keep one."""
    self._active = process_index == 0
    self._jsonl = None
    self._trackers = []
    self._tb_dir = None
    self._remote_path = None
    self._remote_text = ""
    self.resumed: dict = {}   # the last kept row of a resumed run (cumulative counts go on)
    if not self._active:
      return
    if paths.is_remote(workdir):
      paths.makedirs(workdir)
      self._remote_path = paths.join(workdir, "metrics.jsonl")
      if paths.exists(self._remote_path):
        from etils import epath
        self._remote_text = epath.Path(self._remote_path).read_text()
        if resume_step is not None:
          self._remote_text = _rows_up_to(self._remote_text, resume_step)
          self.resumed = _last_row(self._remote_text)
    else:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None and os.path.exists(path):
        with open(path) as f:
          text = f.read()
        kept = _rows_up_to(text, resume_step)
        if kept != text:
          paths.write_bytes_atomic(path, kept.encode())
        self.resumed = _last_row(kept)
      self._jsonl = open(path, "a")
    names = list(report_to)
    if "tensorboard" in names and paths.is_remote(workdir) and not _tensorboardx_can_write(
        workdir):
      log.warning("TensorBoard events not written to %s: tensorboardX needs "
                  "google-cloud-storage for gs:// (boto3 for s3://), not installed here; "
                  "metrics.jsonl is written", workdir)
      names.remove("tensorboard")
    if "tensorboard" in names:
      _route_tensorboard_thread_failures()
      self._tb_dir = paths.join(workdir, "tensorboard")
    from jaxalign.train import trackers
    self._trackers = trackers.open_trackers(names, workdir, resume_step=resume_step,
                                            config=config or {})

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/inf
    if self._remote_path is not None:
      self._remote_text += json.dumps(row) + "\n"
      paths.write_bytes_atomic(self._remote_path, self._remote_text.encode())
    else:
      try:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
      except OSError as e:   # disk full: name the file (a file object's write does not)
        raise errors.write_failure(self._jsonl.name, e) from e
    if self._tb_dir is not None and _TB_THREAD_FAILURES:
      # tensorboardX's writer thread died (disk full): its events are being lost.
      raise errors.write_failure(self._tb_dir, _TB_THREAD_FAILURES.pop())
    for tracker in self._trackers:
      tracker.log(step, scalars)

  def summary(self, values: dict) -> None:
    """The end-of-run summary, to the trackers that keep one (W&B, MLflow)."""
    for tracker in self._trackers:
      tracker.summary(values)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    for tracker in self._trackers:
      tracker.close()
    self._trackers = []


def _last_row(text: str) -> dict:
  """The last readable row of metrics.jsonl text that is not an eval-only row."""
  for line in reversed(text.splitlines()):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and "num_tokens" in row:
      return row
  return {}


def _rows_up_to(text: str, step: int) -> str:
  """The metrics.jsonl lines whose step is <= `step` (unreadable lines are kept)."""
  kept = []
  for line in text.splitlines(keepends=True):
    try:
      row_step = json.loads(line).get("step")
    except (ValueError, AttributeError):
      row_step = None
    if not isinstance(row_step, int) or row_step <= step:
      kept.append(line)
  return "".join(kept)


def _tensorboardx_can_write(url: str) -> bool:
  """Whether tensorboardX has a writer for this URL scheme (gs: google-cloud-storage)."""
  from tensorboardX import record_writer
  scheme = url.split("://")[0]
  return {"gs": record_writer.GCS_ENABLED, "s3": record_writer.S3_ENABLED}.get(scheme, False)
