"""Rewards: functions of (prompt, completion, reference) -> float, scored in batches.

A reward runs on the host between sampling and the train step, over a whole
batch of completions at once. The registry maps a name (`config.reward.name`)
to a *factory* that takes the run's tokenizer and the keyword options of
`config.reward.options` and returns a batched reward function:

  fn(prompts: list[str], completions: list[str], references: list[str | None])
      -> np.ndarray float32 [N]

Built-ins: "exact_match" (first word equals the reference answer's),
"arithmetic" (the bundled task's checker) and "reward_model" (a scalar head on
the transformer, batched on device; `jaxalign.rewards.model`). A plain Python
function of one example becomes a reward with `register(name, per_example(f))`,
and `config.reward.name = "package.module:function"` imports such a function
(one example at a time, or batched if it is marked with `@batched_reward`).
"""

import functools
import importlib
import inspect
from typing import Any, Callable, Sequence

import numpy as np

from jaxalign.errors import RewardError
from jaxalign.rewards import verifiable

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Any]], np.ndarray]


def per_example(fn: Callable[..., float]) -> Callable[..., RewardFn]:
  """A factory for a function of one example, fn(prompt, completion, reference, **options).

  The factory accepts (and ignores) `tokenizer`, binds the options, and maps
  `fn` over a batch.
  """
  def factory(tokenizer=None, **options) -> RewardFn:
    del tokenizer
    bound = functools.partial(fn, **options)

    def batch_fn(prompts, completions, references):
      return np.asarray([bound(p, c, r) for p, c, r in zip(prompts, completions, references)],
                        np.float64)
    return batch_fn

  factory.options_of = lambda: fn  # option validation reads fn's keyword-only parameters
  return factory


def batched_reward(fn: Callable) -> Callable:
  """Marks `fn(prompts, completions, references, **options) -> [N]` as batched."""
  fn.is_batched_reward = True
  return fn


def _reward_model_factory(tokenizer=None, **options) -> RewardFn:
  from jaxalign.rewards import model  # local: keeps flax out of the light path
  return model.reward_model_fn(tokenizer=tokenizer, **options)


def _reward_model_options():
  from jaxalign.rewards import model
  return model.reward_model_fn


_reward_model_factory.options_of = _reward_model_options

REWARDS: dict[str, Callable[..., RewardFn]] = {
    "exact_match": per_example(verifiable.exact_match),
    "arithmetic": per_example(verifiable.arithmetic),
    "reward_model": _reward_model_factory,
}


def register(name: str, factory: Callable[..., RewardFn]) -> None:
  """Adds a reward factory (e.g. `per_example(my_fn)`) under `name`."""
  REWARDS[name] = factory


def _import(name: str) -> Callable[..., RewardFn]:
  module_name, _, attr = name.partition(":")
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise KeyError(f"cannot import reward {name!r}: {e}") from None
  if getattr(fn, "is_batched_reward", False):
    def factory(tokenizer=None, **options):
      del tokenizer
      return functools.partial(fn, **options)
    factory.options_of = lambda: fn
    return factory
  return per_example(fn)


def factory_of(name: str) -> Callable[..., RewardFn]:
  """The factory registered as `name`, or imported from "module:function"."""
  if name in REWARDS:
    return REWARDS[name]
  if ":" in name:
    return _import(name)
  raise KeyError(f"unknown reward {name!r}; known: {sorted(REWARDS)} or 'module:function'")


def option_names(name: str) -> tuple[str, ...] | None:
  """Keyword options the reward accepts; None when it takes any (**kwargs)."""
  options_of = getattr(factory_of(name), "options_of", None)
  if options_of is None:
    return None
  params = inspect.signature(options_of()).parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return None
  return tuple(p.name for p in params
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "tokenizer")


def get(name: str, *, tokenizer=None, **options) -> RewardFn:
  """A batched reward function; `options` are `config.reward.options`."""
  return factory_of(name)(tokenizer=tokenizer, **options)


def score(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
          references: Sequence[Any]) -> np.ndarray:
  """Runs a reward over a batch and checks it: one finite float32 per completion.

  Raises:
    RewardError: wrong count, or a value that is not finite in float32, naming
      the first offending completion.
  """
  if not len(prompts) == len(completions) == len(references):
    raise ValueError("prompts, completions and references must have equal lengths")
  values = np.asarray(fn(list(prompts), list(completions), list(references)), np.float64)
  if values.shape != (len(completions),):
    raise RewardError(f"the reward returned shape {values.shape} for {len(completions)} "
                      "completions; it must return one float each")
  bad = ~np.isfinite(values) | (np.abs(values) > np.finfo(np.float32).max)
  if bad.any():
    i = int(np.argmax(bad))
    raise RewardError(f"the reward is not finite in float32 ({values[i]!r}) for prompt "
                      f"{prompts[i]!r:.60}, completion {completions[i]!r:.60}")
  return values.astype(np.float32)
