"""CPO (Xu et al. 2024): reference-free sigmoid plus the chosen NLL, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method cpo
      # SFT (reused if runs/demo/sft exists), cpo data from the SFT model's own
      # answers, cpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/cpo_demo.py:runs/demo --workdir runs/cpo
      # the cpo stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.workflows.demo.METHODS["cpo"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("cpo", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
