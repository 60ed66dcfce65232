"""Orbax checkpoints: train state, data-iterator state and the resolved config.

A checkpoint is everything needed to continue bit for bit. Orbax writes each
step to a temporary directory and renames it when complete, so a torn write is
never listed as a step and never loaded. Nothing is pickled: arrays go through
tensorstore, the iterator state and the config through JSON.
"""

import json
import logging
import os
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxalign import errors, paths
from jaxalign.errors import CheckpointWriteError, CorruptCheckpointError


def _problem(e: BaseException) -> str:
  """The first line of a restore error, without tensorstore's JSON spec dumps."""
  text = str(e).strip()
  text = text.splitlines()[0] if text else ""
  text = text.split(" [tensorstore_spec")[0]
  if len(text) > 300:
    text = text[:300] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


_ORBAX_SOURCE = os.path.join("", "orbax", "checkpoint", "")


def _is_abandoned_orbax_read(unraisable) -> bool:
  """A coroutine of Orbax's, garbage-collected unfinished, whose close() raised.

  When one array read of a restore fails, Orbax closes its event loop with the
  other reads still pending. Each is closed when it is garbage-collected (as the
  process exits, after the one-line error); Orbax's read turns the GeneratorExit
  into `Exception: Encountered error while reading array index ...`, and Python
  reports it through sys.unraisablehook: "Exception ignored in: <coroutine object
  _read_array_index_and_device_put ...>" and about 20 lines of traceback each.
  """
  code = getattr(unraisable.object, "cr_code", None)   # coroutines only
  return code is not None and _ORBAX_SOURCE in code.co_filename


def _quiet_closed_loop_callbacks() -> None:
  """Drops what the reads (or writes) still in flight report after a failed restore (save).

  Tensorstore reads or writes still in flight when one fails call back into Orbax's
  event loop after it is closed ("Event loop is closed"), and the pending read
  coroutines report their own close when collected (`_is_abandoned_orbax_read`);
  Python prints each through sys.unraisablehook with its traceback, around the
  one-line error, though nothing is wrong any more. They can come as soon as the
  loop closes, before the error has left Orbax, so the hook goes in before the
  first restore and stays (it drops nothing else; --verbose keeps them).
  """
  previous = sys.unraisablehook
  if getattr(previous, "jaxalign_quiet", False):
    return

  def hook(unraisable):
    closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == "Event loop is closed")
    if (closed_loop or _is_abandoned_orbax_read(unraisable)) and not errors.debug_enabled():
      return
    previous(unraisable)

  hook.jaxalign_quiet = True
  sys.unraisablehook = hook


class _QuietOrbaxWriteTracebacks(logging.Filter):
  """Drops Orbax's own tracebacks of a failed checkpoint write.

  Orbax logs a failed write with `logging.exception` in each background save
  thread it concerns and again where the failure is re-raised (four tracebacks
  for one full disk); the CheckpointWriteError that follows names the step, the
  cause and the latest complete checkpoint. Orbax records without a traceback
  still pass, and with --verbose / JAXALIGN_DEBUG=1 everything is printed.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    is_orbax = _ORBAX_SOURCE in record.pathname
    return (errors.debug_enabled()
            or not (is_orbax and record.levelno >= logging.ERROR and record.exc_info))


def _quiet_orbax_write_tracebacks() -> None:
  logger = logging.getLogger("absl")   # Orbax logs through absl.logging: the "absl" logger
  if not any(isinstance(f, _QuietOrbaxWriteTracebacks) for f in logger.filters):
    logger.addFilter(_QuietOrbaxWriteTracebacks())


class Checkpointer:
  """Async save every `every` steps, keep the newest `keep`, restore the latest."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = paths.resolve(directory)   # local, or gs:// (tensorstore + epath)
    self.every = every
    self._async = async_save
    # The step whose async save was started and not yet seen to complete: a failure in
    # the background surfaces only at the next save or wait, and is reported as its.
    self._unconfirmed_step: int | None = None
    _quiet_orbax_write_tracebacks()
    _quiet_closed_loop_callbacks()   # a failed write leaves tensorstore writes in flight too
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, item_names=("state", "data", "config"), options=options)
    except OSError as e:
      raise CheckpointWriteError(f"checkpoint directory {self.directory} is not writable: "
                                 f"{e}") from e

  def check_writable(self) -> None:
    """Raises CheckpointWriteError now if nothing can be written to the directory.

    Before training, rather than at the first save hours later (where an async
    write to an unusable directory ends in Orbax's 5-minute signal timeout).
    """
    probe = epath.Path(paths.join(self.directory, f".write_probe.{jax.process_index()}"))
    try:
      paths.makedirs(self.directory)
      probe.write_text("")
      probe.unlink()
    except OSError as e:
      raise CheckpointWriteError(f"checkpoint directory {self.directory} is not writable: "
                                 f"{e}") from e

  def _write_error(self, e: Exception, what: str) -> CheckpointWriteError:
    self._unconfirmed_step = None
    try:
      # Let an earlier async save still in flight complete: it is the one to keep.
      self._manager.wait_until_finished()
    except Exception:  # it failed too; the error names what is left
      pass
    try:
      latest = self._manager.latest_step()
    except Exception:  # the directory itself may be gone
      latest = None
    return CheckpointWriteError(
        f"{what} in {self.directory} failed: {type(e).__name__}: {e}; latest complete "
        f"checkpoint: {'none' if latest is None else f'step {latest}'}")

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """On the schedule: every `every` steps (forced saves come on top)."""
    return step > 0 and step % self.every == 0

  def save(self, step: int, state, data_iter, config: dict[str, Any], *,
           force: bool = False) -> bool:
    """Starts saving `state` at `step` (async); returns whether it saved."""
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if not (force or self.should_save(step)):
      return False
    # An async write that failed in the background (disk full) surfaces at the next
    # save or in wait()/close(); the previous save is confirmed first, so that a
    # failure is reported as the step whose write failed, not the one after it.
    self._confirm_previous_save()
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # tensorstore reports I/O errors as ValueError
      raise self._write_error(e, f"saving checkpoint step {step}") from e
    self._unconfirmed_step = step if saved and self._async else None
    return saved

  def _confirm_previous_save(self) -> None:
    """Waits for the async save in flight; CheckpointWriteError naming its step if it failed."""
    step = self._unconfirmed_step
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # see save()
      what = "writing a checkpoint" if step is None else f"saving checkpoint step {step}"
      raise self._write_error(e, what) from e
    self._unconfirmed_step = None

  def _corrupt(self, step: int, e: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint step {step} in {self.directory} cannot be read ({_problem(e)})", step=step)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores the state into the shardings of `abstract_state`, and `data_iter` in place.

    Raises:
      CorruptCheckpointError: the step's files cannot be read back.
    """
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    _quiet_closed_loop_callbacks()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # tensorstore, JSON and Orbax errors alike
      raise self._corrupt(step, e) from e
    return restored["state"]

  def restore_config(self, step: int) -> dict[str, Any]:
    """The resolved config saved with `step` (CorruptCheckpointError if unreadable)."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      config = restored["config"]
    except Exception as e:  # see restore()
      raise self._corrupt(step, e) from e
    if not isinstance(config, dict):
      raise self._corrupt(step, TypeError(f"saved config is a {type(config).__name__}"))
    return config

  def set_aside(self, steps: list[int]) -> str:
    """Moves unreadable `steps` out of the directory (to DIR.corrupt/STEP); returns that folder.

    They are kept for inspection, never listed or loaded again, and their step
    numbers are free for the resumed run's own checkpoints.
    """
    aside = f"{self.directory.rstrip('/')}.corrupt"
    if jax.process_index() == 0:
      paths.makedirs(aside)
      for step in steps:
        target = epath.Path(aside) / str(step)
        n = 1
        while target.exists():
          target = epath.Path(aside) / f"{step}.{n}"
          n += 1
        epath.Path(paths.join(self.directory, str(step))).rename(target)
    if jax.process_count() > 1:   # every process sees the moved steps before reloading
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jaxalign_checkpoint_set_aside")
    self._manager.reload()
    return aside

  def wait(self):
    self._confirm_previous_save()

  def close(self):
    self.wait()
    self._manager.close()


def checkpoint_dir(path: str) -> str:
  """A run directory or its checkpoints/ subdirectory -> the checkpoints directory."""
  sub = paths.join(path, "checkpoints")
  return sub if paths.isdir(sub) else path


def saved_config(run_dir: str) -> tuple[int, dict[str, Any]]:
  """(latest step, the config saved with it) of another run's checkpoint directory,
  reading the config's JSON only (no array).

  Raises:
    FileNotFoundError: `run_dir` holds no complete checkpoint.
    CorruptCheckpointError: the latest step's config cannot be read back.
  """
  run_dir = paths.resolve(run_dir)
  manager = ocp.CheckpointManager(run_dir, item_names=("state", "data", "config"))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {run_dir}")
    try:
      config = manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # see Checkpointer.restore
      raise CorruptCheckpointError(f"checkpoint step {step} in {run_dir} cannot be read "
                                   f"({_problem(e)})", step=step) from e
  finally:
    manager.close()
  if not isinstance(config, dict):
    raise CorruptCheckpointError(f"checkpoint step {step} in {run_dir} cannot be read "
                                 f"(its saved config is a {type(config).__name__})", step=step)
  return step, config


def restore_params(run_dir: str, abstract_params, step: int | None = None):
  """Only the trainable parameters of another run's checkpoint (e.g. the SFT model).

  `run_dir` is a run's checkpoint directory; the latest step is used unless
  `step` is given. Optimizer state and everything else are not read.
  """
  run_dir = paths.resolve(run_dir)
  if not paths.isdir(run_dir):
    raise FileNotFoundError(f"init_from: {run_dir} is not a directory")
  manager = ocp.CheckpointManager(run_dir, item_names=("state", "data", "config"))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"init_from: no complete checkpoint in {run_dir}")
  target = {"params": abstract_params}
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      target)
  _quiet_closed_loop_callbacks()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                     partial_restore=True)))
  except Exception as e:  # see Checkpointer.restore
    raise CorruptCheckpointError(f"checkpoint step {step} in {run_dir} cannot be read "
                                 f"({_problem(e)})", step=step) from e
  finally:
    manager.close()
  return restored["state"]["params"]


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (temp file + rename); `path` may be a gs:// URL."""
  paths.write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())
