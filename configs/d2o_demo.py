"""D2O: one human negative and K self-generated samples, no positives, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method d2o
      # SFT (reused if runs/demo/sft exists), d2o data from the SFT model's own
      # answers, d2o training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/d2o_demo.py:runs/demo --workdir runs/d2o
      # the d2o stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["d2o"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("d2o", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
