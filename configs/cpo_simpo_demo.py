"""CPO with its SimPO loss type: length-normalised, target margin gamma, plus the chosen NLL, on
the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method cpo_simpo
      # SFT (reused if runs/demo/sft exists), cpo_simpo data from the SFT model's own
      # answers, cpo_simpo training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/cpo_simpo_demo.py:runs/demo --workdir runs/cpo_simpo
      # the cpo_simpo stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("pairwise")


def get_config(arg: str = "runs/demo", seed: int = 0):
  return demo.stage_config("cpo_simpo", arg, seed, loss="cpo",
                           hparams=dict(beta=2.0, loss_type="simpo", simpo_gamma=0.5,
                                        cpo_alpha=1.0))
