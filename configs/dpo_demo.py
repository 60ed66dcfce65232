"""Sigmoid DPO (Rafailov et al. 2023), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method dpo
      # SFT (reused if runs/demo/sft exists), dpo data from the SFT model's own
      # answers, dpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/dpo_demo.py:runs/demo --workdir runs/dpo
      # the dpo stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("dpo", arg, seed, loss="dpo", hparams=dict(beta=0.1))
