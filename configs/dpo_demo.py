"""Sigmoid DPO (Rafailov et al. 2023), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method dpo
      # SFT (reused if runs/demo/sft exists), dpo data from the SFT model's own
      # answers, dpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/dpo_demo.py:runs/demo --workdir runs/dpo
      # the dpo stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["dpo"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("dpo", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
