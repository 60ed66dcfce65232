"""Verifiable rewards: exact-match answers, checked by rule rather than by a model."""

from jaxalign.data import toy

_TASK = toy.ArithmeticTask()


def first_answer(text: str) -> str:
  """The answer a completion gives: its first word, cut at an EOS marker."""
  text = text.split(toy.EOS, 1)[0].strip()
  return text.split(None, 1)[0] if text else ""


def exact_match(prompt: str, completion: str, reference: str | None, *,
                correct: float = 1.0, wrong: float = 0.0) -> float:
  """`correct` if the completion's first word is the reference's, else `wrong`.

  Args:
    prompt: unused (the reference answer decides).
    completion: sampled response text.
    reference: the dataset's reference answer; None scores `wrong`.
    correct, wrong: the two reward values (e.g. 0 and -1 for GRAO's ternary
      judge, where a right answer ties with the reference and a wrong one loses).
  """
  del prompt
  if reference is None:
    return wrong
  want = first_answer(reference)
  return correct if want and first_answer(completion) == want else wrong


def arithmetic(prompt: str, completion: str, reference: str | None, *,
               correct: float = 1.0, wrong: float = 0.0) -> float:
  """The bundled task's checker (`toy.ArithmeticTask.is_correct`): the answer is
  computed from the prompt ("37+48="), so no reference is needed."""
  del reference
  return correct if _TASK.is_correct(prompt, completion) else wrong
