"""AFT: constraint alignment over labelled candidates plus the reference chain of thought, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method aft
      # SFT (reused if runs/demo/sft exists), aft data from the SFT model's own
      # answers, aft training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/aft_demo.py:runs/demo --workdir runs/aft
      # the aft stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("ranked", group=4)


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("aft", arg, seed, loss="aft", hparams=dict())
