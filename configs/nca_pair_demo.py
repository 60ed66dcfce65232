"""NCA, pairwise (TRL loss_type nca_pair), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method nca_pair
      # SFT (reused if runs/demo/sft exists), nca_pair data from the SFT model's own
      # answers, nca_pair training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/nca_pair_demo.py:runs/demo --workdir runs/nca_pair
      # the nca_pair stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("nca_pair", arg, seed, loss="dpo",
                           hparams=dict(beta=0.1, variant="nca_pair"))
