"""SPPO with hard win probabilities (TRL loss_type sppo_hard), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method sppo_hard
      # SFT (reused if runs/demo/sft exists), sppo_hard data from the SFT model's own
      # answers, sppo_hard training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/sppo_hard_demo.py:runs/demo --workdir runs/sppo_hard
      # the sppo_hard stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("sppo_hard", arg, seed, loss="dpo",
                           hparams=dict(beta=0.1, variant="sppo_hard"))
