"""EXO, pairwise (TRL loss_type exo_pair, label_smoothing 1e-3), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method exo_pair
      # SFT (reused if runs/demo/sft exists), exo_pair data from the SFT model's own
      # answers, exo_pair training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/exo_pair_demo.py:runs/demo --workdir runs/exo_pair
      # the exo_pair stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("exo_pair", arg, seed, loss="dpo",
                           hparams=dict(beta=0.1, variant="exo_pair", label_smoothing=1e-3))
