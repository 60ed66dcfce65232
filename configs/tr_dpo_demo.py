"""TR-DPO (Gorbatovski et al. 2024): the reference moves toward the policy during training, on
the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method tr_dpo
      # SFT (reused if runs/demo/sft exists), tr_dpo data from the SFT model's own
      # answers, tr_dpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/tr_dpo_demo.py:runs/demo --workdir runs/tr_dpo
      # the tr_dpo stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  c = demo.stage_config("tr_dpo", arg, seed, loss="dpo", hparams=dict(beta=0.1))
  # Every 16 updates the reference moves toward the policy with mixing 0.6
  # (soft update); a moving reference cannot be precomputed.
  c.reference.mode = "frozen"
  c.reference.sync_steps = 16
  c.reference.sync_alpha = 0.6
  return c
