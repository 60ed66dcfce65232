"""KTO on unpaired labels (the pairs split and shuffled), with in-batch KL pairs, on the bundled arithmetic task.

  jaxalign demo --workdir runs/demo --method kto
      # SFT (reused if runs/demo/sft exists), kto data from the SFT model's own
      # answers, kto training, and held-out greedy accuracy before and after.
  jaxalign train --config configs/kto_demo.py:runs/demo --workdir runs/kto
      # the kto stage alone, on the SFT model and data that the demo wrote.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("unpaired", shuffle=True)


def get_config(arg: str = "runs/demo", seed: int = 0):
  # The pairs split into desirable/undesirable examples, shuffled so that a
  # batch's KL sequences pair different prompts (tokenize.add_kl_sequences
  # rotates completions within each batch-sized block of the file).
  return demo.stage_config("kto", arg, seed, loss="kto", hparams=dict(beta=0.1))
