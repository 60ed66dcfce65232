"""APO-down (TRL loss_type apo_down: both answers' likelihood pushed down, the rejected
one's further), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method apo_down
      # SFT (reused if runs/demo/sft exists), apo_down data from the SFT model's own
      # answers, apo_down training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/apo_down_demo.py:runs/demo --workdir runs/apo_down
      # the apo_down stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("apo_down", arg, seed, loss="dpo",
                           hparams=dict(beta=0.1, variant="apo_down"))
