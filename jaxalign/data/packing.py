"""Packed batches: the sequences of a step's examples laid end to end in rows.

A padded batch holds ``tokens``/``attention_mask``/``loss_mask`` [B, S, T]:
every sequence padded to T. `pack_batch` turns it into rows of a fixed length
L >= T that hold several sequences each, so the forward computes (almost) only
real tokens. The step still sees exactly the same B examples, in the same
order: packing changes the layout of one batch, never which examples a step
holds, so the number of examples per optimizer step is the configured one and
a packed run sees the data of the padded run.

Layout. The B examples of a process's batch are split into ``num_groups``
contiguous groups of B_g = B / num_groups examples (one group per batch shard
and micro-batch, so a group's rows and its examples land on the same device
and in the same micro-batch). Each group's B_g * S sequences are packed
first-fit-decreasing into R rows of L tokens; R, the same for every group of
the step, is the smallest of a few fixed ``buckets`` (rows per group) that
holds the fullest group. The largest bucket is B_g * S (one sequence per row),
so every batch fits and no example is ever dropped or moved to another step.
Columns (G = num_groups):

  packed_tokens          int32 [G, R, L]  token ids, pad id after the last sequence
  packed_attention_mask  int32 [G, R, L]  1 on real tokens
  packed_loss_mask       int32 [G, R, L]  1 on scored tokens; a sequence's first
                                          token is never scored (as unpacked)
  packed_segment_ids     int32 [G, R, L]  0, 1, ... per sequence of the row;
                                          the padding tail its own id
  packed_positions       int32 [G, R, L]  0 at each sequence's first token
  packed_slot            int32 [G, R, L]  b_local * S + s of the token's sequence
                                          (b_local in [0, B_g)); B_g * S on padding
  packed_lengths         int32 [B, S]     real tokens per sequence (its shape
                                          gives B and S to the step)

Every other column ([B, ...]: labels, rewards, ref_logps, ...) is kept as is.
Attention inside a row stays within a segment (segment ids through every
kernel path) and positions restart at each sequence, so each sequence's
log-probs are those of its padded row; the step sums token log-probs per slot
and hands the loss the same [B, S] log-probs and counts as the padded layout.
An empty example slot (``valid`` False: the padded tail of a precompute pass)
places no tokens: its log-probs and counts are 0.

Packing is a pure function of the batch, so the run's data order and its
checkpointed iterator are those of the padded run: resume is bit-exact.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

SEQUENCE_COLUMNS = ("tokens", "attention_mask", "loss_mask")
PACKED_KEYS = ("packed_tokens", "packed_attention_mask", "packed_loss_mask",
               "packed_segment_ids", "packed_positions", "packed_slot", "packed_lengths")


def is_packed(batch) -> bool:
  return "packed_tokens" in batch


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """How one process's batches are packed.

  Attributes:
    num_groups: groups per process batch (batch shards on this process x
      gradient-accumulation micro-batches); divides the process batch.
    row_length: L, tokens per row (>= the padded length T).
    buckets: allowed rows per group, ascending; the last is B_g * S.
    pad_id: token id written on padding.
  """
  num_groups: int
  row_length: int
  buckets: tuple[int, ...]
  pad_id: int = 0

  def __post_init__(self):
    if self.num_groups < 1 or self.row_length < 1 or not self.buckets:
      raise ValueError(f"bad pack spec {self}")
    if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
      raise ValueError(f"buckets must be ascending positive ints, got {self.buckets}")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Bins (lists of item indices) packing `lengths` into bins of `capacity`.

  Items by decreasing length (ties by index, so the result is deterministic),
  each into the first bin with room. Items of length 0 are left out.
  """
  order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
  room: list[int] = []
  bins: list[list[int]] = []
  for i in order:
    n = int(lengths[i])
    if n > capacity:
      raise ValueError(f"a sequence of {n} tokens does not fit a row of {capacity}")
    for r, free in enumerate(room):
      if n <= free:
        room[r] -= n
        bins[r].append(i)
        break
    else:
      room.append(capacity - n)
      bins.append([i])
  return bins


def _group_bins(lengths: np.ndarray, num_groups: int, row_length: int) -> list[list[list[int]]]:
  """lengths [B, S] -> per group, its rows as lists of local flat slots b_local * S + s."""
  B, S = lengths.shape
  per = B // num_groups
  return [first_fit_decreasing(lengths[g * per:(g + 1) * per].reshape(-1).tolist(), row_length)
          for g in range(num_groups)]


def shared_units(lengths: np.ndarray, prompts: np.ndarray, row_length: int
                 ) -> list[tuple[int, list[int], int]]:
  """The units of packed shared prompts: (example, its sequences s, tokens) each.

  A unit is an example's prompt once, then its responses (prompt + response
  length minus the prompt each). An example whose prompt and responses exceed
  a row is split into several units, each with its own copy of the prompt
  (responses in order, greedily); every sequence fits a row on its own.
  Sequences with no response token (and empty slots) place nothing.

  Args:
    lengths: [B, S] prompt + response tokens per sequence (0: empty).
    prompts: [B] prompt tokens per example.
    row_length: L.
  """
  units = []
  for b in range(lengths.shape[0]):
    p = int(prompts[b])
    current, size = [], p
    for s in range(lengths.shape[1]):
      m = int(lengths[b, s]) - p
      if m <= 0:
        continue
      if current and size + m > row_length:
        units.append((b, current, size))
        current, size = [], p
      if p + m > row_length:
        raise ValueError(f"a sequence of {p + m} tokens does not fit a row of {row_length}")
      current.append(s)
      size += m
    if current:
      units.append((b, current, size))
  return units


def _group_unit_bins(lengths: np.ndarray, prompts: np.ndarray, num_groups: int,
                     row_length: int):
  """Per group: (its units, its rows as lists of unit indices)."""
  per = lengths.shape[0] // num_groups
  out = []
  for g in range(num_groups):
    units = shared_units(lengths[g * per:(g + 1) * per], prompts[g * per:(g + 1) * per],
                         row_length)
    out.append((units, first_fit_decreasing([u[2] for u in units], row_length)))
  return out


def rows_needed(lengths: np.ndarray, num_groups: int, row_length: int,
                prompts: np.ndarray | None = None) -> int:
  """Rows per group the fullest group of a batch with sequence lengths [B, S] needs
  (with `prompts` [B]: packed shared prompts, `shared_units`)."""
  if prompts is not None:
    return max(len(b) for _, b in _group_unit_bins(np.asarray(lengths), np.asarray(prompts),
                                                   num_groups, row_length))
  return max(len(b) for b in _group_bins(np.asarray(lengths), num_groups, row_length))


def sequence_lengths(batch: dict) -> np.ndarray:
  """[B, S] real tokens per sequence, from a padded or a packed batch."""
  if is_packed(batch):
    return np.asarray(batch["packed_lengths"])
  if "shared_lengths" in batch:
    return np.asarray(batch["shared_lengths"])
  return np.asarray(batch["attention_mask"]).sum(axis=-1)


def pack_batch(batch: dict, spec: PackSpec, *, valid: np.ndarray | None = None,
               agree: Callable[[int], int] | None = None) -> dict:
  """A padded host batch ([B, S, T] sequence columns) -> the packed layout above.

  Args:
    batch: numpy columns with leading dim B; tokens/attention_mask/loss_mask
      [B, S, T], right padded.
    spec: groups, row length and buckets.
    valid: [B] bool; False slots are left empty (default all True).
    agree: rows needed by this process -> rows needed by all processes (the
      max over processes, so every process picks the same bucket); None on
      one process.

  Returns:
    the packed columns plus every non-sequence column of `batch`.
  """
  tokens = np.asarray(batch["tokens"])
  attention = np.asarray(batch["attention_mask"]).astype(bool)
  loss = np.asarray(batch["loss_mask"]).astype(bool) & attention
  B, S, T = tokens.shape
  G, L = spec.num_groups, spec.row_length
  if B % G:
    raise ValueError(f"batch of {B} examples does not split into {G} pack groups")
  if T > L:
    raise ValueError(f"row length {L} is shorter than the padded length {T}")
  lengths = attention.sum(axis=-1).astype(np.int32)                  # [B, S]
  # Right padding: a sequence is its first `length` tokens.
  if np.any(attention & (np.arange(T) >= lengths[..., None])):
    raise ValueError("packing needs right-padded sequences (attention_mask 1...1 0...0)")
  if valid is not None:
    lengths = np.where(np.asarray(valid, bool)[:, None], lengths, 0)
  bins = _group_bins(lengths, G, L)
  need = max(len(b) for b in bins)
  if agree is not None:
    need = int(agree(need))
  per = B // G
  # Past the largest bucket (a batch with more sequences per example than the
  # buckets were fitted to, e.g. after online sampling): one row per sequence fits.
  rows = next((r for r in spec.buckets if r >= need), max(need, per * S))
  dump = per * S
  out_tok = np.full((G, rows, L), spec.pad_id, np.int32)
  out_att = np.zeros((G, rows, L), np.int32)
  out_loss = np.zeros((G, rows, L), np.int32)
  out_seg = np.zeros((G, rows, L), np.int32)
  out_pos = np.zeros((G, rows, L), np.int32)
  out_slot = np.full((G, rows, L), dump, np.int32)
  flat_tok = tokens.reshape(B * S, T)
  flat_loss = loss.reshape(B * S, T)
  flat_len = lengths.reshape(B * S)
  for g, group in enumerate(bins):
    for r, row in enumerate(group):
      at = 0
      for seg, local in enumerate(row):
        i = g * dump + local
        n = int(flat_len[i])
        out_tok[g, r, at:at + n] = flat_tok[i, :n]
        out_att[g, r, at:at + n] = 1
        out_loss[g, r, at:at + n] = flat_loss[i, :n]
        out_loss[g, r, at] = 0            # nothing predicts a sequence's first token
        out_seg[g, r, at:at + n] = seg
        out_pos[g, r, at:at + n] = np.arange(n)
        out_slot[g, r, at:at + n] = local
        at += n
      out_seg[g, r, at:] = len(row)
  out = {k: v for k, v in batch.items() if k not in SEQUENCE_COLUMNS}
  out.update(packed_tokens=out_tok, packed_attention_mask=out_att, packed_loss_mask=out_loss,
             packed_segment_ids=out_seg, packed_positions=out_pos, packed_slot=out_slot,
             packed_lengths=lengths)
  return out


# --- packed shared prompts (data.packing and data.share_prompt) -------------------------
# The packed columns above plus:
#   packed_part_ids     int32 [G, R, L]     0 on a unit's prompt (and padding), s + 1 on
#                                           its sequence s's response
#   packed_first_index  int32 [G, B_g * S]  r * L + t: the prompt's last token, which
#                                           predicts the slot's first response token
#   packed_first_token  int32 [G, B_g * S]  that first response token
#   packed_first_loss   int32 [G, B_g * S]  1 if it is scored (0 on empty slots)
# Segment ids number the units (an example's prompt once, then its responses) of a
# row; positions run 0..p-1 on the prompt and continue from p on every response;
# packed_slot is B_g * S on prompt tokens (they are nobody's scored tokens), and
# packed_loss_mask is 0 on each response's first token (scored from
# packed_first_*: in the row, the token before it is another response's).
PACKED_SHARED_KEYS = ("packed_part_ids", "packed_first_index", "packed_first_token",
                      "packed_first_loss")


def is_packed_shared(batch) -> bool:
  return "packed_part_ids" in batch


def pack_shared_batch(batch: dict, spec: PackSpec, *, valid: np.ndarray | None = None,
                      agree: Callable[[int], int] | None = None) -> dict:
  """A padded host batch -> packed rows of units: each example's prompt once, then
  its responses (the layout above; `shared_units`, `pack_batch`'s groups and
  buckets).

  Raises:
    ValueError: as share_prompt_batch (an example's sequences have different
      prompts, or one has none).
  """
  T = np.asarray(batch["tokens"]).shape[-1]
  shared = share_prompt_batch(batch, prompt_length=T, response_step=1, max_response=T,
                              valid=valid)
  lengths = shared["shared_lengths"]                                   # [B, S]
  prompts = shared["shared_prompt_mask"].sum(-1)                       # [B]
  B, S = lengths.shape
  G, L = spec.num_groups, spec.row_length
  if B % G:
    raise ValueError(f"batch of {B} examples does not split into {G} pack groups")
  if T > L:
    raise ValueError(f"row length {L} is shorter than the padded length {T}")
  groups = _group_unit_bins(lengths, prompts, G, L)
  need = max(len(b) for _, b in groups)
  if agree is not None:
    need = int(agree(need))
  per = B // G
  dump = per * S
  # Each unit holds at least one response: per * S rows always fit.
  rows = next((r for r in spec.buckets if r >= need), max(need, dump))
  out = {k: np.zeros((G, rows, L), np.int32) for k in (
      "packed_attention_mask", "packed_loss_mask", "packed_segment_ids", "packed_positions",
      "packed_part_ids")}
  out["packed_tokens"] = np.full((G, rows, L), spec.pad_id, np.int32)
  out["packed_slot"] = np.full((G, rows, L), dump, np.int32)
  first = {k: np.zeros((G, dump), np.int32) for k in (
      "packed_first_index", "packed_first_token", "packed_first_loss")}
  resp, resp_loss = shared["shared_response"], shared["shared_response_loss"]
  for g, (units, bins) in enumerate(groups):
    for r, row in enumerate(bins):
      at = 0
      for seg, u in enumerate(row):
        b_local, seqs, size = units[u]
        b = g * per + b_local
        p = int(prompts[b])
        span = slice(at, at + size)
        out["packed_segment_ids"][g, r, span] = seg
        out["packed_attention_mask"][g, r, span] = 1
        out["packed_tokens"][g, r, at:at + p] = shared["shared_prompt"][b, T - p:]
        out["packed_positions"][g, r, at:at + p] = np.arange(p)
        last = r * L + at + p - 1                                      # the prompt's last token
        at += p
        for s in seqs:
          m = int(lengths[b, s]) - p
          local = b_local * S + s
          out["packed_tokens"][g, r, at:at + m] = resp[b, s, :m]
          out["packed_loss_mask"][g, r, at + 1:at + m] = resp_loss[b, s, 1:m]
          out["packed_positions"][g, r, at:at + m] = p + np.arange(m)
          out["packed_part_ids"][g, r, at:at + m] = s + 1
          out["packed_slot"][g, r, at:at + m] = local
          first["packed_first_index"][g, local] = last
          first["packed_first_token"][g, local] = resp[b, s, 0]
          first["packed_first_loss"][g, local] = resp_loss[b, s, 0]
          at += m
      out["packed_segment_ids"][g, r, at:] = len(row)
  keep = {k: v for k, v in batch.items() if k not in SEQUENCE_COLUMNS}
  return {**keep, **out, **first, "packed_lengths": lengths.astype(np.int32)}


def example_prompt_lengths(examples: Sequence[dict]) -> np.ndarray:
  """[N] prompt tokens of each example: the real tokens before the first scored one
  of its first non-empty sequence (as share_prompt_batch reads them)."""
  out = np.zeros(len(examples), np.int64)
  for i, e in enumerate(examples):
    attention = np.asarray(e["attention_mask"]).astype(bool)
    loss = np.asarray(e["loss_mask"]).astype(bool) & attention
    for s in range(attention.shape[0]):
      if attention[s].any():
        out[i] = loss[s].argmax() if loss[s].any() else attention[s].sum()
        break
  return out


def plan_buckets(lengths: np.ndarray, *, batch_size: int, num_groups: int, row_length: int,
                 num_buckets: int, seed: int, global_groups: int | None = None,
                 samples: int = 64, prompts: np.ndarray | None = None) -> tuple[int, ...]:
  """A few bucket sizes (rows per group) fitted to the data's lengths.

  Simulates `samples` steps of `batch_size` examples drawn at random (seeded)
  from the dataset, each split into `global_groups` groups (all processes'),
  and takes the rows the fullest group of each step needs. The buckets are
  quantiles of that (evenly spaced from the median to the maximum seen) plus
  B_g * S, which always fits; a step beyond the simulated maximum uses that
  last bucket, correct but no faster than padding.

  Args:
    lengths: [N, S] real tokens of each sequence of every example.
    batch_size: examples per process batch.
    num_groups: pack groups per process batch.
    row_length: L.
    num_buckets: at most this many buckets (>= 1; 1 = B_g * S alone).
    seed: the draws' seed.
    global_groups: groups per global step (default num_groups).
    samples: simulated steps.
    prompts: [N] prompt tokens per example: rows of packed shared prompts.
  """
  lengths = np.asarray(lengths)
  N, S = lengths.shape
  per = batch_size // num_groups
  full = per * S
  if num_buckets <= 1 or N == 0:
    return (full,)
  global_groups = global_groups or num_groups
  rng = np.random.default_rng(seed)
  need = []
  for _ in range(samples):
    idx = rng.choice(N, size=per * global_groups, replace=N < per * global_groups)
    need.append(rows_needed(lengths[idx], global_groups, row_length,
                            None if prompts is None else np.asarray(prompts)[idx]))
  qs = np.linspace(0.5, 1.0, num_buckets - 1)
  picks = {int(np.ceil(np.quantile(need, q))) for q in qs}
  return tuple(sorted(p for p in picks if p < full)) + (full,)


def sequence_mask(batch: dict) -> np.ndarray:
  """[B, S, T'] real-token mask of each sequence (padded or packed batch), for counting."""
  if not is_packed(batch) and "shared_lengths" not in batch:
    return np.asarray(batch["attention_mask"])
  lengths = sequence_lengths(batch)
  return np.arange(max(int(lengths.max(initial=0)), 1)) < lengths[..., None]


def computed_tokens(batch: dict) -> tuple[int, int]:
  """(token positions the step computes, the real tokens among them) of a host batch in
  any layout. A shared prompt is one real token per position here, not one per
  response as `sequence_mask` counts it."""
  if is_packed(batch):
    return batch["packed_tokens"].size, int(np.asarray(batch["packed_attention_mask"]).sum())
  if is_shared(batch):
    computed = batch["shared_prompt"].size + batch["shared_response"].size
    return computed, int(np.asarray(batch["shared_prompt_mask"]).sum()
                         + np.asarray(batch["shared_response_mask"]).sum())
  return batch["tokens"].size, int(np.asarray(batch["attention_mask"]).sum())


def _agree_across_processes(need: int) -> int:
  """The max of `need` over all processes (one tiny host collective per step)."""
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(need))))


# At most this many examples' lengths fit a run's buckets (`length_sample`).
LENGTH_SAMPLE = 4096


def length_sample(examples: Sequence[dict], *, seed: int,
                  max_examples: int = LENGTH_SAMPLE) -> np.ndarray:
  """[n, S] real tokens per sequence of a seeded sample of `examples`, for `make_packer`.

  Every example in order when there are at most `max_examples`; else
  `max_examples` drawn without replacement (sorted positions) by a generator
  seeded with `seed` alone, so a restarted run (same data, same seed) fits the
  same buckets and resumes bit-exact. Only the sample is read: a lazy source
  tokenizes those rows alone, a prepared set decodes their stored arrays. A step
  whose batch needs more rows than the fitted buckets still packs, in the
  past-the-buckets row count (`pack_batch`).
  """
  return _lengths(sample_examples(examples, seed=seed, max_examples=max_examples))


def sample_examples(examples: Sequence[dict], *, seed: int,
                    max_examples: int = LENGTH_SAMPLE) -> list[dict]:
  """The examples `length_sample` reads (at most `max_examples`, seeded): a packed
  shared-prompt run fits its buckets to their lengths and prompt lengths
  (`example_prompt_lengths`)."""
  n = len(examples)
  if n <= max_examples:
    positions = np.arange(n)
  else:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7061636B]))  # "pack"
    positions = np.sort(rng.choice(n, size=max_examples, replace=False))
  return [examples[int(i)] for i in positions]


def _lengths(examples: Sequence[dict]) -> np.ndarray:
  return np.stack([np.asarray(e["attention_mask"]).sum(axis=-1)
                   for e in examples]).astype(np.int32)


def make_packer(lengths: np.ndarray, *, process_batch: int, num_groups: int,
                global_groups: int, row_length: int, num_buckets: int, seed: int,
                pad_id: int, process_count: int = 1, prompts: np.ndarray | None = None
                ) -> tuple[PackSpec, Callable[..., dict]]:
  """(spec, batch -> packed batch) for a run, its buckets fitted to `lengths`.

  Args:
    lengths: [n, S] real tokens of each sequence of the examples the buckets are
      fitted to (every example, or `length_sample` of them).
    process_batch: examples per process batch.
    num_groups: pack groups per process batch (divides process_batch).
    global_groups: pack groups of the whole step (all processes).
    row_length: L; at least the examples' T.
    num_buckets: at most this many row counts (compiles of the step).
    seed: seeds the bucket simulation (deterministic per run).
    pad_id: the tokenizer's pad id.
    process_count: > 1: the processes agree on each step's bucket.
    prompts: [n] prompt tokens of the same examples (`example_prompt_lengths`):
      pack units of one prompt and its responses (pack_shared_batch); None:
      every sequence on its own (pack_batch).
  """
  if process_batch % num_groups:
    raise ValueError(f"the process batch {process_batch} does not split into "
                     f"{num_groups} pack groups")
  lengths = np.asarray(lengths)
  if lengths.ndim != 2:
    raise ValueError(f"lengths must be [n, S], got shape {lengths.shape}")
  buckets = plan_buckets(lengths, batch_size=process_batch, num_groups=num_groups,
                         row_length=row_length, num_buckets=num_buckets, seed=seed,
                         global_groups=global_groups,
                         prompts=None if prompts is None else np.asarray(prompts))
  spec = PackSpec(num_groups=num_groups, row_length=row_length, buckets=buckets,
                  pad_id=pad_id)
  agree = _agree_across_processes if process_count > 1 else None

  layout = pack_batch if prompts is None else pack_shared_batch

  def pack(batch: dict, valid: np.ndarray | None = None) -> dict:
    return layout(batch, spec, valid=valid, agree=agree)

  return spec, pack


# --- shared prompt (data.share_prompt) ------------------------------------------------
SHARED_KEYS = ("shared_prompt", "shared_prompt_mask", "shared_response",
               "shared_response_mask", "shared_response_loss", "shared_lengths")


def is_shared(batch) -> bool:
  return "shared_prompt" in batch


def share_prompt_batch(batch: dict, *, prompt_length: int, response_step: int,
                       max_response: int, valid: np.ndarray | None = None) -> dict:
  """A padded batch -> its prompts once and its responses after them.

  Every sequence of an example is its prompt (the real tokens before the first
  scored one) then its response; the prompt must be the same for all of an
  example's non-empty sequences (not so for multi-turn message responses,
  whose earlier turns join each sequence's prompt).

  Columns:
    shared_prompt, shared_prompt_mask     int32 [B, P]     left-padded prompts
    shared_response, shared_response_mask int32 [B, S, R]  right-padded responses
    shared_response_loss                  int32 [B, S, R]  scored response tokens
    shared_lengths                        int32 [B, S]     prompt + response
                                                            tokens (0: empty)
  P = prompt_length; R = the batch's longest response rounded up to a multiple
  of `response_step` (at most `max_response`): a few shapes, one compile each.

  Raises:
    ValueError: an example's sequences have different prompts, or one has no
      prompt token (nothing would predict its first response token).
  """
  tokens = np.asarray(batch["tokens"])
  attention = np.asarray(batch["attention_mask"]).astype(bool)
  loss = np.asarray(batch["loss_mask"]).astype(bool) & attention
  B, S, T = tokens.shape
  lengths = attention.sum(-1)
  if valid is not None:
    lengths = np.where(np.asarray(valid, bool)[:, None], lengths, 0)
  # The prompt: real tokens before the first scored one.
  first = np.where(loss.any(-1), loss.argmax(-1), lengths)
  resp_len = np.where(lengths > 0, lengths - first, 0)
  longest = int(resp_len.max(initial=1))
  R = min(max_response, -(-max(longest, 1) // response_step) * response_step)
  P = prompt_length
  prompt = np.zeros((B, P), np.int32)
  prompt_mask = np.zeros((B, P), np.int32)
  resp = np.zeros((B, S, R), np.int32)
  resp_mask = np.zeros((B, S, R), np.int32)
  resp_loss = np.zeros((B, S, R), np.int32)
  for b in range(B):
    ids = None
    for s in range(S):
      n, f = int(lengths[b, s]), int(first[b, s])
      if n == 0:
        continue
      p = tokens[b, s, :f]
      if ids is None:
        ids = p
        if not 0 < f <= P:
          raise ValueError(f"example {b}: a prompt of {f} tokens cannot be shared "
                           f"(needs 1..{P})")
        prompt[b, P - f:], prompt_mask[b, P - f:] = p, 1
      elif len(p) != len(ids) or np.any(p != ids):
        raise ValueError(f"example {b}: sequence {s} has another prompt than sequence 0; "
                         "data.share_prompt needs one prompt per example")
      m = n - f
      resp[b, s, :m] = tokens[b, s, f:n]
      resp_mask[b, s, :m] = 1
      resp_loss[b, s, :m] = loss[b, s, f:n]
  out = {k: v for k, v in batch.items() if k not in SEQUENCE_COLUMNS}
  out.update(shared_prompt=prompt, shared_prompt_mask=prompt_mask, shared_response=resp,
             shared_response_mask=resp_mask, shared_response_loss=resp_loss,
             shared_lengths=lengths.astype(np.int32))
  return out


def make_sharer(*, prompt_length: int, max_length: int, response_buckets: int = 4
                ) -> Callable[..., dict]:
  """batch[, valid] -> shared-prompt batch, for a run of these lengths."""
  step = max(1, -(-(max_length - 1) // response_buckets))

  def share(batch: dict, valid: np.ndarray | None = None) -> dict:
    return share_prompt_batch(batch, prompt_length=prompt_length, response_step=step,
                              max_response=max_length - 1, valid=valid)

  return share
