"""Reading a dataset: the tokenizer, and the records of a source (files, `datasets`,
the bundled `toy:` task) as one list, which `jaxalign prepare` validates and
tokenizes into shards. A run's examples come from `examples.open_examples`.
"""

import logging
import os

import jax
import ml_collections

from jaxalign import fingerprint, paths
from jaxalign.data import formats, sources, tokenize, toy
from jaxalign.errors import ConfigError

log = logging.getLogger("jaxalign")


def load_tokenizer(name: str, workdir: str | None = None):
  """"toy" (the bundled task's tokenizer), a local directory or a hub name."""
  if name in ("", "toy"):
    tok = toy.build_tokenizer()
  else:
    from transformers import AutoTokenizer
    try:
      tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as e:
      raise ConfigError(
          f"config.data.tokenizer: cannot load {name!r}: {first_line(e)}") from None
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  if workdir is not None and jax.process_index() == 0:
    paths.save_pretrained(tok, paths.join(workdir, "tokenizer"))
  return tok


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_tokenizer(tokenizer, config: ml_collections.ConfigDict, vocab_size: int,
                    hf_dir: str = "") -> None:
  """Refuses a tokenizer that does not fit the model, before anything is compiled.

  With `model.hf_path` set, `data.tokenizer` must be that checkpoint's own tokenizer
  (the same vocabulary, specials, template and pipeline; compared by content, so
  another copy of it is fine) unless `data.allow_other_tokenizer` says the choice
  is deliberate; a checkpoint without a tokenizer has nothing to compare. Every
  special token's id must be inside the model's vocabulary.

  Raises:
    ConfigError: one line naming data.tokenizer (and model.hf_path).
  """
  name = config.data.tokenizer
  if (hf_dir and name and name != config.model.hf_path
      and os.path.abspath(name) != os.path.abspath(hf_dir)
      and not config.data.get("allow_other_tokenizer", False)
      and any(os.path.exists(os.path.join(hf_dir, f)) for f in _TOKENIZER_FILES)):
    own = load_tokenizer(hf_dir)
    if fingerprint.tokenizer_hash(own) != fingerprint.tokenizer_hash(tokenizer):
      raise ConfigError(
          f"config.data.tokenizer: {name!r} is not the tokenizer of config.model.hf_path="
          f"{config.model.hf_path!r} ({len(tokenizer)} vs {len(own)} tokens); clear "
          "data.tokenizer to use the checkpoint's own, or set "
          "config.data.allow_other_tokenizer=True if the choice is deliberate")
  if len(tokenizer) > vocab_size:
    raise ConfigError(
        f"config.model: the tokenizer has {len(tokenizer)} tokens but vocab_size is "
        f"{vocab_size}")
  specials = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.all_special_tokens}
  for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
    value = getattr(tokenizer, attr, None)
    if value is not None:
      specials.setdefault(attr[:-len("_token_id")], value)
  for tok, idx in sorted(specials.items()):
    if idx is not None and not 0 <= int(idx) < vocab_size:
      raise ConfigError(
          f"config.data.tokenizer: special token {tok!r} has id {idx}, outside the model's "
          f"vocabulary of {vocab_size} (config.model vocab_size)")


def read_records(path: str, *, split: str, on_error: str = "raise") -> list[dict]:
  """Records from a file, a `datasets` dataset, or the bundled task.

  "toy:FORMAT?n=N&seed=S[&k=K][&g=G][&ops=OPS]" generates N records of FORMAT ("sft",
  "pairwise", "unpaired", "negatives" with K samples, "groups" or "ranked" of G) from the
  bundled arithmetic task (train split), e.g. "toy:pairwise?n=2000"; OPS restricts the
  operators (default "+"), e.g. "ops=-" for subtraction problems only, "ops=+-" for both.
  """
  if not path:
    raise ConfigError("config.data.train_path: no training data given")
  if path.startswith("toy:"):
    from urllib.parse import parse_qs
    fmt, _, query = path[len("toy:"):].partition("?")
    # A literal "+" would read as a space in a query string.
    args = parse_qs(query.replace("+", "%2B"))
    ops = tuple(args.pop("ops", ["+"])[-1])
    try:
      args = {k: int(v[-1]) for k, v in args.items()}
      task = toy.ArithmeticTask(ops=ops)
    except ValueError as e:
      raise ConfigError(f"config.data.train_path: bad toy source {path!r}: "
                                   f"{first_line(e)}") from None
    n, seed = args.pop("n", 1000), args.pop("seed", 0)
    makers = {
        "sft": lambda: task.sft_records(n, seed=seed),
        "pairwise": lambda: task.pairwise_records(n, seed=seed),
        "unpaired": lambda: task.unpaired_records(n, seed=seed),
        "negatives": lambda: task.negative_records(n, args.pop("k", 4), seed=seed),
        "groups": lambda: task.group_records(n, args.pop("g", 4), seed=seed),
        "ranked": lambda: task.ranked_records(n, args.pop("g", 4), seed=seed),
    }
    if fmt not in makers:
      raise ConfigError(f"config.data.train_path: bad toy source {path!r}; formats: "
                                   f"{sorted(makers)}, e.g. toy:pairwise?n=2000&seed=0")
    records = makers[fmt]()
    if args:
      raise ConfigError(f"config.data.train_path: unknown toy parameters "
                                   f"{sorted(args)} in {path!r}")
    return [{**r, "source_file": path, "row": i + 1} for i, r in enumerate(records)]
  try:
    return sources.load_records(path, split=split, on_error=on_error)
  except FileNotFoundError as e:
    raise ConfigError(f"config.data.train_path: {first_line(e)}") from None


def toy_rows(path: str) -> list[dict]:
  """The raw records of a "toy:" source (the lazy path tokenizes them on demand).

  The generator draws its records from one sequential random stream, so row i is
  not computable without rows 0..i-1: the (small) raw records are generated in full
  and only their tokenization is lazy.
  """
  return read_records(path, split="train")


def first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def check_group_sizes(records: list[dict], fmt: str, *, on_error: str) -> tuple[list[dict], int]:
  """Without data.group_size every record of a group format needs the same number
  of responses, or its examples would not stack into one batch mid-run.

  The first record fixes the number; returns (records that match, number skipped).
  """
  if fmt not in tokenize.GROUP_FIELDS or not records:
    return records, 0
  field = tokenize.GROUP_FIELDS[fmt][1]
  want = len(records[0][field])
  kept, skipped = [], 0
  for r in records:
    if len(r[field]) == want:
      kept.append(r)
      continue
    error = formats.DataError(
        f"{r.get('source_file', '<memory>')}:{r.get('row', '?')}: {field}: {len(r[field])} "
        f"responses, earlier records have {want}; set config.data.group_size to pad groups")
    if on_error == "raise":
      raise error
    skipped += 1
    log.warning("skipping record: %s", error)
  return kept, skipped

