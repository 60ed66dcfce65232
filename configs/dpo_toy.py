"""DPO on the bundled arithmetic task, from scratch or from an SFT run.

  jaxalign train --config configs/sft_toy.py --workdir runs/sft_toy
  jaxalign train --config configs/dpo_toy.py --workdir runs/dpo_toy \
      --config.init_from=runs/sft_toy

Pairs are generated on the fly ("toy:pairwise?n=..."): right answer vs a
plausible mistake. This recipe shows the mechanics (data, reference pass, step,
checkpoints, metrics), not a useful model: from `sft_toy` with beta 0.05 the
logged rewards/accuracies (32 pairs a step) wander between 0.5 and 0.84 and end
at 0.78 at step 200, the loss goes from 0.68 to 0.63 (measured 2026-12-07, the two
commands above with --config.loss.hparams.beta=0.05). `jaxalign demo` runs the
full SFT -> DPO -> held-out accuracy story, on a larger model and more steps.
"""

import ml_collections

from jaxalign import config as config_lib


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = config_lib.defaults()
  c.model.preset = arg
  c.data.tokenizer = "toy"
  c.data.train_path = "toy:pairwise?n=4000&seed=0"
  c.data.max_length = 16
  c.data.max_prompt_length = 10
  c.data.batch_size = 32
  c.loss.name = "dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0))
  c.reference.mode = "precompute"
  c.optim.lr = 5e-4
  c.total_steps = 200
  c.log_every = 20
  c.checkpoint.every = 100
  return c
