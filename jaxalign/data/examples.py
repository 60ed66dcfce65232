"""A run's examples from any source: the one read path of training and evaluation.

`open_examples` returns a random-access sequence of tokenized examples, never a
list of every one: a directory written by `jaxalign prepare` is opened as its
shards (data/prepared.py: tokenized once, decoded on read); any other source
(files, `datasets`, the bundled `toy:` task) is read lazily (data/lazy.py: one
streaming validation pass before anything is compiled, rows tokenized on
demand inside the Grain pipeline, an online method's record rewrite applied per
row, unpaired formats in TRL's unpairing order).

Both give a `content_hash` of the source and split, so a run's data fingerprint
(fingerprint.compute) is the same from a source and from its prepared set.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from jaxalign.data import lazy, prepared, reading
from jaxalign.errors import ConfigError

log = logging.getLogger("jaxalign")


def open_examples(path: str, fmt: str, tokenizer: Any, *, split: str, max_length: int,
                  max_prompt_length: int, on_error: str, group_size: int | None = None,
                  map_record: Callable[[dict], dict] | None = None, kl_chunk_size: int = 0,
                  key: str = "config.data.train_path") -> tuple[Sequence[dict], int]:
  """(examples, records skipped) of `path` in format `fmt`, tokenized as the run's config says.

  Args:
    map_record: record -> record of `fmt` (an online method's rewrite), applied to
      each raw row as it is read; raw sources only.
    kl_chunk_size: unpaired_kl (KTO) pairs its KL sequences within chunks of this
      many examples, the per-process batch; 0: one chunk of all.
    key: the config key `path` came from, named in a refusal of a prepared set.

  Raises:
    ConfigError: no path, a path that does not exist, or a prepared set that
      cannot serve this run (other tokenizer or settings, an online method's
      rewrite, unpaired_kl data), or the shards of an unfinished `jaxalign prepare`
      (no manifest yet), one line naming the key.
    DataError: a malformed row (on_error="raise") naming its file, row and field;
      no usable rows; an absent, truncated or corrupted shard of a prepared set.
  """
  if prepared.is_prepared(path):
    if map_record is not None:
      raise ConfigError(f"{key}: {path} is a prepared (tokenized) dataset; online "
                        "methods rewrite raw records first: give the raw source")
    if fmt == "unpaired_kl":
      raise ConfigError(f"{key}: {path} is a prepared dataset; unpaired_kl data "
                        "(KTO) pairs its KL sequences within the run's batches: give "
                        "the raw source")
    return prepared.open_prepared(path, fmt, tokenizer, max_length=max_length,
                                  max_prompt_length=max_prompt_length, group_size=group_size,
                                  on_error=on_error, split=split, key=key)
  incomplete = prepared.incomplete_reason(path)
  if incomplete:
    raise ConfigError(
        f"{key}: {path} is an incomplete prepared dataset ({incomplete}): jaxalign prepare "
        f"was interrupted or is still running; finish it by re-running the same "
        f"jaxalign prepare --config ... --out {path} (complete shards are kept)")
  if not path:
    reading.read_records(path, split=split)   # raises its ConfigError
  try:
    return lazy.open_source(path, fmt, tokenizer, split=split, max_length=max_length,
                            max_prompt_length=max_prompt_length, on_error=on_error,
                            group_size=group_size, log=log, map_record=map_record,
                            kl_chunk_size=kl_chunk_size)
  except FileNotFoundError as e:
    raise ConfigError(f"config.data.train_path: {reading.first_line(e)}") from None
