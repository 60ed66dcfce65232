"""D2O: one human negative and K self-generated samples, no positives, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method d2o
      # SFT (reused if runs/demo/sft exists), d2o data from the SFT model's own
      # answers, d2o training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/d2o_demo.py:runs/demo --workdir runs/d2o
      # the d2o stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("negatives", group=4)


def get_config(arg: str = "runs/demo", seed: int = 0):
  # The human negative plus 4 samples of the SFT model per prompt, no positives.
  return demo.stage_config("d2o", arg, seed, loss="d2o", hparams=dict(beta=0.1, alpha=0.1))
