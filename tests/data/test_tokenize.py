"""Tests for tokenization: exact masks, truncation policy, chat template path."""
import numpy as np
import pytest

from jaxalign.data import toy
from jaxalign.data.formats import DataError, validate_record
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
