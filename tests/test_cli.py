"""The command line: usage errors exit 2 with one line naming the key, before any work."""

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from jaxalign import cli
from tests.reliability.helpers import HANG_S, logged_rows, wait_for
from tests.train.helpers import train_loop

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])

CONFIG = str(pathlib.Path(__file__).resolve().parent / "train" / "tiny_cli_config.py")


def _run(capsys, *args):
  status = cli.main(list(args))
  captured = capsys.readouterr()
  return status, captured.err.strip().splitlines()


@pytest.mark.parametrize("override, expected", [
    ("--config.optim.lrr=1e-5", "lrr"),                        # misspelt key
    ("--config.optim.lr=abc", "optim.lr"),                      # wrong type
    ("--config.mesh.shape=(3,-1,1)", "config.mesh.shape"),      # 3 does not divide 8
    ("--config.data.batch_size=12", "config.data.batch_size"),  # not a multiple of 8 shards
    ("--config.data.max_length=4096", "config.data.max_length"),  # over max_seq_len
    ("--config.loss.name=nope", "config.loss.name"),
    ("--config.reference.mode=sometimes", "config.reference.mode"),
    ("--config.model.attention=flash", "config.model.attention"),
    ("--config.model.scan_layers=sometimes", "config.model.scan_layers"),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, override,
                                                             expected):
  workdir = tmp_path / "run"
  status, err = _run(capsys, "train", f"--config={CONFIG}", f"--workdir={workdir}", override)
  assert status == 2
  assert len(err) == 1 and err[0].startswith("jaxalign train: error:"), err
  assert expected in err[0]
  assert not workdir.exists()


def test_unknown_loss_hyperparameter_is_named(tmp_path, capsys):
  cfg = tmp_path / "cfg.py"
  cfg.write_text("from tests.train.helpers import tiny_config\n"
                 "def get_config():\n"
                 "  c = tiny_config()\n"
                 "  c.loss.hparams.gamma = 1.0\n"
                 "  return c\n")
  status, err = _run(capsys, "train", f"--config={cfg}", f"--workdir={tmp_path / 'run'}")
  assert status == 2 and "config.loss.hparams.gamma" in err[0]


def test_missing_workdir_and_unknown_command(capsys):
  status, err = _run(capsys, "train", f"--config={CONFIG}")
  assert status == 2 and "--workdir" in err[0]
  status, err = _run(capsys, "fly")
  assert status == 2


def test_bad_data_row_names_file_row_and_field(tmp_path, capsys):
  data = tmp_path / "pairs.jsonl"
  data.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                  '{"prompt": "1+2=", "chosen": "3"}\n')
  status, err = _run(capsys, "train", f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}",
                     f"--config.data.train_path={data}")
  assert status == 1, err
  assert f"{data}:2: rejected: missing field" in err[0]


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "jaxalign.cli", "train", f"--config={CONFIG}",
         f"--workdir={workdir}", "--noprogress", "--config.total_steps=100000",
         "--config.checkpoint.every=100000", "--config.log_every=1"]
  proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": REPO_ROOT},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Driven by the run's progress (3 steps logged), however long a loaded machine takes.
  wait_for(lambda: logged_rows(workdir) >= 3, proc, "3 logged steps")
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=HANG_S)
  assert proc.returncode == 0, err
  assert "stopped by SIGTERM" in err
  steps = [int(s) for s in os.listdir(workdir / "checkpoints")]
  assert steps, err
  assert len(steps) == 1 and 3 <= steps[0] < 100000


def test_rules_that_reuse_a_mesh_axis_in_one_array_fail_before_compiling(tmp_path, capsys):
  cfg = tmp_path / "cfg.py"
  cfg.write_text("from tests.train.helpers import tiny_config\n"
                 "def get_config():\n"
                 "  c = tiny_config(**{'mesh.shape': (1, 4, 2)})\n"
                 "  c.sharding_rules = (('batch', ('data', 'fsdp')), ('embed', 'tensor'),\n"
                 "                      ('mlp', 'tensor'), ('heads', 'tensor'),\n"
                 "                      ('kv_heads', None), ('vocab', None),\n"
                 "                      ('head_dim', None), ('norm', None))\n"
                 "  return c\n")
  status, err = _run(capsys, "train", f"--config={cfg}", f"--workdir={tmp_path / 'run'}")
  assert status == 2 and "config.sharding_rules" in err[0], err


def test_a_logical_axis_without_a_rule_is_named(tmp_path, capsys):
  status, err = _run(capsys, "train", f"--config={CONFIG}", f"--workdir={tmp_path / 'run'}",
                     "--config.sharding_rules=(('batch', 'data'),)")
  assert status == 2 and "no rule for logical axis" in err[0], err


def test_plan_prints_memory_and_flops_for_cpu8(capsys):
  # Packed shared prompts, the data assumed given by flags (jaxalign.plan.PackAssumption).
  status = cli.main(["plan", f"--config={CONFIG}", "--devices=cpu:8",
                     "--config.data.packing=True", "--config.data.share_prompt=True",
                     "--pack_sequence_length=10", "--pack_prompt_length=4"])
  out = capsys.readouterr().out
  assert status == 0
  assert "memory per device" in out and "fits: True" in out and "FLOPs per step" in out
  assert "every sequence 10 real tokens of which a 4-token prompt shared" in out


def test_export_writes_a_transformers_loadable_model(tmp_path, capsys):
  from tests.train.helpers import tiny_config
  import transformers

  train_loop(tiny_config(total_steps=2), str(tmp_path / "run"), progress=False)
  assert cli.main(["export", f"--checkpoint={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}"]) == 0
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "hf", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
