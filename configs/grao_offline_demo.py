"""GRAO on groups of 4 answers sampled once from the SFT model before training (offline), on the
bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method grao_offline
      # SFT (reused if runs/demo/sft exists), grao_offline data from the SFT model's own
      # answers, grao_offline training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/grao_offline_demo.py:runs/demo --workdir runs/grao_offline
      # the grao_offline stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("groups", group=4)


def get_config(arg: str = "runs/demo", seed: int = 0):
  c = demo.stage_config("grao_offline", arg, seed, loss="grao", hparams=dict(beta=0.5, lam=0.6))
  c.optim.lr = 3e-5
  return c
