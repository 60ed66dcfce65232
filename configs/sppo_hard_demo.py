"""SPPO with hard win probabilities (TRL loss_type sppo_hard), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method sppo_hard
      # SFT (reused if runs/demo/sft exists), sppo_hard data from the SFT model's own
      # answers, sppo_hard training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/sppo_hard_demo.py:runs/demo --workdir runs/sppo_hard
      # the sppo_hard stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["sppo_hard"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("sppo_hard", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
