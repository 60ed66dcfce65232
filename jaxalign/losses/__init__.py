"""The loss registry: a loss name -> its pure function and what it needs.

A new method is one file in this package plus one entry in `LOSSES`. The
trainer reads `LossSpec` to decide which sequences go through the forward
pass and whether reference log-probs are needed; it never changes per loss.
"""

import dataclasses
import inspect
from typing import Callable

from jaxalign.losses import dpo, sft


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How the train step feeds one loss.

  Attributes:
    fn: the pure loss function.
    data: the record format it consumes ("sft", "pairwise", ...).
    num_sequences: sequences per example going through the forward (S).
    needs_ref: whether reference log-probs are an input.
    call: adapts the step's per-sequence arrays to `fn`'s signature:
      call(fn, logps [B, S], ref_logps [B, S] | None, lengths [B, S],
           weights [B], **hparams) -> (loss, metrics).
  """
  fn: Callable
  data: str
  num_sequences: int
  needs_ref: bool
  call: Callable

  def hparam_names(self) -> tuple[str, ...]:
    """Keyword-only hyperparameters the loss accepts (for config validation)."""
    params = inspect.signature(self.fn).parameters.values()
    return tuple(p.name for p in params
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "weights")


def _call_pairwise(fn, logps, ref_logps, lengths, weights, **hparams):
  return fn(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1],
            lengths[:, 0], lengths[:, 1], weights=weights, **hparams)


def _call_sft(fn, logps, ref_logps, lengths, weights, **hparams):
  del ref_logps
  return fn(logps[:, 0], lengths[:, 0], weights=weights, **hparams)


LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(sft.sft_loss, data="sft", num_sequences=1, needs_ref=False,
                    call=_call_sft),
    "dpo": LossSpec(dpo.dpo_loss, data="pairwise", num_sequences=2, needs_ref=True,
                    call=_call_pairwise),
}


def get(name: str) -> LossSpec:
  """The registry entry for `name`; KeyError lists the known names."""
  try:
    return LOSSES[name]
  except KeyError:
    raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None
