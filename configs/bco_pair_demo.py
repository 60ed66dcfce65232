"""Paired BCO with the running reward shift (TRL <= 0.28's bco_pair): chosen and rejected
classified apart, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method bco_pair
      # SFT (reused if runs/demo/sft exists), bco_pair data from the SFT model's own
      # answers, bco_pair training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/bco_pair_demo.py:runs/demo --workdir runs/bco_pair
      # the bco_pair stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("bco_pair", arg, seed, loss="bco_pair", hparams=dict(beta=0.1))
