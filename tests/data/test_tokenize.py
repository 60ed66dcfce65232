"""Tests for tokenization: exact masks, truncation policy, chat template path."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxalign.data import toy
from jaxalign.data.formats import DataError, validate_record, validate_records
from jaxalign.data.tokenize import (TokenizeConfig, bucket_lengths, tokenize_example,
                                    tokenize_records)

# Toy ids: <pad>0 <bos>1 <eos>2 <|user|>5 <|assistant|>6 <|end|>7, digit d -> 8+d,
# '+' 18, '=' 21.
BOS, EOS, USER, ASSISTANT, END, PLUS, EQ = 1, 2, 5, 6, 7, 18, 21


def d(x):
  return 8 + x


@pytest.fixture(scope="module")
def tok():
  return toy.build_tokenizer()


def test_sft_masks_exact(tok):
  ex = tokenize_example({"prompt": "1+2=", "completion": "3"}, "sft", tok, TokenizeConfig(8, 6))
  np.testing.assert_array_equal(ex["tokens"], [[BOS, d(1), PLUS, d(2), EQ, d(3), EOS, 0]])
  np.testing.assert_array_equal(ex["attention_mask"], [[1, 1, 1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(ex["loss_mask"], [[0, 0, 0, 0, 0, 1, 1, 0]])
  assert all(v.dtype == np.int32 and v.shape == (1, 8) for v in ex.values())


def test_pairwise_shares_prompt(tok):
  ex = tokenize_example({"prompt": "1+2=", "chosen": "3", "rejected": "12"}, "pairwise",
                        tok, TokenizeConfig(8, 6))
  assert ex["tokens"].shape == (2, 8)
  np.testing.assert_array_equal(ex["tokens"][:, :5], [[BOS, d(1), PLUS, d(2), EQ]] * 2)
  np.testing.assert_array_equal(ex["tokens"][1], [BOS, d(1), PLUS, d(2), EQ, d(1), d(2), EOS])
  np.testing.assert_array_equal(ex["loss_mask"], [[0] * 5 + [1, 1, 0], [0] * 5 + [1, 1, 1]])


def test_truncation_keeps_prompt_end_cuts_response_end(tok):
  ex = tokenize_example({"prompt": "12+34=", "completion": "5678"}, "sft", tok,
                        TokenizeConfig(max_length=7, max_prompt_length=4))
  np.testing.assert_array_equal(ex["tokens"], [[PLUS, d(3), d(4), EQ, d(5), d(6), d(7)]])
  np.testing.assert_array_equal(ex["loss_mask"], [[0, 0, 0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(ex["attention_mask"], [[1] * 7])


def test_empty_response_raises_with_location(tok):
  rec = {"prompt": "1+2=", "completion": "", "source_file": "x.jsonl", "row": 4}
  with pytest.raises(DataError, match=r"^x\.jsonl:4: completion: empty response"):
    tokenize_example(rec, "sft", tok, TokenizeConfig(8, 4, add_eos=False))
  examples, skipped = tokenize_records([rec, {"prompt": "1=", "completion": "1"}], "sft",
                                       tok, TokenizeConfig(8, 4, add_eos=False), on_error="skip")
  assert len(examples) == 1 and skipped == 1
  with pytest.raises(ValueError):
    TokenizeConfig(max_length=4, max_prompt_length=4)


def test_chat_template_path(tok):
  task = toy.ArithmeticTask()
  rec = validate_record({"prompt": [{"role": "user", "content": "1+2="}],
                         "chosen": [{"role": "assistant", "content": "3"}],
                         "rejected": "4"}, "pairwise")
  ex = tokenize_example(rec, "pairwise", tok, TokenizeConfig(12, 10))
  prompt = [BOS, USER, d(1), PLUS, d(2), EQ, END, ASSISTANT]
  np.testing.assert_array_equal(ex["tokens"][0], prompt + [d(3), EOS, 0, 0])
  np.testing.assert_array_equal(ex["tokens"][1], prompt + [d(4), EOS, 0, 0])
  np.testing.assert_array_equal(ex["loss_mask"][0], [0] * 8 + [1, 1, 0, 0])
  # Multi-turn response: earlier turns become (unscored) prompt.
  rec = validate_record({"prompt": [{"role": "user", "content": "1+2="}],
                         "completion": [{"role": "assistant", "content": "3"},
                                        {"role": "user", "content": "1"},
                                        {"role": "assistant", "content": "2"}]}, "sft")
  ex = tokenize_example(rec, "sft", tok, TokenizeConfig(20, 16))
  assert ex["loss_mask"].sum() == 2 and ex["tokens"][0, ex["loss_mask"][0] == 1].tolist() == [d(2), EOS]
  assert task.sft_records(1, chat=True)  # chat records feed the same path


def test_groups_and_unpaired_extras(tok):
  task = toy.ArithmeticTask()
  rec = task.group_records(1, g=3)[0]
  ex = tokenize_example(validate_record(rec, "groups"), "groups", tok, TokenizeConfig(12, 8))
  assert ex["tokens"].shape == (4, 12) and ex["rewards"].shape == (3,)
  rec = task.unpaired_records(1)[0]
  ex = tokenize_example(validate_record(rec, "unpaired"), "unpaired", tok, TokenizeConfig(12, 8))
  assert ex["label"] == int(rec["label"]) and ex["tokens"].shape == (1, 12)


def test_bucket_lengths():
  np.testing.assert_array_equal(bucket_lengths([1, 16, 17, 64], [64, 16, 32]), [16, 16, 32, 64])
  with pytest.raises(ValueError):
    bucket_lengths([65], [16, 64])


def _seq(*ids, T=8):
  return list(ids) + [0] * (T - len(ids))


PROMPT = [BOS, d(1), PLUS, d(2), EQ]  # "1+2="
PAD_ROW = [0] * 8


def test_negatives_layout_and_padding(tok):
  rec = {"prompt": "1+2=", "rejected": "4", "samples": ["3", "5"]}
  ex = tokenize_example(rec, "negatives", tok, TokenizeConfig(8, 6))
  np.testing.assert_array_equal(ex["tokens"], [_seq(*PROMPT, d(4), EOS), _seq(*PROMPT, d(3), EOS),
                                               _seq(*PROMPT, d(5), EOS)])
  np.testing.assert_array_equal(ex["group_mask"], [1, 1])
  ex = tokenize_example(rec, "negatives", tok, TokenizeConfig(8, 6, group_size=4))
  assert ex["tokens"].shape == (5, 8) and ex["group_mask"].dtype == np.int32
  np.testing.assert_array_equal(ex["group_mask"], [1, 1, 0, 0])
  np.testing.assert_array_equal(ex["tokens"][3:], [PAD_ROW] * 2)
  np.testing.assert_array_equal(ex["attention_mask"][3:], [PAD_ROW] * 2)
  np.testing.assert_array_equal(ex["loss_mask"][3:], [PAD_ROW] * 2)
  np.testing.assert_array_equal(ex["loss_mask"][2], [0] * 5 + [1, 1, 0])
  assert set(ex) == {"tokens", "attention_mask", "loss_mask", "group_mask"}


def test_groups_padding_columns(tok):
  rec = {"prompt": "1+2=", "reference": "3", "completions": ["3", "7"], "rewards": [1.0, -0.5]}
  ex = tokenize_example(rec, "groups", tok, TokenizeConfig(8, 6, group_size=3))
  np.testing.assert_array_equal(ex["tokens"], [_seq(*PROMPT, d(3), EOS), _seq(*PROMPT, d(3), EOS),
                                               _seq(*PROMPT, d(7), EOS), PAD_ROW])
  np.testing.assert_array_equal(ex["rewards"], np.array([1.0, -0.5, 0.0], np.float32))
  np.testing.assert_array_equal(ex["group_mask"], [1, 1, 0])
  assert ex["rewards"].dtype == np.float32
  ex = tokenize_example(rec, "groups", tok, TokenizeConfig(8, 6))  # group_size None
  np.testing.assert_array_equal(ex["group_mask"], [1, 1])
  assert ex["tokens"].shape == (3, 8) and ex["rewards"].shape == (2,)


def test_ranked_layout_exact(tok):
  rec = validate_record({"prompt": "1+2=", "completions": ["3", "4"], "labels": [True, False],
                         "reference": "3"}, "ranked")
  ex = tokenize_example(rec, "ranked", tok, TokenizeConfig(8, 6, group_size=3))
  np.testing.assert_array_equal(ex["tokens"], [_seq(*PROMPT, d(3), EOS), _seq(*PROMPT, d(3), EOS),
                                               _seq(*PROMPT, d(4), EOS), PAD_ROW])
  np.testing.assert_array_equal(ex["loss_mask"], [[0] * 5 + [1, 1, 0]] * 3 + [PAD_ROW])
  np.testing.assert_array_equal(ex["attention_mask"], [[1] * 7 + [0]] * 3 + [PAD_ROW])
  np.testing.assert_array_equal(ex["labels"], [1, 0, 0])
  np.testing.assert_array_equal(ex["group_mask"], [1, 1, 0])
  assert ex["has_reference"].shape == () and ex["has_reference"] == 1
  assert "ranks" not in ex
  assert all(v.dtype == np.int32 for v in ex.values())
  # No reference: slot 0 is all padding; ranks instead of labels.
  rec = validate_record({"prompt": "1+2=", "completions": ["3", "4", "13"], "ranks": [1, 2, 2]},
                        "ranked")
  ex = tokenize_example(rec, "ranked", tok, TokenizeConfig(8, 6))
  np.testing.assert_array_equal(ex["tokens"][0], PAD_ROW)
  np.testing.assert_array_equal(ex["attention_mask"][0], PAD_ROW)
  np.testing.assert_array_equal(ex["loss_mask"][0], PAD_ROW)
  np.testing.assert_array_equal(ex["tokens"][3], _seq(*PROMPT, d(1), d(3), EOS))
  assert ex["has_reference"] == 0 and "labels" not in ex
  np.testing.assert_array_equal(ex["ranks"], [1, 2, 2])
  np.testing.assert_array_equal(ex["group_mask"], [1, 1, 1])
  ex = tokenize_example(rec, "ranked", tok, TokenizeConfig(8, 6, group_size=5))
  np.testing.assert_array_equal(ex["ranks"], [1, 2, 2, 0, 0])
  np.testing.assert_array_equal(ex["group_mask"], [1, 1, 1, 0, 0])


def test_ranked_chat(tok):
  rec = validate_record({"prompt": [{"role": "user", "content": "1+2="}], "completions": ["3"],
                         "labels": [True]}, "ranked")
  ex = tokenize_example(rec, "ranked", tok, TokenizeConfig(12, 10))
  prompt = [BOS, USER, d(1), PLUS, d(2), EQ, END, ASSISTANT]
  np.testing.assert_array_equal(ex["tokens"], [[0] * 12, prompt + [d(3), EOS, 0, 0]])


def test_group_larger_than_group_size_names_field(tok):
  cfg = TokenizeConfig(8, 6, group_size=2)
  cases = [("negatives", {"prompt": "1=", "rejected": "2", "samples": ["1", "2", "3"]}, "samples"),
           ("groups", {"prompt": "1=", "reference": "1", "completions": ["1", "2", "3"],
                       "rewards": [1.0, 0.0, 0.0]}, "completions"),
           ("ranked", {"prompt": "1=", "completions": ["1", "2", "3"], "ranks": [1, 2, 3]},
            "completions")]
  for fmt, rec, field in cases:
    rec = {**rec, "source_file": "g.jsonl", "row": 9}
    with pytest.raises(DataError, match=rf"^g\.jsonl:9: {field}: 3 responses > group_size 2$"):
      tokenize_example(rec, fmt, tok, cfg)
  examples, skipped = tokenize_records([cases[0][1], {**cases[0][1], "samples": ["1"]}],
                                       "negatives", tok, cfg, on_error="skip")
  assert skipped == 1 and examples[0]["group_mask"].tolist() == [1, 0]
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="group_size"):
      TokenizeConfig(8, 6, group_size=bad)


def test_unpaired_embedding_column(tok):
  rec = validate_record({"prompt": "1=", "completion": "1", "label": True,
                         "embedding": [0.25, -1, 3]}, "unpaired")
  ex = tokenize_example(rec, "unpaired", tok, TokenizeConfig(8, 6))
  assert ex["embedding"].dtype == np.float32 and ex["embedding"].shape == (3,)
  np.testing.assert_array_equal(ex["embedding"], [0.25, -1.0, 3.0])
  ex = tokenize_example({"prompt": "1=", "completion": "1", "label": True}, "unpaired", tok,
                        TokenizeConfig(8, 6))
  assert "embedding" not in ex


@pytest.mark.parametrize("fmt", ["negatives", "groups", "ranked"])
def test_ragged_toy_pads_to_one_shape(tok, fmt):
  task = toy.ArithmeticTask()
  k = 4
  recs = {"negatives": lambda: task.negative_records(30, k=k, ragged=True),
          "groups": lambda: task.group_records(30, g=k, ragged=True),
          "ranked": lambda: task.ranked_records(30, g=k, ragged=True,
                                                with_reference=False)}[fmt]()
  recs, _ = validate_records(recs, fmt)
  examples, _ = tokenize_records(recs, fmt, tok, TokenizeConfig(16, 10, group_size=k))
  field = {"negatives": "samples", "groups": "completions", "ranked": "completions"}[fmt]
  sizes = {len(r[field]) for r in recs}
  assert len(sizes) > 1 and sizes <= set(range(1, k + 1))
  for r, ex in zip(recs, examples):
    n = len(r[field])
    assert ex["tokens"].shape == (1 + k, 16)
    np.testing.assert_array_equal(ex["group_mask"], [1] * n + [0] * (k - n))
    # A slot is real iff it has attended (and scored) tokens.
    np.testing.assert_array_equal(ex["attention_mask"][1:].any(-1), ex["group_mask"] == 1)
    np.testing.assert_array_equal(ex["loss_mask"][1:].any(-1), ex["group_mask"] == 1)
    assert (ex["tokens"][1 + n:] == tok.pad_token_id).all()
    if fmt == "groups":
      np.testing.assert_array_equal(ex["rewards"][:n], r["rewards"])
      assert (ex["rewards"][n:] == 0).all()
    if fmt == "ranked":
      assert ex["has_reference"] == 0 and not ex["attention_mask"][0].any()
      np.testing.assert_array_equal(ex["labels"], [int(x) for x in r["labels"]] + [0] * (k - n))
  stacked = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
  assert stacked["group_mask"].shape == (30, k)

_answer = st.text("0123456789", min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(completions=st.lists(_answer, min_size=1, max_size=5), data=st.data(),
       reference=st.one_of(st.none(), _answer), group_size=st.one_of(st.none(), st.integers(1, 5)))
def test_fuzz_ranked_layout(tok, completions, data, reference, group_size):
  n = len(completions)
  rec = {"prompt": "12+3=", "completions": completions}
  if data.draw(st.booleans()):
    rec["labels"] = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    col = "labels"
  else:
    rec["ranks"] = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    col = "ranks"
  if reference is not None:
    rec["reference"] = reference
  rec = validate_record(rec, "ranked")
  cfg = TokenizeConfig(12, 8, group_size=group_size)
  if group_size is not None and n > group_size:
    with pytest.raises(DataError, match=r": completions: \d+ responses > group_size"):
      tokenize_example(rec, "ranked", tok, cfg)
    return
  ex = tokenize_example(rec, "ranked", tok, cfg)
  G = n if group_size is None else group_size
  assert ex["tokens"].shape == ex["attention_mask"].shape == ex["loss_mask"].shape == (1 + G, 12)
  assert ex[col].shape == ex["group_mask"].shape == (G,)
  assert ex["has_reference"] == (reference is not None)
  real = np.r_[reference is not None, np.arange(G) < n]
  np.testing.assert_array_equal(ex["loss_mask"].any(-1), real)
  np.testing.assert_array_equal(ex["attention_mask"].any(-1), real)
  np.testing.assert_array_equal(ex["group_mask"], real[1:])
  np.testing.assert_array_equal(ex[col][:n], np.asarray(rec[col], np.int32))
  assert (ex[col][n:] == 0).all() and (ex["tokens"][~real] == 0).all()
  assert (ex["loss_mask"] <= ex["attention_mask"]).all()


# ---- Long texts: only the kept end is encoded, to exactly the whole text's ids ----

def _bpe(pre_tokenizer, *, adds_bos):
  """A BPE tokenizer trained here on a small corpus (no download); ``pre_tokenizer``
  None merges across everything, the hardest case for encoding only a window."""
  from tokenizers import Tokenizer, models, processors, trainers
  from transformers import PreTrainedTokenizerFast
  backend = Tokenizer(models.BPE(unk_token="<unk>"))
  if pre_tokenizer is not None:
    backend.pre_tokenizer = pre_tokenizer
  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  corpus = [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(12)) + "\naaaa  bb"
            for i in range(200)]
  backend.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=sorted(set("".join(corpus)) | set("xyz0123456789"))))
  if adds_bos:
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>", unk_token="<unk>")
  tok.chat_template = toy.CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]")
  return tok


_WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "quickly",
          "banana", "aardvark", "2+2=4", "x-ray"]


def _tokenizers():
  from tokenizers import pre_tokenizers
  return {"toy_chars": toy.build_tokenizer(),
          "bpe_bytelevel": _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                                adds_bos=False),
          "bpe_metaspace": _bpe(pre_tokenizers.Metaspace(), adds_bos=True),
          "bpe_unsplit": _bpe(None, adds_bos=True)}


@pytest.fixture(scope="module")
def toks():
  return _tokenizers()


def _text(kind, n_chars, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "digits":      # the toy vocabulary
    return "".join(rng.choice(list("0123456789+= \n"), n_chars))
  if kind == "words":
    out = " ".join(rng.choice(_WORDS, n_chars // 4))
  elif kind == "runs":      # long runs a BPE merges from their start
    out = "".join(c * int(rng.integers(1, 400)) for c in rng.choice(list("ab \n"), 200))
  else:                     # words that end in one long unbroken run
    out = " ".join(rng.choice(_WORDS, n_chars // 8)) + " " + "a" * (n_chars // 2)
  return out[:n_chars]


@pytest.mark.parametrize("name", ["toy_chars", "bpe_bytelevel", "bpe_metaspace",
                                  "bpe_unsplit"])
@pytest.mark.parametrize("kind", ["words", "runs", "tail_run"])
def test_kept_ids_equal_encoding_the_whole_text(toks, name, kind):
  from jaxalign.data import tokenize
  tok = toks[name]
  text = _text("digits" if name == "toy_chars" else kind, 30_000, seed=len(kind))
  encoded = []

  def encode(t):
    encoded.append(len(t))
    return tokenize.encode_text(tok, t)

  whole = encode(text)
  for n in (1, 9, 60):
    for end in (True, False):
      encoded.clear()
      got = tokenize.kept_ids(encode, text, n, end=end)
      assert got == (whole[-n:] if end else whole[:n]), (n, end)
      # A text that ends in one long run a BPE merges from its start is encoded whole.
      settles = name == "toy_chars" or kind == "words" or (kind == "tail_run" and not end)
      if settles:
        assert max(encoded) < len(text) // 4   # only a window was encoded
  for n in (1, 60):   # a text prompt: the tokenizer's own specials, then the text
    assert tokenize.text_prompt_ids(tok, text, keep_last=n) == \
        tokenize.text_prompt_ids(tok, text)[-n:]
  short = text[:50]
  assert tokenize.text_prompt_ids(tok, short, keep_last=200) == \
      tokenize.text_prompt_ids(tok, short)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text("ab \n", max_size=2500), n=st.integers(1, 25), end=st.booleans())
def test_fuzz_kept_ids_unsplit_bpe(toks, text, n, end):
  from jaxalign.data import tokenize
  tok = toks["bpe_unsplit"]
  whole = tokenize.encode_text(tok, text)
  got = tokenize.kept_ids(lambda t: tokenize.encode_text(tok, t), text, n, end=end)
  assert got == (whole[-n:] if end else whole[:n])


def _old_sequence(tok, prompt, response, P, T):
  """Tokenize's rule written as before: encode the whole texts, then cut."""
  from jaxalign.data import tokenize
  if isinstance(response, list):
    if len(response) > 1:
      prompt = list(prompt) + list(response[:-1])
    response = response[-1]["content"]
  p = tokenize.prompt_ids(tok, prompt)[-P:]
  r = (tokenize.encode_text(tok, response) + [tok.eos_token_id])[:T - len(p)]
  return p + r, len(p)


@pytest.mark.parametrize("name", ["toy_chars", "bpe_bytelevel", "bpe_metaspace"])
def test_long_rows_tokenize_to_the_same_ids(toks, name):
  tok = toks[name]
  kind = "digits" if name == "toy_chars" else "words"
  long_text, other = _text(kind, 20_000, 1), _text(kind, 20_000, 2)
  short = _text(kind, 6, 3) or "1"
  user = lambda c: {"role": "user", "content": c}
  bot = lambda c: {"role": "assistant", "content": c}
  cases = [(long_text, other), (short, other), (long_text, short),
           ([user(long_text)], [bot(other)]),
           ([user(short)], [bot(long_text), user(other), bot(long_text)])]
  for P, T in ((5, 12), (40, 100)):
    for prompt, response in cases:
      rec = validate_record({"prompt": prompt, "completion": response}, "sft")
      ex = tokenize_example(rec, "sft", tok, TokenizeConfig(T, P))
      want, n = _old_sequence(tok, prompt, response, P, T)
      assert ex["tokens"][0, :len(want)].tolist() == want
      assert ex["attention_mask"][0].sum() == len(want) and ex["loss_mask"][0, :n].sum() == 0


_PEAK_SCRIPT = """
import resource, sys
from jaxalign.data import toy
from jaxalign.data.formats import validate_record
from jaxalign.data.tokenize import TokenizeConfig, tokenize_example
tok = toy.build_tokenizer()
tokenize_example({"prompt": "1+1=", "completion": "2"}, "sft", tok, TokenizeConfig(64, 32))
n = int(sys.argv[1])
rec = validate_record({"prompt": "12+3=" * (n // 5), "chosen": "45 " * (n // 3),
                       "rejected": [{"role": "assistant", "content": "6" * n}]}, "pairwise")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ex = tokenize_example(rec, "pairwise", tok, TokenizeConfig(64, 32))
assert ex["tokens"][0, 29] == 21 and ex["tokens"][1, 31] == 6  # "=<|end|><|assistant|>"
assert ex["loss_mask"].sum() == 64
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_multi_megabyte_row_tokenizes_in_bounded_memory():
  """A 4M-character prompt and responses (the toy tokenizer: one token a character,
  the costliest case) add little to the process's peak memory: before, the whole
  texts were encoded and the peak grew by ~880 bytes a character (~3.5 GB here)."""
  import os
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(4_000_000)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  grown_mb = int(out.stdout.split()[-1])
  assert grown_mb < 200, f"peak memory grew by {grown_mb} MB"
