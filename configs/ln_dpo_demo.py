"""LN-DPO: length-normalised DPO, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method ln_dpo
      # SFT (reused if runs/demo/sft exists), ln_dpo data from the SFT model's own
      # answers, ln_dpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/ln_dpo_demo.py:runs/demo --workdir runs/ln_dpo
      # the ln_dpo stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["ln_dpo"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("ln_dpo", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
