"""`jaxalign prepare`: a run's training source tokenized once, as that run would read it."""

from __future__ import annotations

import os
from typing import Any

from jaxalign import config as config_lib
from jaxalign.data import prepared, reading
from jaxalign.errors import ConfigError


def prepare_from_config(spec: config_lib.RunSpec, out: str, *, shard_size: int = 10_000,
                        workers: int = 1) -> dict[str, Any]:
  """`jaxalign prepare`: data.train_path tokenized as the run of `spec` would.

  `spec`: the resolved run (config.resolve, as the CLI passes it).
  """
  if spec.online:
    raise ConfigError("config.online.enabled: online methods rewrite raw records "
                      "during the run; they train from the raw source")
  d = spec.data
  if prepared.is_prepared(d.train_path):
    raise ConfigError(f"config.data.train_path: {d.train_path} is already a "
                      "prepared dataset")
  incomplete = prepared.incomplete_reason(d.train_path)
  if incomplete:
    raise ConfigError(f"config.data.train_path: {d.train_path} is an incomplete prepared "
                      f"dataset ({incomplete}), not a source; give the raw source")
  if os.path.abspath(out) == os.path.abspath(d.train_path or "."):
    raise ConfigError("--out: must differ from config.data.train_path")
  name = spec.tokenizer_name
  tokenizer = reading.load_tokenizer(name)
  return prepared.prepare(d.train_path, out, spec.loss.data, tokenizer,
                          max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                          group_size=d.group_size, on_error=d.on_error, split=d.split,
                          shard_size=shard_size, workers=workers, tokenizer_name=name or "toy")
