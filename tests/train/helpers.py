"""A tiny DPO/SFT config on the bundled task, shared by the system tests."""

import json
import os

import jax
import ml_collections
import numpy as np

from jaxalign import config as config_lib
from jaxalign.train import build as build_lib, init, loop


def compile_flags() -> str:
  """The suite's XLA compile flags (tests/conftest.py) without its device count, for
  subprocesses that set their own."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if not f.startswith("--xla_force_host_platform_device_count"))


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
  return config_lib.apply_overrides(c, overrides)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def random_batch(rng, b=8, s=2, t=12, vocab=32) -> dict:
  """A [b, s, t] batch of random tokens: the last 2 positions padding, the first 4 prompt."""
  tokens = rng.integers(4, vocab, size=(b, s, t)).astype(np.int32)
  attention = np.ones((b, s, t), np.int32)
  attention[:, :, -2:] = 0
  loss_mask = attention.copy()
  loss_mask[:, :, :4] = 0
  return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


def train_loop(config, workdir: str, *, devices=None, **kwargs):
  """loop.train of `config` resolved for `devices` (default all), as
  jaxalign.workflows.run.train resolves it: the loop itself takes a RunSpec only."""
  devices = jax.devices() if devices is None else list(devices)
  return loop.train(config_lib.resolve(config, len(devices)), workdir, devices=devices,
                    **kwargs)


def resolved(config) -> config_lib.RunSpec:
  """`config` resolved for all devices (config.resolve), as the CLI passes it down."""
  return config_lib.resolve(config, jax.device_count())


def built_state(config, devices=None):
  """(build.build_config of `config` on `devices` (default all), its step-0 state): the
  jitted steps and the state `jaxalign train` starts from, the state sharded."""
  built = build_lib.build_config(config, devices)
  with jax.set_mesh(built.mesh):
    state = init.initial_state(built.run_spec, built, fresh=True)
  return built, state
