"""SimPO (Meng et al. 2024): reference-free, length-normalised, target margin gamma,
on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method simpo
      # SFT (reused if runs/demo/sft exists), simpo data from the SFT model's own
      # answers, simpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/simpo_demo.py:runs/demo --workdir runs/simpo
      # the simpo stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  # Per-token mean log-probs, beta 2.0 and gamma 0.5 as the paper's and TRL's;
  # reference-free (no reference forward, no ref_logps.npy).
  return demo.stage_config("simpo", arg, seed, loss="simpo", hparams=dict(beta=2.0, gamma=0.5))
