"""AOT, paired (TRL loss_type aot: alignment via optimal transport over the batch's sorted log-
ratio margins), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method aot
      # SFT (reused if runs/demo/sft exists), aot data from the SFT model's own
      # answers, aot training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/aot_demo.py:runs/demo --workdir runs/aot
      # the aot stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("aot", arg, seed, loss="dpo", hparams=dict(beta=0.1, variant="aot"))
