"""SFT (response NLL) on the bundled arithmetic task: the reference for DPO.

  jaxalign train --config configs/sft_toy.py --workdir runs/sft_toy
Expect the loss to fall from ~3.4 (uniform over the vocabulary) below 1.0.
"""

import ml_collections

from jaxalign import config as config_lib


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = config_lib.defaults()
  c.model.preset = arg
  c.data.tokenizer = "toy"
  c.data.train_path = "toy:sft?n=4000&seed=0"
  c.data.max_length = 16
  c.data.max_prompt_length = 10
  c.data.batch_size = 32
  c.loss.name = "sft"
  c.loss.hparams = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.total_steps = 300
  c.log_every = 25
  c.checkpoint.every = 100
  return c
