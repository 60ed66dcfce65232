"""The reference a run's read path (`examples.open_examples`) is tested against.

`list_examples` reads a source as one list and validates and tokenizes it as a
list, record after record, with the package's list functions (the ones `jaxalign
prepare` uses): `reading.read_records` (whole-file readers, `sources.load_records`),
`formats.validate_records` (TRL's conventions over the list, unpairing included,
then `formats.validate_record` per record), the group-size rule, and
`tokenize.tokenize_records` (`tokenize.tokenize_example` per record, KTO's KL
sequences over the list). None of it goes through data/lazy.py's row views,
validation pass or on-read tokenization. It is what `data.lazy=False` read
before the list path left the package.

`reads` makes `loop.train` read its data through `list_examples`, for a run
compared with a lazy run of the same config, and records what each read returned.
"""

import contextlib

from jaxalign.data import examples as examples_lib
from jaxalign.data import formats, reading, tokenize


def list_examples(path, fmt, tokenizer, *, split, max_length, max_prompt_length, on_error,
                  group_size=None, map_record=None, kl_chunk_size=0):
  """(every example as a list, records skipped) of `path`; see the module docstring."""
  records = reading.read_records(path, split=split, on_error=on_error)
  if map_record is not None:
    records = [map_record(r) for r in records]
  valid, skipped = formats.validate_records(records, fmt, on_error=on_error)
  if group_size is None:
    valid, bad = reading.check_group_sizes(valid, fmt, on_error=on_error)
    skipped += bad
  cfg = tokenize.TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length,
                                group_size=group_size, kl_chunk_size=kl_chunk_size)
  examples, bad = tokenize.tokenize_records(valid, fmt, tokenizer, cfg, on_error=on_error)
  skipped += bad
  if not examples:
    raise formats.DataError(f"{path}: no usable records")
  return examples, skipped


@contextlib.contextmanager
def reads(monkeypatch, *, as_list: bool):
  """Within it, a run reads its data through `list_examples` (as_list) or through
  `examples.open_examples` as it is; yields the type of each read's examples, so a
  caller can check which path a run took."""
  real = examples_lib.open_examples
  read = []

  def recorded(path, fmt, tokenizer, *, key="config.data.train_path", **kw):
    if as_list:
      examples, skipped = list_examples(path, fmt, tokenizer, **kw)
    else:
      examples, skipped = real(path, fmt, tokenizer, key=key, **kw)
    read.append(type(examples))
    return examples, skipped
  with monkeypatch.context() as m:
    m.setattr(examples_lib, "open_examples", recorded)
    yield read
