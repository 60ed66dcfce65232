"""Online GRAO on the bundled arithmetic task: 8 completions per prompt sampled from the live policy at every step, scored by the task's checker against the reference answer.

  jaxalign demo --workdir runs/demo --method grao
      # SFT (reused if runs/demo/sft exists), online grao training, and held-out
      # greedy accuracy before and after.
  jaxalign train --config configs/grao_demo.py:runs/demo --workdir runs/grao
      # the grao stage alone, from the SFT model in runs/demo/sft; its prompts and
      # reference answers come from the bundled task (toy:sft, no annotator habit).

The recipe (loss hyperparameters, group size, reward, steps, learning rate) is
jaxalign.workflows.demo.METHODS["grao"]; the offline form (groups sampled once before
training) is METHODS["grao_offline"] (`jaxalign demo --method grao_offline`).
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("grao", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
