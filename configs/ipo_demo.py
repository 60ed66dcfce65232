"""IPO (Azar et al. 2023), per-token log-ratios as TRL, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method ipo
      # SFT (reused if runs/demo/sft exists), ipo data from the SFT model's own
      # answers, ipo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/ipo_demo.py:runs/demo --workdir runs/ipo
      # the ipo stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["ipo"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("ipo", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
