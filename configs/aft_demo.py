"""AFT: constraint alignment over labelled candidates plus the reference chain of thought, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method aft
      # SFT (reused if runs/demo/sft exists), aft data from the SFT model's own
      # answers, aft training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/aft_demo.py:runs/demo --workdir runs/aft
      # the aft stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["aft"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("aft", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
