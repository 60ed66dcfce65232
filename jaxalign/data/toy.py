"""Bundled synthetic task: short arithmetic problems with verifiable answers.

A problem is a prompt like ``"37+48="`` whose answer is ``"85"``. The problem
space (every ``a op b`` with operands in ``[0, max_operand]``) is split into
train and held-out eval problems by a stable hash, so eval problems are never
trained on. Record generators produce data in every format of
`jaxalign.data.formats` (sft, pairwise, unpaired, negatives, groups, ranked), and
`build_tokenizer` builds a tiny character-level tokenizer locally, so demos and
tests need no download.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Sequence

import numpy as np

Record = dict[str, Any]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHARS = tuple("0123456789") + ("+", "-", "*", "=", " ", "\n", ":")

# BOS first, one role marker per message, content, end-of-turn marker; the
# generation prompt opens an assistant turn. Unknown roles render as <|user|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% else %}{{ '<|user|>' }}{% endif %}"
    "{{ message['content'] }}{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_PROMPT_RE = re.compile(r"^\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One arithmetic problem: ``prompt`` is ``f"{a}{op}{b}="``."""
  prompt: str
  answer: str
  a: int
  b: int
  op: str


def _user(text: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
  return [{"role": "assistant", "content": text}]


def _no_carry(a: int, b: int, op: str) -> int | None:
  """Digit-wise a+b (or a-b) that ignores carries/borrows; None if not applicable."""
  if op not in "+-" or a < 0 or b < 0 or (op == "-" and a < b):
    return None
  da, db = str(a)[::-1], str(b)[::-1]
  digits = []
  for i in range(max(len(da), len(db))):
    x = int(da[i]) if i < len(da) else 0
    y = int(db[i]) if i < len(db) else 0
    digits.append(str((x + y) % 10 if op == "+" else (x - y) % 10))
  return int("".join(reversed(digits)))


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """Generator of arithmetic problems and records in every data format.

  Attributes:
    max_operand: operands are drawn uniformly from ``[0, max_operand]``.
    ops: operators to use, a subset of ``("+", "-", "*")``.
    seed: seeds the train/eval split of the problem space (not the sampling).
    eval_fraction: fraction of the problem space held out for evaluation.
  """
  max_operand: int = 99
  ops: tuple[str, ...] = ("+",)
  seed: int = 0
  eval_fraction: float = 0.1

  def __post_init__(self):
    if self.max_operand < 1:
      raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
    bad = [op for op in self.ops if op not in _OPS]
    if not self.ops or bad:
      raise ValueError(f"ops must be a non-empty subset of {tuple(_OPS)}, got {self.ops}")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

  # --- problems -------------------------------------------------------------

  def split_of(self, a: int, op: str, b: int) -> str:
    """Returns "train" or "eval" for problem (a, op, b); a stable hash decides."""
    digest = hashlib.sha256(f"{self.seed}:{a}{op}{b}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2.0**64
    return "eval" if u < self.eval_fraction else "train"

  def make_problem(self, a: int, op: str, b: int) -> Problem:
    return Problem(prompt=f"{a}{op}{b}=", answer=str(_OPS[op](a, b)), a=a, b=b, op=op)

  def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
    """Samples n problems (with replacement) from one side of the split.

    Args:
      n: number of problems.
      split: "train" or "eval".
      seed: sampling seed; the same (task, split, seed) gives the same list.
    """
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    out: list[Problem] = []
    while len(out) < n:
      a, b = (int(x) for x in rng.integers(0, self.max_operand + 1, size=2))
      op = self.ops[int(rng.integers(len(self.ops)))]
      if self.split_of(a, op, b) == split:
        out.append(self.make_problem(a, op, b))
    return out

  def parse_prompt(self, prompt: str) -> Problem | None:
    """Parses ``"a op b="`` back into a Problem; None if it is not one."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
      return None
    return self.make_problem(int(m.group(1)), m.group(2), int(m.group(3)))

  def is_correct(self, prompt: str, completion: str) -> bool:
    """Whether the completion's first word (cut at EOS/whitespace) is the answer."""
    problem = self.parse_prompt(prompt)
    if problem is None:
      return False
    text = completion.split(EOS, 1)[0].strip()
    return (text.split(None, 1)[0] if text else "") == problem.answer

  def wrong_answers(self, problem: Problem, k: int,
                    rng: np.random.Generator) -> list[str]:
    """k plausible wrong answers, distinct when possible, never the right one.

    Mistake types: dropped carry, off by +-1 / +-10, swapped adjacent digits, one
    wrong digit; random offsets fill in when those run out.
    """
    right = int(problem.answer)
    cands: list[int] = []
    nc = _no_carry(problem.a, problem.b, problem.op)
    if nc is not None:
      cands.append(nc)
    cands += [right + 1, right - 1, right + 10, right - 10]
    digits = str(abs(right))
    sign = -1 if right < 0 else 1
    for i in range(len(digits) - 1):
      s = list(digits)
      s[i], s[i + 1] = s[i + 1], s[i]
      cands.append(sign * int("".join(s)))
    for i in range(len(digits)):
      d = int(rng.integers(0, 9))
      s = list(digits)
      s[i] = str(d if d < int(s[i]) else d + 1)
      cands.append(sign * int("".join(s)))
    pool = list(dict.fromkeys(c for c in cands if c != right))
    rng.shuffle(pool)
    out = [str(c) for c in pool[:k]]
    attempts = 0
    while len(out) < k:  # Fill with random offsets; distinct unless k is huge.
      attempts += 1
      c = str(right + int(rng.integers(-100, 101)))
      if c != problem.answer and (c not in out or attempts > 1000):
        out.append(c)
    return out

  # --- record generators ------------------------------------------------------

  def sft_records(self, n: int, split: str = "train", seed: int = 0, *,
                  chat: bool = False, pad_noise: float = 0.0) -> list[Record]:
    """n records ``{"prompt", "completion"}``.

    With ``pad_noise`` > 0, each answer below 100 has that probability of being
    demonstrated zero-padded to three digits ("085" for 85): a systematic
    annotator habit that an SFT model picks up, that `is_correct` rejects, and
    that preference data can correct.
    """
    rng = np.random.default_rng([seed, 5])
    out = []
    for p in self.problems(n, split, seed):
      answer = p.answer
      if 0 <= int(answer) < 100 and rng.random() < pad_noise:
        answer = answer.zfill(3)
      out.append(_fmt({"prompt": p.prompt, "completion": answer}, chat, ("completion",)))
    return out

  def pairwise_records(self, n: int, seed: int = 0, split: str = "train", *,
                       chat: bool = False) -> list[Record]:
    """n records ``{"prompt", "chosen", "rejected"}``: right vs. a wrong answer."""
    rng = np.random.default_rng([seed, 2])
    return [_fmt({"prompt": p.prompt, "chosen": p.answer,
                  "rejected": self.wrong_answers(p, 1, rng)[0]},
                 chat, ("chosen", "rejected"))
            for p in self.problems(n, split, seed)]

  def unpaired_records(self, n: int, seed: int = 0, split: str = "train", *,
                       chat: bool = False) -> list[Record]:
    """n records ``{"prompt", "completion", "label"}``, half desirable on average."""
    rng = np.random.default_rng([seed, 3])
    out = []
    for p in self.problems(n, split, seed):
      label = bool(rng.random() < 0.5)
      completion = p.answer if label else self.wrong_answers(p, 1, rng)[0]
      out.append(_fmt({"prompt": p.prompt, "completion": completion, "label": label},
                      chat, ("completion",)))
    return out

  def _group_size(self, k: int, ragged: bool, rng: np.random.Generator) -> int:
    """k, or (ragged) uniform in [1, k]."""
    if k < 1:
      raise ValueError(f"group size must be >= 1, got {k}")
    return int(rng.integers(1, k + 1)) if ragged else k

  def _mixed_completions(self, p: Problem, g: int, rng: np.random.Generator) -> list[str]:
    """g answers, right and wrong mixed: with g >= 2 at least one of each
    (number right uniform in [1, g-1], randomly placed); g = 1 is right w.p. 1/2."""
    wrong = self.wrong_answers(p, g, rng)
    if g == 1:
      return [p.answer if rng.random() < 0.5 else wrong[0]]
    n_right = int(rng.integers(1, g))
    right = set(rng.permutation(g)[:n_right].tolist())
    return [p.answer if i in right else w for i, w in enumerate(wrong)]

  def negative_records(self, n: int, k: int, seed: int = 0, split: str = "train",
                       *, chat: bool = False, ragged: bool = False) -> list[Record]:
    """n records ``{"prompt", "rejected", "samples": [k]}``.

    ``rejected`` is a wrong answer; ``samples`` imitate policy samples: each is the
    right answer with probability 1/2, else a wrong one. ``ragged=True`` draws
    each record's number of samples uniformly in [1, k].
    """
    rng = np.random.default_rng([seed, 4])
    out = []
    for p in self.problems(n, split, seed):
      kk = self._group_size(k, ragged, rng)
      wrong = self.wrong_answers(p, kk + 1, rng)
      samples = [p.answer if rng.random() < 0.5 else w for w in wrong[1:]]
      out.append(_fmt({"prompt": p.prompt, "rejected": wrong[0], "samples": samples},
                      chat, ("rejected",)))
    return out

  def group_records(self, n: int, g: int, seed: int = 0, split: str = "train",
                    *, chat: bool = False, ragged: bool = False) -> list[Record]:
    """n records ``{"prompt", "reference", "completions": [g], "rewards": [g]}``.

    Completions mix right and wrong answers (with g >= 2 at least one of each,
    so every group's rewards have non-zero variance); reward is 1.0 if right
    else 0.0. ``ragged=True`` draws each record's group size uniformly in [1, g]
    (a group of 1 has zero reward variance).
    """
    rng = np.random.default_rng([seed, 5])
    out = []
    for p in self.problems(n, split, seed):
      completions = self._mixed_completions(p, self._group_size(g, ragged, rng), rng)
      rewards = [1.0 if self.is_correct(p.prompt, c) else 0.0 for c in completions]
      out.append(_fmt({"prompt": p.prompt, "reference": p.answer,
                       "completions": completions, "rewards": rewards},
                      chat, ("reference",)))
    return out

  def ranked_records(self, n: int, g: int, seed: int = 0, split: str = "train",
                     *, chat: bool = False, with_reference: bool = True,
                     ragged: bool = False, ranks: bool = False) -> list[Record]:
    """n AFT records ``{"prompt", "completions": [g], "labels": [g], "reference"}``.

    Completions mix right and wrong answers (with g >= 2 at least one of each,
    randomly placed); ``labels[i]`` is whether completion i is right;
    ``reference`` (omitted when ``with_reference=False``) is the right answer.
    ``ranks=True`` gives ``ranks`` instead of ``labels``: right answers rank 1,
    wrong ones by distance to the answer (dense ranks 2, 3, ...; equal distance,
    equal rank). ``ragged=True`` draws each group size uniformly in [1, g].
    """
    rng = np.random.default_rng([seed, 6])
    out = []
    for p in self.problems(n, split, seed):
      completions = self._mixed_completions(p, self._group_size(g, ragged, rng), rng)
      record: Record = {"prompt": p.prompt, "completions": completions}
      if ranks:
        dist = [abs(int(c) - int(p.answer)) for c in completions]
        order = sorted(set(dist) | {0})  # 0 = right answer -> rank 1
        record["ranks"] = [1 + order.index(x) for x in dist]
      else:
        record["labels"] = [self.is_correct(p.prompt, c) for c in completions]
      if with_reference:
        record["reference"] = p.answer
      out.append(_fmt(record, chat, ("reference",) if with_reference else ()))
    return out


def _fmt(record: Record, chat: bool, response_fields: Sequence[str]) -> Record:
  """Turns prompt/response strings into chat messages when chat=True."""
  if not chat:
    return record
  out = dict(record, prompt=_user(record["prompt"]))
  for f in response_fields:
    out[f] = _assistant(record[f])
  return out


def build_tokenizer(model_max_length: int = 64):
  """Character-level tokenizer for the toy task, built locally (no download).

  Vocabulary (25 ids): ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, the
  chat markers ``<|system|> <|user|> <|assistant|> <|end|>``, digits, ``+-*=``,
  space, newline and ``:``. Has pad/bos/eos/unk tokens, adds ``<bos>`` to plain
  text itself (``tok(text)``), and has a chat template;
  ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trips offline.

  Returns:
    A ``transformers.PreTrainedTokenizerFast``.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  specials = (PAD, BOS, EOS, UNK) + CHAT_TOKENS
  vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens(list(specials))
  # It adds its BOS itself (as Llama's does), so `tok(text)` starts with <bos>: text
  # prompts are tokenized the tokenizer's own way (data/tokenize.py).
  backend.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
  tok = PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
      unk_token=UNK, model_max_length=model_max_length, padding_side="right")
  tok.chat_template = CHAT_TEMPLATE
  return tok

