"""NCA, pairwise (TRL loss_type nca_pair), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method nca_pair
      # SFT (reused if runs/demo/sft exists), nca_pair data from the SFT model's own
      # answers, nca_pair training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/nca_pair_demo.py:runs/demo --workdir runs/nca_pair
      # the nca_pair stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["nca_pair"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("nca_pair", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
