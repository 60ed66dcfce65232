"""DiscoPOP (TRL loss_type discopop: a log-ratio-modulated mix of the logistic and exponential
losses, tau 0.05), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method discopop
      # SFT (reused if runs/demo/sft exists), discopop data from the SFT model's own
      # answers, discopop training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/discopop_demo.py:runs/demo --workdir runs/discopop
      # the discopop stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("discopop", arg, seed, loss="dpo",
                           hparams=dict(beta=0.1, variant="discopop", discopop_tau=0.05))
