"""BCO on unpaired labels, with underlying-distribution matching, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method bco
      # SFT (reused if runs/demo/sft exists), bco data from the SFT model's own
      # answers, bco training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/bco_demo.py:runs/demo --workdir runs/bco
      # the bco stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("unpaired")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("bco", arg, seed, loss="bco",
                           hparams=dict(beta=0.1),
                           options=dict(udm="model", prompt_sample_size=1024))
