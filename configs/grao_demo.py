"""GRAO (offline groups): sampled completions with exact-match rewards plus the reference answer, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method grao
      # SFT (reused if runs/demo/sft exists), grao data from the SFT model's own
      # answers, grao training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/grao_demo.py:runs/demo --workdir runs/grao
      # the grao stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, steps, learning rate) is jaxalign.demo.METHODS["grao"].
"""

from jaxalign import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("grao", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
