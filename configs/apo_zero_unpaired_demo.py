"""APO-zero on unpaired labels (the pairs split and shuffled), on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method apo_zero_unpaired
      # SFT (reused if runs/demo/sft exists), apo_zero_unpaired data from the SFT
      # model's own answers, apo_zero_unpaired training, and held-out greedy
      # accuracy before and after.
  jaxalign train --config configs/apo_zero_unpaired_demo.py:runs/demo \
      --workdir runs/apo_zero_unpaired
      # the apo_zero_unpaired stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("unpaired", shuffle=True)


def get_config(arg: str = "runs/demo", seed: int = 0):
  # Shuffled as KTO's, so that a batch's KL sequences pair different prompts.
  return demo.stage_config("apo_zero_unpaired", arg, seed, loss="apo_zero_unpaired",
                           hparams=dict(beta=0.1))
