"""LD-DPO (Liu et al. 2024): the tail of the longer answer past the shorter one's length
weighted by alpha, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method ld_dpo
      # SFT (reused if runs/demo/sft exists), ld_dpo data from the SFT model's own
      # answers, ld_dpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/ld_dpo_demo.py:runs/demo --workdir runs/ld_dpo
      # the ld_dpo stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  c = demo.stage_config("ld_dpo", arg, seed, loss="dpo", hparams=dict(beta=0.1, ld_alpha=0.5))
  c.reference.mode = "frozen"   # needs the frozen reference (no precompute)
  return c
