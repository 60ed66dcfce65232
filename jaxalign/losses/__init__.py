"""The loss registry: a loss name -> its pure function and what it needs.

A new method is one file in this package plus one entry in `LOSSES`. The
trainer reads `LossSpec` to know the data format (which fixes the sequences
per example that go through the forward), whether reference log-probs are
needed and whether the loss carries running state; it never changes per loss.
"""

import dataclasses
import inspect
from typing import Any, Callable

from jaxalign.losses import aft, bco, d2o, dpo, grao, kto, ln_dpo, ofs, reward, sft


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
    prepare: host-side step run once before training, adding columns to the
      tokenized examples: prepare(examples, *, prompt_embeddings, seed,
      **options) -> examples, where `prompt_embeddings()` lazily returns the
      reference model's mean-pooled prompt hidden states [N, D]. Its keyword
      options come from `config.loss.options`.
    hparam_bounds: the interval each numeric hyperparameter must lie in
      (e.g. {"beta": "(0, inf)"}); a value outside it fails config validation.
    modules: names of the LoRA adapters the loss trains side by side on one
      frozen base (OFS-DPO: ("fast", "slow")), each with its own forward and
      optimizer; `inputs.logps` then holds the modules' [B, S] blocks side by
      side ([B, len(modules) * S], in this order). () for one policy.
  """
  fn: Callable
  data: str
  needs_ref: bool
  call: Callable
  init_state: Callable[[], Any] | None = None
  prepare: Callable | None = None
  modules: tuple[str, ...] = ()
  # Hyperparameter -> allowed interval in interval notation ("(0, inf)", "[0, 0.5)"),
  # checked before compiling by jaxalign.guards; names not listed are unchecked.
  hparam_bounds: dict[str, str] = dataclasses.field(default_factory=dict)

  def hparam_names(self) -> tuple[str, ...]:
    """Keyword-only hyperparameters the loss accepts (for config validation)."""
    return _keyword_only(self.fn, exclude=("weights", "state", "update_state"))

  def required_hparams(self) -> tuple[str, ...]:
    """Hyperparameters without a default: the config must give them."""
    params = inspect.signature(self.fn).parameters
    return tuple(n for n in self.hparam_names() if params[n].default is inspect.Parameter.empty)

  def option_names(self) -> tuple[str, ...]:
    """Keyword options of `prepare` (config.loss.options)."""
    if self.prepare is None:
      return ()
    return _keyword_only(self.prepare, exclude=("prompt_embeddings", "seed"))


def _keyword_only(fn: Callable, exclude: tuple[str, ...]) -> tuple[str, ...]:
  params = inspect.signature(fn).parameters.values()
  return tuple(p.name for p in params
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in exclude)


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


def _call_bco(fn, x: LossInputs, state, **hparams):
  return fn(x.logps[:, 0], x.ref_logps[:, 0], x.batch["label"],
            x.batch.get("udm_weights"), state=state, **hparams)


@_stateless
def _call_kto(fn, x: LossInputs, **hparams):
  # Sequence 0 is the example's completion, 1 its mismatched KL sequence.
  return fn(x.logps[:, 0], x.ref_logps[:, 0], x.batch["label"], x.logps[:, 1],
            x.ref_logps[:, 1], **hparams)


@_stateless
def _call_unpaired(fn, x: LossInputs, **hparams):
  return fn(x.logps[:, 0], x.ref_logps[:, 0], x.batch["label"], **hparams)


@_stateless
def _call_reward(fn, x: LossInputs, **hparams):
  # logps holds the reward model's scores [B, 2] (chosen, rejected); see train/reward.py.
  return fn(x.logps[:, 0], x.logps[:, 1], x.batch.get("margin"), **hparams)


@_stateless
def _call_d2o(fn, x: LossInputs, **hparams):
  # Sequence 0 is the human negative, 1..K the self-generated samples.
  return fn(x.logps[:, 1:], x.ref_logps[:, 1:], x.batch["group_mask"],
            x.logps[:, 0], x.ref_logps[:, 0], x.lengths[:, 1:], x.lengths[:, 0], **hparams)


@_stateless
def _call_grao(fn, x: LossInputs, **hparams):
  # Sequence 0 is the dataset's reference answer, 1..G the sampled completions.
  return fn(x.logps[:, 1:], x.lengths[:, 1:], x.batch["group_mask"], x.batch["rewards"],
            x.logps[:, 0], x.lengths[:, 0], x.batch.get("answer_rewards"), **hparams)


@_stateless
def _call_aft(fn, x: LossInputs, **hparams):
  # Sequence 0 is the reference chain of thought (padding when absent), 1..G candidates.
  labels = x.batch.get("labels")
  ranks = x.batch.get("ranks")
  is_positive = labels if labels is not None else ranks == 1
  return fn(x.logps[:, 1:], x.lengths[:, 1:], x.batch["group_mask"], is_positive,
            x.logps[:, 0], x.lengths[:, 0], ranks, **hparams)


def _call_ofs(fn, x: LossInputs, state, **hparams):
  # logps: [B, 4] = fast (chosen, rejected) then slow (chosen, rejected).
  return fn(x.logps[:, 0], x.logps[:, 1], x.logps[:, 2], x.logps[:, 3],
            x.ref_logps[:, 0], x.ref_logps[:, 1], state=state, **hparams)


LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(sft.sft_loss, data="sft", needs_ref=False, call=_call_sft),
    "dpo": LossSpec(dpo.dpo_loss, data="pairwise", needs_ref=True, call=_call_pairwise),
    "ln_dpo": LossSpec(ln_dpo.ln_dpo_loss, data="pairwise", needs_ref=True,
                       call=_call_pairwise),
    "bco": LossSpec(bco.bco_loss, data="unpaired", needs_ref=True, call=_call_bco,
                    init_state=bco.init_bco_state, prepare=bco.prepare_udm),
    "kto": LossSpec(kto.kto_loss, data="unpaired_kl", needs_ref=True, call=_call_kto),
    "apo_zero_unpaired": LossSpec(kto.apo_zero_unpaired_loss, data="unpaired", needs_ref=True,
                                  call=_call_unpaired),
    # Bradley-Terry reward-model training: its own trainer (jaxalign/train/reward.py)
    # scores sequences with the scalar head, not the LM log-probs of the train step.
    "reward_model": LossSpec(reward.bradley_terry_loss, data="pairwise", needs_ref=False,
                             call=_call_reward),
    "d2o": LossSpec(d2o.d2o_loss, data="negatives", needs_ref=True, call=_call_d2o),
    "grao": LossSpec(grao.grao_loss, data="groups", needs_ref=False, call=_call_grao),
    "aft": LossSpec(aft.aft_loss, data="ranked", needs_ref=False, call=_call_aft),
    "ofs_dpo": LossSpec(ofs.ofs_dpo_loss, data="pairwise", needs_ref=True, call=_call_ofs,
                        init_state=ofs.ofs_init_state, modules=("fast", "slow")),
}

# Each built-in loss's hyperparameter ranges (beta <= 0 trains a constant or reverses
# the preference; label smoothing of 0.5 or more flips which response is preferred).
_BOUNDS = {
    "dpo": {"beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "rpo_alpha": "[0, inf)"},
    "ln_dpo": {"beta": "(0, inf)"},
    "bco": {"beta": "(0, inf)", "min_density_ratio": "(0, inf)",
            "max_density_ratio": "(0, inf)"},
    "d2o": {"beta": "(0, inf)", "alpha": "[0, inf)"},
    "grao": {"beta": "[0, inf)", "lam": "[0, inf)", "std_eps": "(0, inf)"},
    "aft": {"vft_weight": "[0, inf)"},
    "kto": {"beta": "(0, inf)", "desirable_weight": "(0, inf)",
            "undesirable_weight": "(0, inf)"},
    "apo_zero_unpaired": {"beta": "(0, inf)", "desirable_weight": "(0, inf)",
                          "undesirable_weight": "(0, inf)"},
    "reward_model": {"center_rewards_coefficient": "[0, inf)"},
    "ofs_dpo": {"beta": "(0, inf)", "fs_beta": "(0, inf)", "alpha": "[0, inf)",
                "swap_interval": "[1, inf)"},
}
LOSSES = {name: (dataclasses.replace(spec, hparam_bounds=_BOUNDS[name])
                 if name in _BOUNDS and not spec.hparam_bounds else spec)
          for name, spec in LOSSES.items()}


def get(name: str) -> LossSpec:
  """The registry entry for `name`; KeyError lists the known names."""
  try:
    return LOSSES[name]
  except KeyError:
    raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None
