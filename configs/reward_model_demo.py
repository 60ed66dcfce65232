"""A Bradley-Terry reward model on the bundled arithmetic task, its backbone from the demo's SFT model.

  jaxalign demo --workdir runs/demo --method grao_rm
      # SFT (reused if runs/demo/sft exists), this reward model in
      # runs/demo/reward_model, then online GRAO scored by it.
  jaxalign train --config configs/reward_model_demo.py:runs/demo --workdir runs/demo/reward_model
      # this stage alone, on runs/demo/data/reward_model.jsonl (pairs of the SFT
      # model's answers, written by the demo); held-out pair accuracy in rm_eval.json.

The model directory it writes (WORKDIR/reward_model) is what
`config.reward.name = "reward_model"` with `reward.options.path` loads. The
recipe is jaxalign.workflows.demo.REWARD_MODEL.
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.reward_model_config(data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
