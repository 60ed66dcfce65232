"""A loss from the top-level losses/ folder, named by file path on the command line:
trains, resumes, exports and generates; a reference-free one computes no reference,
and an edit of its file refuses the resume."""

import json
import os

from tests.reliability.helpers import REPO_ROOT, RECIPES, run_cli
from jaxalign import cli
from jaxalign.train import rundir

DPOP = "losses/dpo_positive.py:dpo_positive_loss"


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_prototype_trains_resumes_exports_and_generates_by_file_path(tmp_path, capsys,
                                                                    monkeypatch):
  run = tmp_path / "run"
  args = (f"--config={RECIPES}", f"--workdir={run}", "--noprogress",
          f"--config.loss.name={DPOP}", "--config.loss.hparams.lam=5.0",
          "--config.total_steps=4", "--config.checkpoint.every=2")
  monkeypatch.chdir(REPO_ROOT)          # the path is relative to the repository root
  status, err = run_cli(capsys, *args, "--stop_after_steps=2")
  assert status == 0, err
  saved = rundir.resolved_config(str(run))
  assert saved["loss"]["name"] == f"{REPO_ROOT}/{DPOP}"      # recorded absolute
  assert saved["loss"]["hparams"]["lam"] == 5.0
  assert (run / "ref_logps.npy").exists()                     # needs_ref=True: precomputed

  status, err = run_cli(capsys, *args)                        # resume to step 4
  assert status == 0, err
  rows = [r for r in _metrics(run) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4], rows
  assert all("dpop/penalty" in r for r in rows)               # the prototype's own metric

  # Export and generate read the saved config only: from any working directory.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  assert cli.main(["export", f"--checkpoint={run}", f"--out={tmp_path / 'hf'}"]) == 0
  assert (tmp_path / "hf" / "config.json").exists()
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("1+2=", "3+4=")))
  out = tmp_path / "gen.jsonl"
  assert cli.main(["generate", f"--checkpoint={run}", f"--prompts={prompts}", f"--out={out}",
                   "--max-new-tokens=3", "--temperature=0"]) == 0
  assert len(out.read_text().splitlines()) == 2


_REF_FREE = '''
import jax.numpy as jnp
from jaxalign.losses import register
from jaxalign.train import rundir

@register(data="pairwise", needs_ref=False)
def length_normed_margin(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *,
                         beta: float = 2.0, gamma: float = 0.5):
  z = beta * (chosen_logps / chosen_lengths - rejected_logps / rejected_lengths) - gamma
  return jnp.mean(jnp.logaddexp(0.0, -z)), {"rewards/margins": jnp.mean(z)}
'''


def test_a_reference_free_user_loss_computes_no_reference(tmp_path, capsys, monkeypatch):
  (tmp_path / "free.py").write_text(_REF_FREE)
  run = tmp_path / "run"
  monkeypatch.chdir(tmp_path)
  status, err = run_cli(capsys, f"--config={RECIPES}", f"--workdir={run}", "--noprogress",
                        "--config.loss.name=free.py:length_normed_margin",
                        "--config.loss.hparams.beta=2.0",
                        "--config.total_steps=2", "--config.reference.mode=precompute")
  # label_smoothing is the recipe's DPO setting: not a hyperparameter of this loss.
  assert status == 2 and "config.loss.hparams.label_smoothing: not a hyperparameter" in err[0]
  cfg = tmp_path / "recipe.py"
  cfg.write_text("import ml_collections\nfrom tests.reliability.recipes import get_config as g\n"
                 "def get_config():\n  c = g()\n"
                 "  c.loss.name = 'free.py:length_normed_margin'\n"
                 "  c.loss.hparams = ml_collections.ConfigDict(dict(beta=2.0))\n"
                 "  c.total_steps = 2\n  c.reference.mode = 'precompute'\n  return c\n")
  status, err = run_cli(capsys, f"--config={cfg}", f"--workdir={run}", "--noprogress")
  assert status == 0, err
  assert not list(run.rglob("ref_logps*")), list(run.rglob("*"))
  rows = [r for r in _metrics(run) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  saved = rundir.resolved_config(str(run))["loss"]["name"]
  assert saved == f"{tmp_path}/free.py:length_normed_margin"

  # An edited loss file is a changed objective: the resume is refused (issue 30 item 16).
  (tmp_path / "free.py").write_text(_REF_FREE.replace("- gamma", "- 2.0 * gamma"))
  status, err = run_cli(capsys, f"--config={cfg}", f"--workdir={run}", "--noprogress",
                        "--config.total_steps=3")
  assert status == 2 and len(err) == 1, err
  assert "the objective differs from the checkpoint's: loss.source_sha256 " in err[0], err[0]
  assert f"(the code of {tmp_path}/free.py changed)" in err[0], err[0]
  assert [r["step"] for r in _metrics(run) if "loss" in r] == [1, 2]
