"""DPO on the bundled arithmetic task, from scratch or from an SFT run.

  jaxalign train --config configs/sft_toy.py --workdir runs/sft_toy
  jaxalign train --config configs/dpo_toy.py --workdir runs/dpo_toy \
      --config.init_from=runs/sft_toy

Pairs are generated on the fly ("toy:pairwise?n=..."): right answer vs a
plausible mistake. Expect rewards/accuracies near 1.0 within ~100 steps on a
laptop CPU. `jaxalign demo` runs the full SFT -> DPO -> eval story.
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
