"""A tiny DPO/SFT config on the bundled task, shared by the system tests."""

import json
import os

import ml_collections

from jaxalign import config as config_lib


def tiny_config(loss: str = "dpo", **overrides) -> ml_collections.ConfigDict:
  c = config_lib.defaults()
  c.model.preset = "tiny"
  c.model.overrides = ml_collections.ConfigDict(dict(
      vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
      max_seq_len=16))
  c.data.tokenizer = "toy"
  c.data.max_length = 12
  c.data.max_prompt_length = 8
  c.data.batch_size = 8
  if loss == "sft":
    c.loss.name = "sft"
    c.loss.hparams = ml_collections.ConfigDict()
    c.data.train_path = "toy:sft?n=64&seed=0"
  else:
    c.loss.name = "dpo"
    c.data.train_path = "toy:pairwise?n=64&seed=0"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.total_steps = 5
  c.log_every = 1
  c.checkpoint.every = 5
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
