"""CPO (Xu et al. 2024): reference-free sigmoid plus the chosen NLL, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method cpo
      # SFT (reused if runs/demo/sft exists), cpo data from the SFT model's own
      # answers, cpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/cpo_demo.py:runs/demo --workdir runs/cpo
      # the cpo stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  # Reference-free sigmoid + the chosen NLL (cpo_alpha 1, TRL's default).
  return demo.stage_config("cpo", arg, seed, loss="cpo", hparams=dict(beta=0.1, cpo_alpha=1.0))
