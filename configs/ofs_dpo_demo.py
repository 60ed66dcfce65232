"""OFS-DPO (fast and slow LoRA modules on the frozen SFT model) on the bundled task.

  jaxalign demo --workdir runs/demo --method ofs_dpo
      # SFT (reused if runs/demo/sft exists), pairs from the SFT model's own
      # answers, OFS-DPO, held-out greedy accuracy before and after (of the
      # fast module merged into the base).
  jaxalign train --config configs/ofs_dpo_demo.py:runs/demo --workdir runs/ofs_dpo
      # the OFS-DPO stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model. The
slow module's learning rate is optim.slow_lr_ratio times the fast one's. Metrics
per module: fast/..., slow/..., loss/fs, role/fast_is_leader, lr/fast, lr/slow.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  # Two LoRA modules (fast, slow) on the frozen SFT model; see
  # jaxalign/workflows/demo_continual.py for the two-domain forgetting
  # comparison with COFS-DPO.
  c = demo.stage_config("ofs_dpo", arg, seed, loss="ofs_dpo",
                        hparams=dict(beta=0.1, alpha=0.1, swap_interval=10))
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
  return c
