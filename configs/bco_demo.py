"""BCO on unpaired labels, with underlying-distribution matching, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method bco
      # SFT (reused if runs/demo/sft exists), bco data from the SFT model's own
      # answers, bco training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/bco_demo.py:runs/demo --workdir runs/bco
      # the bco stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["bco"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("bco", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
