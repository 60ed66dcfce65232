"""Experiment trackers a run reports to (`config.report_to`): TensorBoard (default),
Weights & Biases, MLflow; each takes the same metric names, the run's config at
start and its end-of-run summary.

Names follow TRL's integrations: a training metric is `train/<name>`, a held-out
one keeps its `eval/` prefix. metrics.jsonl keeps the bare names.
W&B and MLflow are optional extras (`pip install 'jaxalign[wandb]'`, `[mlflow]`);
config validation names the extra when one is asked for and missing.
"""

from __future__ import annotations

import logging
import os
import secrets

from jaxalign import paths

log = logging.getLogger("jaxalign")


def tracker_name(key: str) -> str:
  """A metric's name in a tracker: `eval/...` kept, anything else under `train/`."""
  return key if key.startswith("eval/") else f"train/{key}"


def _read_id(workdir: str, name: str) -> str | None:
  path = paths.join(workdir, name)
  if not paths.exists(path):
    return None
  from etils import epath
  return epath.Path(path).read_text().strip() or None


def _write_id(workdir: str, name: str, run_id: str) -> None:
  paths.write_bytes_atomic(paths.join(workdir, name), run_id.encode())


def _flat(node, prefix: str = "") -> dict:
  out = {}
  for key, value in node.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


class TensorBoard:
  def __init__(self, workdir: str, *, resume_step: int | None, config: dict):
    del config   # TensorBoard shows scalars; the config is resolved_config.json
    from tensorboardX import SummaryWriter   # local: only the writing process needs it
    self._writer = SummaryWriter(paths.join(workdir, "tensorboard"), purge_step=(
        resume_step + 1 if resume_step else None))

  def log(self, step: int, scalars: dict[str, float]) -> None:
    for key, value in scalars.items():
      self._writer.add_scalar(tracker_name(key), float(value), int(step))

  def summary(self, values: dict) -> None:
    del values

  def close(self) -> None:
    self._writer.close()


class Wandb:
  """A W&B run whose id is kept in the workdir, so a resumed run continues it.
  WANDB_PROJECT / WANDB_MODE (offline) etc. are W&B's own environment settings."""

  def __init__(self, workdir: str, *, resume_step: int | None, config: dict):
    del resume_step
    import wandb
    run_id = _read_id(workdir, "wandb_run_id") or secrets.token_hex(4)
    self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "jaxalign"),
                           name=os.path.basename(workdir.rstrip("/")), id=run_id,
                           resume="allow", config=config,
                           dir=None if paths.is_remote(workdir) else workdir)
    _write_id(workdir, "wandb_run_id", run_id)

  def log(self, step: int, scalars: dict[str, float]) -> None:
    self._run.log({tracker_name(k): float(v) for k, v in scalars.items()}, step=int(step))

  def summary(self, values: dict) -> None:
    self._run.summary.update({f"run/{k}": v for k, v in _flat(values).items()
                              if isinstance(v, (int, float))})

  def close(self) -> None:
    self._run.finish()


class Mlflow:
  """An MLflow run in MLFLOW_TRACKING_URI (default: a file store in DIR/mlruns), its
  id kept in the workdir so a resumed run continues it; the config as parameters."""

  def __init__(self, workdir: str, *, resume_step: int | None, config: dict):
    del resume_step
    import mlflow
    self._mlflow = mlflow
    if not os.environ.get("MLFLOW_TRACKING_URI"):
      if paths.is_remote(workdir):
        raise ValueError("config.report_to: mlflow with a gs:// workdir needs "
                         "MLFLOW_TRACKING_URI (a tracking server)")
      # A local file store needs no server or database (mlflow-skinny has no SQLAlchemy);
      # MLflow 3 asks for this opt-in to use one.
      os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
      mlflow.set_tracking_uri("file:" + os.path.join(os.path.abspath(workdir), "mlruns"))
    run_id = _read_id(workdir, "mlflow_run_id")
    if run_id:
      self._run = mlflow.start_run(run_id=run_id)
    else:
      mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "jaxalign"))
      self._run = mlflow.start_run(run_name=os.path.basename(workdir.rstrip("/")))
      # MLflow parameters are strings of at most 6000 characters.
      mlflow.log_params({k: str(v)[:6000] for k, v in _flat(config).items()})
      _write_id(workdir, "mlflow_run_id", self._run.info.run_id)

  def log(self, step: int, scalars: dict[str, float]) -> None:
    self._mlflow.log_metrics({tracker_name(k): float(v) for k, v in scalars.items()},
                             step=int(step))

  def summary(self, values: dict) -> None:
    self._mlflow.log_metrics({f"run/{k}": float(v) for k, v in _flat(values).items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)})

  def close(self) -> None:
    self._mlflow.end_run()


def open_trackers(names, workdir: str, *, resume_step: int | None, config: dict) -> list:
  """One tracker per name (jaxalign.config.TRACKERS), in order."""
  kinds = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
  return [kinds[n](workdir, resume_step=resume_step, config=config) for n in names]
