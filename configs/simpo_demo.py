"""SimPO (Meng et al. 2024): reference-free, length-normalised, target margin gamma,
on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method simpo
      # SFT (reused if runs/demo/sft exists), simpo data from the SFT model's own
      # answers, simpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/simpo_demo.py:runs/demo --workdir runs/simpo
      # the simpo stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["simpo"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("simpo", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
