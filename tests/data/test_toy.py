"""Tests for the toy arithmetic task and its tokenizer."""
import numpy as np
import pytest

from jaxalign.data import toy


@pytest.fixture(scope="module")
def task():
  return toy.ArithmeticTask(max_operand=20, ops=("+", "-", "*"))


def test_split_disjoint_and_deterministic(task):
  train = {p.prompt for p in task.problems(400, "train", seed=0)}
  evals = {p.prompt for p in task.problems(100, "eval", seed=0)}
  assert train and evals and not train & evals
  assert task.problems(5, "eval", seed=3) == task.problems(5, "eval", seed=3)
  assert task.problems(5, "train", seed=3) != task.problems(5, "train", seed=4)


def test_problem_answers_and_is_correct(task):
  for p in task.problems(50, seed=1):
    assert p.prompt == f"{p.a}{p.op}{p.b}="
    assert int(p.answer) == {"+": p.a + p.b, "-": p.a - p.b, "*": p.a * p.b}[p.op]
    assert task.is_correct(p.prompt, p.answer)
    assert task.is_correct(p.prompt, p.answer + "<eos>junk")
    assert task.is_correct(p.prompt, " " + p.answer + " 17")
    assert not task.is_correct(p.prompt, p.answer + "1")
    assert not task.is_correct(p.prompt, "")
  assert not task.is_correct("not a problem", "3")


def test_wrong_answers_never_correct(task):
  rng = np.random.default_rng(0)
  for p in task.problems(100, seed=2):
    wrong = task.wrong_answers(p, 5, rng)
    assert len(wrong) == 5 and len(set(wrong)) == 5
    assert all(not task.is_correct(p.prompt, w) for w in wrong)
  carry = task.make_problem(37, "+", 48)
  assert "75" in task.wrong_answers(carry, 20, rng)  # dropped carry


def test_record_generators(task):
  r = task.pairwise_records(3, seed=0)[0]
  assert task.is_correct(r["prompt"], r["chosen"])
  assert not task.is_correct(r["prompt"], r["rejected"])
  g = task.group_records(4, g=3, seed=0)
  for r in g:
    assert len(r["completions"]) == len(r["rewards"]) == 3
    assert r["rewards"] == [float(task.is_correct(r["prompt"], c)) for c in r["completions"]]
  n = task.negative_records(2, k=4)[0]
  assert len(n["samples"]) == 4 and not task.is_correct(n["prompt"], n["rejected"])
  u = task.unpaired_records(20, seed=0)
  assert all(task.is_correct(r["prompt"], r["completion"]) == r["label"] for r in u)
  s = task.sft_records(2, "eval", seed=0, chat=True)[0]
  assert s["prompt"][0]["role"] == "user" and s["completion"][0]["role"] == "assistant"


def test_tokenizer_vocab_and_roundtrip(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from transformers import AutoTokenizer
  tok = toy.build_tokenizer()
  assert len(tok) <= 32
  assert (tok.pad_token_id, tok.bos_token, tok.eos_token) == (0, "<bos>", "<eos>")
  ids = tok("37+48= 85", add_special_tokens=False)["input_ids"]
  assert len(ids) == 9 and tok.decode(ids) == "37+48= 85"
  tok.save_pretrained(str(tmp_path))
  tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
  assert tok2("37+48=<eos>", add_special_tokens=False)["input_ids"] == ids[:6] + [2]
  msgs = [{"role": "user", "content": "1+2="}]
  text = tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert text == "<bos><|user|>1+2=<|end|><|assistant|>"
  assert tok2.pad_token_id == 0 and len(tok2) == len(tok)


def test_groups_mix_right_and_wrong(task):
  for r in task.group_records(50, g=4, seed=1):
    assert 0.0 < sum(r["rewards"]) < 4.0  # non-zero reward variance in every group
  right_first = [r["rewards"][0] for r in task.group_records(50, g=4, seed=2)]
  assert 0 < sum(right_first) < 50  # right answers are randomly placed


def test_ranked_records(task):
  from jaxalign.data.formats import validate_records
  recs = task.ranked_records(40, g=3, seed=0)
  assert validate_records(recs, "ranked")[1] == 0
  for r in recs:
    assert len(r["completions"]) == len(r["labels"]) == 3
    assert r["labels"] == [task.is_correct(r["prompt"], c) for c in r["completions"]]
    assert any(r["labels"]) and not all(r["labels"])
    assert task.is_correct(r["prompt"], r["reference"])
  assert 0 < sum(r["labels"][0] for r in recs) < 40
  assert recs == task.ranked_records(40, g=3, seed=0)
  no_ref = task.ranked_records(3, g=2, with_reference=False, chat=True)
  assert all("reference" not in r and r["prompt"][0]["role"] == "user" for r in no_ref)
  chat = task.ranked_records(2, g=2, chat=True)[0]
  assert chat["reference"][0]["role"] == "assistant"
  for r in task.ranked_records(20, g=4, ranks=True):
    assert "labels" not in r and len(r["ranks"]) == 4
    for c, k in zip(r["completions"], r["ranks"]):
      assert (k == 1) == task.is_correct(r["prompt"], c)
    assert validate_records([r], "ranked")[1] == 0


def test_ragged_sizes(task):
  sizes = {len(r["samples"]) for r in task.negative_records(60, k=3, ragged=True)}
  assert sizes == {1, 2, 3}
  sizes = {len(r["completions"]) for r in task.group_records(60, g=3, ragged=True)}
  assert sizes == {1, 2, 3}
  recs = task.ranked_records(60, g=3, ragged=True)
  assert {len(r["completions"]) for r in recs} == {1, 2, 3}
  assert all(len(r["labels"]) == len(r["completions"]) for r in recs)
  # ragged=False keeps the old negative_records stream
  assert task.negative_records(5, k=3) == task.negative_records(5, k=3, ragged=False)
  with pytest.raises(ValueError):
    task.group_records(1, g=0)
