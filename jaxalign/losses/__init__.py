"""The loss registry: a loss name -> its pure function and what it needs.

A new method is one file in this package plus one entry in `LOSSES`. The
trainer reads `LossSpec` to know the data format (which fixes the sequences
per example that go through the forward), whether reference log-probs are
needed and whether the loss carries running state; it never changes per loss.
"""

import dataclasses
import inspect
from typing import Any, Callable

from jaxalign.losses import dpo, ln_dpo, sft


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What the step hands a loss adapter, per example b and sequence s.

  Attributes:
    logps: [B, S] summed policy log-probs of each sequence's scored tokens.
    ref_logps: [B, S] the same under the reference model; None if not needed.
    lengths: [B, S] scored-token counts (0 for padding sequences).
    batch: the batch's other columns ("label", "rewards", ...), [B, ...].
  """
  logps: Any
  ref_logps: Any
  lengths: Any
  batch: dict


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How the train step feeds one loss.

  Attributes:
    fn: the pure loss function.
    data: the record format it consumes ("sft", "pairwise", ...).
    needs_ref: whether reference log-probs are an input.
    call: adapts the step's arrays to `fn`'s signature:
      call(fn, inputs: LossInputs, state, **hparams) -> (loss, metrics, new_state).
    init_state: () -> the loss's running state (None for stateless losses).
  """
  fn: Callable
  data: str
  needs_ref: bool
  call: Callable
  init_state: Callable[[], Any] | None = None

  def hparam_names(self) -> tuple[str, ...]:
    """Keyword-only hyperparameters the loss accepts (for config validation)."""
    params = inspect.signature(self.fn).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY
                 and p.name not in ("weights", "state"))


def _stateless(adapter: Callable) -> Callable:
  """Wraps an adapter returning (loss, metrics) so it threads `state` through."""
  def call(fn, inputs, state, **hparams):
    loss, metrics = adapter(fn, inputs, **hparams)
    return loss, metrics, state
  return call


@_stateless
def _call_pairwise(fn, x: LossInputs, **hparams):
  return fn(x.logps[:, 0], x.logps[:, 1], x.ref_logps[:, 0], x.ref_logps[:, 1],
            x.lengths[:, 0], x.lengths[:, 1], **hparams)


@_stateless
def _call_sft(fn, x: LossInputs, **hparams):
  return fn(x.logps[:, 0], x.lengths[:, 0], **hparams)


LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(sft.sft_loss, data="sft", needs_ref=False, call=_call_sft),
    "dpo": LossSpec(dpo.dpo_loss, data="pairwise", needs_ref=True, call=_call_pairwise),
    "ln_dpo": LossSpec(ln_dpo.ln_dpo_loss, data="pairwise", needs_ref=True,
                       call=_call_pairwise),
}


def get(name: str) -> LossSpec:
  """The registry entry for `name`; KeyError lists the known names."""
  try:
    return LOSSES[name]
  except KeyError:
    raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None
