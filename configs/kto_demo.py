"""KTO on unpaired labels (the pairs split and shuffled), with in-batch KL pairs, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method kto
      # SFT (reused if runs/demo/sft exists), kto data from the SFT model's own
      # answers, kto training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/kto_demo.py:runs/demo --workdir runs/kto
      # the kto stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["kto"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("kto", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
