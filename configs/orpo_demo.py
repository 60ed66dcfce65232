"""ORPO (Hong et al. 2024): chosen NLL plus the odds-ratio term, reference-free,
on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method orpo
      # SFT (reused if runs/demo/sft exists), orpo data from the SFT model's own
      # answers, orpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/orpo_demo.py:runs/demo --workdir runs/orpo
      # the orpo stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  # Chosen NLL + lambda (beta) times the odds-ratio term, lambda 0.1 (paper, TRL);
  # reference-free.
  return demo.stage_config("orpo", arg, seed, loss="orpo", hparams=dict(beta=0.1))
