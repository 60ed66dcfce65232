"""APO-zero, paired (TRL loss_type apo_zero), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method apo_zero
      # SFT (reused if runs/demo/sft exists), apo_zero data from the SFT model's own
      # answers, apo_zero training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/apo_zero_demo.py:runs/demo --workdir runs/apo_zero
      # the apo_zero stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["apo_zero"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("apo_zero", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
