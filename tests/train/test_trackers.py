"""config.report_to: TensorBoard, W&B (offline) and MLflow (a file store) each get
the same metric names, the run's config and its end summary: a run through the CLI,
then each tracker's files read back."""

import glob
import json
import os
import struct

import pytest

from jaxalign import cli
from jaxalign import config as config_lib
from tests.train.helpers import read_metrics, tiny_config

CONFIG = os.path.join(os.path.dirname(__file__), "tiny_cli_config.py")


def _wandb_records(path):
  """The protobuf records of an offline run's .wandb file (a LevelDB-style log:
  a 7-byte file header, 32 KiB blocks of chunks with a 7-byte header each)."""
  from wandb.proto import wandb_internal_pb2
  data, pos, pending = open(path, "rb").read(), 7, b""
  while pos + 7 <= len(data):
    left = 32768 - pos % 32768
    _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if left < 7 or (length == 0 and kind == 0):   # the block's zero padding
      pos += left
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):   # a whole record, or the last chunk of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      yield record


def _key(item) -> str:
  return item.key or "/".join(item.nested_key)


def _tensorboard_scalars(directory):
  """{tag: [(step, value)]} of the TFRecord event files tensorboardX wrote."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_report_to_is_validated_naming_the_key(monkeypatch):
  cfg = tiny_config(report_to="tensorboard,comet")
  with pytest.raises(config_lib.ConfigError, match=r"config.report_to: unknown tracker 'comet'"):
    config_lib.validate(cfg, 1)
  assert config_lib.report_to(tiny_config(report_to="none")) == ()
  assert config_lib.report_to(tiny_config(report_to="WandB, mlflow")) == ("wandb", "mlflow")
  monkeypatch.setitem(config_lib.TRACKERS, "wandb", "no_such_module_here")
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.report_to: wandb is not installed: pip install "
                           r"'jaxalign\[wandb\]'"):
    config_lib.validate(tiny_config(report_to="wandb"), 1)


def test_every_tracker_gets_the_same_names_config_and_summary(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
  workdir = tmp_path / "run"
  assert cli.main(["train", f"--config={CONFIG}", f"--workdir={workdir}", "--no-progress",
                   "--config.total_steps=3", "--config.report_to=tensorboard,wandb,mlflow",
                   "--config.optim.lr=0.002"]) == 0
  capsys.readouterr()
  rows = read_metrics(workdir)
  losses = [(r["step"], r["loss"]) for r in rows]
  assert [s for s, _ in losses] == [1, 2, 3]

  tensorboard = _tensorboard_scalars(workdir / "tensorboard")
  assert [(s, pytest.approx(v)) for s, v in tensorboard["train/loss"]] == losses
  assert "train/rewards/accuracies" in tensorboard and "loss" not in tensorboard

  from mlflow.tracking import MlflowClient
  client = MlflowClient(tracking_uri=f"file:{workdir / 'mlruns'}")
  run = client.get_run((workdir / "mlflow_run_id").read_text().strip())
  history = client.get_metric_history(run.info.run_id, "train/loss")
  assert sorted((m.step, pytest.approx(m.value)) for m in history) == losses
  assert run.data.params["optim.lr"] == "0.002" and run.data.params["loss.name"] == "dpo"
  summary = json.loads((workdir / "run_summary.json").read_text())
  assert run.data.metrics["run/steps"] == summary["steps"] == 3
  assert run.data.metrics["run/train_loss_mean"] == pytest.approx(summary["train_loss_mean"])

  (path,) = glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))
  records = list(_wandb_records(path))
  history = [{_key(i): json.loads(i.value_json) for i in r.history.item}
             for r in records if r.WhichOneof("record_type") == "history"]
  assert [(h["_step"], pytest.approx(h["train/loss"])) for h in history] == losses
  config = {i.key: json.loads(i.value_json) for r in records
            if r.WhichOneof("record_type") == "run" for i in r.run.config.update}
  assert config["optim"]["lr"] == 0.002 and config["loss"]["name"] == "dpo"
  summaries = {_key(i): json.loads(i.value_json) for r in records
               if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
  assert summaries["run/steps"] == 3
