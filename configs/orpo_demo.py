"""ORPO (Hong et al. 2024): chosen NLL plus the odds-ratio term, reference-free,
on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method orpo
      # SFT (reused if runs/demo/sft exists), orpo data from the SFT model's own
      # answers, orpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/orpo_demo.py:runs/demo --workdir runs/orpo
      # the orpo stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["orpo"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("orpo", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
