"""OFS-DPO (fast and slow LoRA modules on the frozen SFT model) on the bundled task.

  jaxalign demo --workdir runs/demo --method ofs_dpo
      # SFT (reused if runs/demo/sft exists), pairs from the SFT model's own
      # answers, OFS-DPO, held-out greedy accuracy before and after (of the
      # fast module merged into the base).
  jaxalign train --config configs/ofs_dpo_demo.py:runs/demo --workdir runs/ofs_dpo
      # the OFS-DPO stage alone, on the SFT model and data that the demo wrote.

The recipe (loss hyperparameters, LoRA settings, steps, learning rate) is
jaxalign.workflows.demo.METHODS["ofs_dpo"]; the slow module's learning rate is
optim.slow_lr_ratio times the fast one's. Metrics per module: fast/..., slow/...,
loss/fs, role/fast_is_leader, lr/fast, lr/slow.
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("ofs_dpo", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
