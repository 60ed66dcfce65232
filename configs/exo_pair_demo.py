"""EXO, pairwise (TRL loss_type exo_pair, label_smoothing 1e-3), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method exo_pair
      # SFT (reused if runs/demo/sft exists), exo_pair data from the SFT model's own
      # answers, exo_pair training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/exo_pair_demo.py:runs/demo --workdir runs/exo_pair
      # the exo_pair stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["exo_pair"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("exo_pair", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
