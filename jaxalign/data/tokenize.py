"""Validated records -> fixed-shape numpy examples with attention and loss masks.

Every example holds ``tokens``, ``attention_mask``, ``loss_mask``: int32 [S, T]
(T = ``max_length``), sequence s of the example in row s, plus per-format
columns. G below is ``cfg.group_size`` when set, else the record's own number of
group responses (then examples of different G do not stack into one batch).

  format     S      sequence index -> content        extra columns
  sft        1      0 completion                     -
  pairwise   2      0 chosen, 1 rejected             margin float32 [] (only if
                                                     the record has one)
  unpaired   1      0 completion                     label int32 [];
                                                     embedding float32 [E] (only
                                                     if the record has one)
  unpaired_kl 2     0 completion, 1 KL sequence:     label int32 []
                    its prompt + the completion of
                    the previous example of its chunk
  negatives  1 + G  0 the human negative (rejected), group_mask int32 [G]
                    1..G samples
  groups     1 + G  0 reference answer,              rewards float32 [G],
                    1..G completions                 group_mask int32 [G]
  ranked     1 + G  0 reference (an all-padding      has_reference int32 [],
                    sequence when absent),           labels int32 [G] (1 positive,
                    1..G completions                 0 negative) or ranks int32 [G]
                                                     (1 = best), group_mask int32 [G]

Group slot j (column j of ``group_mask``/``rewards``/``labels``/``ranks``) is
sequence 1 + j. ``group_mask`` is 1 on real slots; with ``group_size`` set, a
record with fewer responses is padded to G slots: a padding slot (and an absent
ranked reference) is tokens = pad id, attention_mask = loss_mask = 0, and its
per-slot columns are 0 (rewards 0.0, labels 0, ranks 0). More responses than
``group_size`` is a DataError naming the list field.

Sequence = prompt tokens + response tokens, right-padded. A text prompt is
tokenized the way the tokenizer itself does (``tokenizer(prompt)``, as TRL does):
it starts with a BOS only if the tokenizer adds one (its own leading special
tokens; trailing ones, such as an EOS some tokenizers append, are left to the
response); a message prompt is the chat template rendered with
``add_generation_prompt=True``. A response is ``tokens(text) + eos`` (for a
message response, the last assistant turn's content; earlier turns of a
multi-turn response are rendered into that sequence's prompt). Truncation keeps
the prompt's END (at most ``max_prompt_length`` tokens), then cuts the
response's END to fit ``max_length``. Only the kept end of a long text is encoded
(`kept_ids`), to the same ids, so one huge row costs memory for what is kept.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from jaxalign.data import formats, schema
from jaxalign.data.formats import DataError

Record = dict[str, Any]
Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
  """Fixed shapes for tokenized examples.

  Attributes:
    max_length: T, total tokens per sequence (prompt + response + padding).
    max_prompt_length: prompts longer than this keep their last tokens.
    add_eos: append ``eos_token_id`` to every response.
    group_size: pad the group formats (negatives, groups, ranked) to exactly
      this many group slots, marked by ``group_mask``; None keeps each record's
      own count (``group_mask`` all ones).
    kl_chunk_size: unpaired_kl: the KL sequences pair examples within chunks
      of this many consecutive examples (the per-process batch, kept together
      by ``pipeline.make_dataset(keep_blocks=True)``); 0: one chunk of all.
  """
  max_length: int
  max_prompt_length: int
  add_eos: bool = True
  group_size: int | None = None
  kl_chunk_size: int = 0

  def __post_init__(self):
    if not 0 < self.max_prompt_length < self.max_length:
      raise ValueError("need 0 < max_prompt_length < max_length, got "
                       f"{self.max_prompt_length} and {self.max_length}")
    if self.group_size is not None and (isinstance(self.group_size, bool)
                                        or int(self.group_size) != self.group_size
                                        or self.group_size < 1):
      raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")


def encode_text(tokenizer: Any, text: str) -> list[int]:
  """Token ids of ``text`` without added special tokens (thread-safe for fast tokenizers)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    return backend.encode(text, add_special_tokens=False).ids
  return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_own(tokenizer: Any, text: str) -> list[int]:
  """Token ids of ``text`` with the special tokens the tokenizer itself adds."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    return backend.encode(text, add_special_tokens=True).ids
  return list(tokenizer.encode(text, add_special_tokens=True))


# A long text is encoded from a window at the end it keeps: a window of
# _CHARS_PER_TOKEN characters per wanted token to start with, _MARGIN tokens beyond
# the wanted ones that must come out the same from three different cuts.
_CHARS_PER_TOKEN = 8
_MARGIN = 16


def kept_ids(encode: Callable[[str], list[int]], text: str, n: int, *,
             end: bool) -> list[int]:
  """``encode(text)[-n:]`` (``end``) or ``encode(text)[:n]``, encoding a window of
  ``text`` at that end instead of all of it, so memory follows ``n``, not ``len(text)``.

  The window of w characters is cut at three places (w, w + 1 and 2w + 1 characters
  from the kept end); the kept tokens plus _MARGIN more must come out the same from
  all three, else w grows fourfold, up to encoding the whole text. Three cuts that
  agree, one a character apart, mean the kept tokens no longer depend on where the
  text is cut: true of every tokenizer whose tokens are settled by a bounded stretch
  of text around them (pre-tokenized BPE and WordPiece, character-level,
  SentencePiece splitting on whitespace). A text whose kept tokens depend on its far
  end (one unbroken run that a BPE merges from its start) never agrees and is
  encoded whole, as it was before.

  Args:
    encode: text -> token ids.
    text: the text.
    n: tokens kept, > 0.
    end: keep the last ``n`` tokens (else the first ``n``).
  """
  k = n + _MARGIN
  w = _CHARS_PER_TOKEN * k + 64
  while 2 * w + 1 < len(text):
    cuts = [encode(text[-c:] if end else text[:c]) for c in (w, w + 1, 2 * w + 1)]
    kept = [ids[-k:] if end else ids[:k] for ids in cuts]
    if len(cuts[0]) > k and kept[0] == kept[1] == kept[2]:
      return kept[0][-n:] if end else kept[0][:n]
    w *= 4
  ids = encode(text)
  return ids[-n:] if end else ids[:n]


def text_prompt_ids(tokenizer: Any, text: str, keep_last: int | None = None) -> list[int]:
  """A text prompt's ids: the tokenizer's own leading special tokens (a BOS if it
  adds one, nothing if it does not), then the text's tokens; with ``keep_last``,
  only the last ``keep_last`` of them (encoding only the text's end, `kept_ids`)."""
  if keep_last is not None:
    return kept_ids(functools.partial(text_prompt_ids, tokenizer), text, keep_last,
                    end=True)
  plain = encode_text(tokenizer, text)
  own = _encode_own(tokenizer, text)
  for start in range(len(own) - len(plain) + 1):
    if own[start:start + len(plain)] == plain:
      return own[:start] + plain
  return own   # the specials changed the text's own tokens: the tokenizer's rendering


def _render_prompt(tokenizer: Any, messages: Sequence[dict],
                   keep_last: int | None = None) -> list[int]:
  text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                       add_generation_prompt=True)
  if keep_last is not None:
    return kept_ids(functools.partial(encode_text, tokenizer), text, keep_last, end=True)
  return encode_text(tokenizer, text)


def prompt_ids(tokenizer: Any, prompt: str | list, keep_last: int | None = None) -> list[int]:
  """A prompt's ids as training renders them (text: `text_prompt_ids`; messages:
  the chat template with the generation prompt); with ``keep_last``, exactly the
  last ``keep_last`` of those ids, encoding only the end of a long prompt."""
  if isinstance(prompt, str):
    return text_prompt_ids(tokenizer, prompt, keep_last)
  return _render_prompt(tokenizer, prompt, keep_last)


def _sequence_ids(tokenizer: Any, prompt: str | list, response: str | list,
                  prompt_ids: list[int], eos: list[int], P: int,
                  T: int) -> tuple[list[int], list[int]]:
  """(prompt ids, response ids) for one sequence, truncated (module docstring):
  ``prompt_ids`` are the shared prompt's last P ids, the response keeps its first
  T - len(prompt) ids (EOS included), each encoded only as far as it is kept."""
  if not isinstance(response, str):
    if len(response) > 1:  # Earlier turns join this sequence's (unscored) prompt.
      prompt_ids = _render_prompt(tokenizer, list(prompt) + list(response[:-1]), P)
    response = response[-1]["content"]
  room = T - len(prompt_ids)
  resp = kept_ids(functools.partial(encode_text, tokenizer), response, room, end=False)
  return prompt_ids, (resp + eos)[:room]


# Group formats: (head field, group list field); the head is sequence 0.
GROUP_FIELDS = {name: (f.fields[0], f.group_field) for name, f in schema.FORMATS.items()
                if f.grouped}


def _responses(record: Record, fmt: str) -> list[tuple[str, Any]]:
  """(field name, response or None for a padding sequence) per tokenized sequence, in
  the schema's order (a sequence built after tokenizing, KTO's KL one, is not here)."""
  f = schema.get(fmt)
  # An optional head (ranked's reference) absent from the record is a padding sequence.
  out = [(field, record[field] if field in formats.FORMATS[fmt] else record.get(field))
         for field in f.fields if field is not None]
  if f.grouped:
    out += [(f"{f.group_field}[{i}]", r) for i, r in enumerate(record[f.group_field])]
  return out


def _columns(record: Record, fmt: str, n_group: int, G: int) -> Example:
  """The format's per-example columns (schema.Format.columns) of one record."""
  out = {}

  def per_slot(values, dtype):
    col = np.zeros((G,), dtype)
    col[:n_group] = np.asarray(values, dtype)
    return col

  for column in schema.get(fmt).columns:
    if column.name == "group_mask":
      value = per_slot(np.ones(n_group), column.dtype)
    elif column.name == "has_reference":
      value = np.asarray(record.get("reference") is not None, column.dtype)
    elif column.field is None or (column.optional and column.field not in record):
      continue    # added by online sampling, or an optional field the record lacks
    elif schema.GROUP in column.shape:
      value = per_slot(record[column.field], column.dtype)
    else:
      value = np.asarray(record[column.field], column.dtype)
    out[column.name] = value
  return out


def tokenize_example(record: Record, fmt: str, tokenizer: Any,
                     cfg: TokenizeConfig) -> Example:
  """Tokenizes one validated record (see `formats.validate_record`).

  Args:
    record: a validated record of format ``fmt``.
    fmt: data format name.
    tokenizer: a transformers tokenizer (bos/eos/pad ids, chat template).
    cfg: shapes and truncation.

  Returns:
    ``tokens``, ``attention_mask``, ``loss_mask``: int32 [S, T] where T =
    cfg.max_length; attention_mask is 1 on real tokens (right padding);
    loss_mask is 1 on response tokens (incl. EOS), 0 on prompt and padding.
    Plus the format's extra columns (module docstring): ``label``/``embedding``
    (unpaired), ``group_mask`` (negatives, groups, ranked), ``rewards``
    (groups), ``has_reference`` and ``labels`` or ``ranks`` (ranked).

  Raises:
    DataError: ``"{file}:{row}: {field}: empty response after truncation ..."``,
      or ``"{file}:{row}: {list field}: N responses > group_size G"``.
  """
  T, P = cfg.max_length, cfg.max_prompt_length
  eos = []
  if cfg.add_eos:
    if tokenizer.eos_token_id is None:
      raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
    eos = [tokenizer.eos_token_id]
  pad = tokenizer.pad_token_id
  pad = (tokenizer.eos_token_id or 0) if pad is None else pad

  def where() -> str:
    return f"{record.get('source_file', '<memory>')}:{record.get('row', '?')}"

  responses = _responses(record, fmt)
  n_group = len(responses) - 1
  G = n_group
  if fmt in GROUP_FIELDS and cfg.group_size is not None:
    G = cfg.group_size
    if n_group > G:
      raise DataError(f"{where()}: {GROUP_FIELDS[fmt][1]}: {n_group} responses > "
                      f"group_size {G}")
    responses = responses + [("<padding>", None)] * (G - n_group)
  S = len(responses)
  tokens = np.full((S, T), pad, np.int32)
  attention_mask = np.zeros((S, T), np.int32)
  loss_mask = np.zeros((S, T), np.int32)
  shared_prompt = prompt_ids(tokenizer, record["prompt"], keep_last=P)  # the prompt's end
  for s, (field, response) in enumerate(responses):
    if response is None:  # padding sequence: all pad, both masks 0
      continue
    # The response's start, up to T - len(prompt) ids.
    prompt, resp = _sequence_ids(tokenizer, record["prompt"], response,
                                 shared_prompt, eos, P, T)
    if not resp:
      raise DataError(f"{where()}: {field}: empty response after truncation "
                      f"(prompt {len(prompt)} tokens, max_length {T})")
    n, m = len(prompt), len(resp)
    tokens[s, :n + m] = prompt + resp
    attention_mask[s, :n + m] = 1
    loss_mask[s, n:n + m] = 1
  out = {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask}
  out.update(_columns(record, fmt, n_group, G))
  return out


def make_tokenize_fn(fmt: str, tokenizer: Any, cfg: TokenizeConfig):
  """``record -> example`` closure, e.g. for `pipeline.make_dataset(transform=...)`."""
  return functools.partial(tokenize_example, fmt=fmt, tokenizer=tokenizer, cfg=cfg)


def tokenize_records(records: Iterable[Record], fmt: str, tokenizer: Any,
                     cfg: TokenizeConfig, *,
                     on_error: Literal["raise", "skip"] = "raise"
                     ) -> tuple[list[Example], int]:
  """Tokenizes all records up front, so truncation errors surface before training.

  Returns:
    (examples, number of records skipped because of a DataError).
  """
  examples, skipped = [], 0
  for record in records:
    try:
      examples.append(tokenize_example(record, fmt, tokenizer, cfg))
    except DataError as e:
      if on_error == "raise":
        raise
      skipped += 1
      formats.log.warning("skipping record: %s", e)
  if fmt == "unpaired_kl":
    pad = tokenizer.pad_token_id
    pad = (tokenizer.eos_token_id or 0) if pad is None else pad
    examples = add_kl_sequences(examples, cfg.kl_chunk_size or max(len(examples), 1),
                                pad_id=pad)
  return examples, skipped


def add_kl_sequences(examples: Sequence[Example], chunk_size: int, *,
                     pad_id: int) -> list[Example]:
  """Unpaired examples [1, T] -> [2, T]: sequence 1 is the example's KL sequence.

  In each chunk of ``chunk_size`` consecutive examples the completions rotate
  by one (TRL KTOTrainer: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})): example
  j's KL sequence is its own prompt tokens followed by the response tokens of
  example j-1 (the first takes the last's), cut at the end to T. Done on
  tokens, as TRL rotates token ids, after any skipped record is gone, so the
  chunks are exactly the pipeline's batches. The prompt keeps at most
  max_prompt_length < T tokens, so every KL sequence scores at least one token.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  out = []
  for start in range(0, len(examples), chunk_size):
    chunk = examples[start:start + chunk_size]
    for j, ex in enumerate(chunk):
      other = chunk[j - 1]
      tokens, attn, loss = ex["tokens"][0], ex["attention_mask"][0], ex["loss_mask"][0]
      T = tokens.shape[0]
      prompt = tokens[(attn == 1) & (loss == 0)]
      resp = other["tokens"][0][other["loss_mask"][0] == 1][:T - len(prompt)]
      n, m = len(prompt), len(resp)
      kl = np.full((T,), pad_id, np.int32)
      kl_attn, kl_loss = np.zeros((T,), np.int32), np.zeros((T,), np.int32)
      kl[:n], kl[n:n + m] = prompt, resp
      kl_attn[:n + m] = 1
      kl_loss[n:n + m] = 1
      out.append({**ex, "tokens": np.stack([tokens, kl]),
                  "attention_mask": np.stack([attn, kl_attn]),
                  "loss_mask": np.stack([loss, kl_loss])})
  return out


def bucket_lengths(lengths: Sequence[int] | np.ndarray,
                   buckets: Sequence[int]) -> np.ndarray:
  """Smallest bucket >= each length.

  Args:
    lengths: [N] sequence lengths.
    buckets: allowed padded lengths (any order).

  Returns:
    [N] int array of bucket sizes.

  Raises:
    ValueError: a length exceeds the largest bucket.
  """
  b = np.sort(np.asarray(buckets, np.int64))
  lengths = np.asarray(lengths, np.int64)
  idx = np.searchsorted(b, lengths, side="left")
  if lengths.size and idx.max() >= len(b):
    raise ValueError(f"length {int(lengths.max())} exceeds the largest bucket {int(b[-1])}")
  return b[idx]
