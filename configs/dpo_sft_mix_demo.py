"""A weighted combination of DPO loss types (TRL 1.x, MPO-style): sigmoid DPO plus 0.5 times the
chosen NLL, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method dpo_sft_mix
      # SFT (reused if runs/demo/sft exists), dpo_sft_mix data from the SFT model's own
      # answers, dpo_sft_mix training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/dpo_sft_mix_demo.py:runs/demo --workdir runs/dpo_sft_mix
      # the dpo_sft_mix stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("dpo_sft_mix", arg, seed, loss="dpo",
                           hparams=dict(beta=0.1, variant=("sigmoid", "sft"),
                                        loss_weights=(1.0, 0.5)))
