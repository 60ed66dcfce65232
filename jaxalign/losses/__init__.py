"""The loss registry: a loss name -> its pure function and what it needs.

A new method is one file in this package plus one entry in `LOSSES`. The
trainer reads `LossSpec` to know the data format (which fixes the sequences
per example that go through the forward), whether reference log-probs are
needed and whether the loss carries running state; it never changes per loss.
"""

import dataclasses
import inspect
from typing import Any, Callable

from jaxalign.losses import (aft, bco, cpo, d2o, dpo, grao, kto, ln_dpo, ofs, orpo, reward,
                             sft, simpo)


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What the step hands a loss adapter, per example b and sequence s.

  Attributes:
    logps: [B, S] summed policy log-probs of each sequence's scored tokens.
    ref_logps: [B, S] the same under the reference model; None if not needed.
    lengths: [B, S] scored-token counts (0 for padding sequences).
    batch: the batch's other columns ("label", "rewards", ...), [B, ...].
    columns: extra per-sequence quantities [B, S] the step computed from the
      policy's token log-probs, by name (those `LossSpec.columns` asked for;
      COLUMNS in jaxalign/train/step.py says what each is).
    ref_columns: the same under the reference model (None without one).
  """
  logps: Any
  ref_logps: Any
  lengths: Any
  batch: dict
  columns: dict = dataclasses.field(default_factory=dict)
  ref_columns: dict | None = None


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
    columns: hparams -> names of extra per-sequence columns the step must
      compute from token log-probs for these hyperparameters (e.g. LD-DPO's
      "tail_logps"); they arrive in `LossInputs.columns` / `ref_columns`.
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
  columns: Callable[[dict], tuple[str, ...]] | None = None
  # hparams -> (key, problem) for a setting that is not a number in an interval
  # (e.g. an unknown variant name), or None; checked before compiling.
  check_hparams: Callable[[dict], tuple[str, str] | None] | None = None

  def column_names(self, hparams: dict) -> tuple[str, ...]:
    """The per-token columns the step computes for `hparams` (see `columns`)."""
    return tuple(self.columns(dict(hparams))) if self.columns is not None else ()

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


def _pairwise_arrays(x: LossInputs) -> dict:
  """The pairwise inputs by argument name; reference ones only when there is a reference."""
  out = {"chosen_logps": x.logps[:, 0], "rejected_logps": x.logps[:, 1],
         "chosen_lengths": x.lengths[:, 0], "rejected_lengths": x.lengths[:, 1]}
  if x.ref_logps is not None:
    out["ref_chosen_logps"] = x.ref_logps[:, 0]
    out["ref_rejected_logps"] = x.ref_logps[:, 1]
  for prefix, cols in (("", x.columns), ("ref_", x.ref_columns)):
    for name, col in (cols or {}).items():
      out[f"{prefix}chosen_{name}"] = col[:, 0]
      out[f"{prefix}rejected_{name}"] = col[:, 1]
  return out


_PAIRWISE_NAMES = frozenset({"chosen_logps", "rejected_logps", "ref_chosen_logps",
                             "ref_rejected_logps", "chosen_lengths", "rejected_lengths"})


def _positional_names(fn: Callable) -> tuple[tuple[str, bool], ...]:
  """(name, required) of `fn`'s positional parameters."""
  return tuple((p.name, p.default is inspect.Parameter.empty)
               for p in inspect.signature(fn).parameters.values()
               if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                             inspect.Parameter.POSITIONAL_OR_KEYWORD))


@_stateless
def _call_pairwise(fn, x: LossInputs, **hparams):
  """Pairwise adapter by argument name: a loss takes what its signature names.

  Reference-free losses (no ref_* parameters, needs_ref=False) get no reference
  arrays, and none is computed for them; a loss that names a reference argument
  without one gets a one-line error at trace time.
  """
  arrays = _pairwise_arrays(x)
  names = _positional_names(fn)
  if not any(name in _PAIRWISE_NAMES for name, _ in names):
    # A signature in other words (a user's own loss): the historical positional order.
    if x.ref_logps is None:
      raise ValueError(f"pairwise loss {getattr(fn, '__name__', fn)!r} takes positional "
                       "reference log-probs, but the step computes none for a loss "
                       "registered with needs_ref=False; name its arguments chosen_logps, "
                       "rejected_logps, chosen_lengths, rejected_lengths to go without")
    return fn(x.logps[:, 0], x.logps[:, 1], x.ref_logps[:, 0], x.ref_logps[:, 1],
              x.lengths[:, 0], x.lengths[:, 1], **hparams)
  kwargs = {}
  for name, required in names:
    if name in arrays:
      kwargs[name] = arrays[name]
    elif required:
      why = (" (the step computes no reference log-probs for a loss registered with "
             "needs_ref=False)" if name.startswith("ref_") else "")
      raise ValueError(f"pairwise loss {getattr(fn, '__name__', fn)!r} needs {name!r}, "
                       f"which the step does not provide{why}")
  return fn(**kwargs, **hparams)


def _call_bco_pair(fn, x: LossInputs, state, **hparams):
  return fn(x.logps[:, 0], x.logps[:, 1], x.ref_logps[:, 0], x.ref_logps[:, 1],
            state=state, **hparams)


def _choice(key: str, allowed: tuple[str, ...], default: str):
  """check_hparams for one string setting that must be one of `allowed`."""
  def check(hparams: dict):
    value = hparams.get(key, default)
    if value not in allowed:
      return key, f"must be one of {list(allowed)}, got {value!r}"
    return None
  return check


def _dpo_columns(hparams: dict) -> tuple[str, ...]:
  """LD-DPO needs each sequence's tail log-prob, WPO its per-token weight mean."""
  cols = ()
  if hparams.get("ld_alpha") is not None:
    cols += ("tail_logps",)
  if hparams.get("use_weighting"):
    cols += ("wpo_logps",)
  return cols


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
    "dpo": LossSpec(dpo.dpo_loss, data="pairwise", needs_ref=True, call=_call_pairwise,
                    columns=_dpo_columns, check_hparams=dpo.check_hparams),
    # Paired BCO with the running reward shift (TRL <= 0.28 DPOTrainer "bco_pair";
    # the shift-free TRL >= 0.29 form is dpo variant "bco_pair").
    "bco_pair": LossSpec(bco.bco_pair_loss, data="pairwise", needs_ref=True,
                         call=_call_bco_pair, init_state=bco.init_bco_state,
                         check_hparams=_choice("shift_count", ("rewards", "batch"), "rewards")),
    # Reference-free pairwise losses: no reference forward, no ref_logps.npy.
    "cpo": LossSpec(cpo.cpo_loss, data="pairwise", needs_ref=False, call=_call_pairwise,
                    check_hparams=_choice("loss_type", cpo.LOSS_TYPES, "sigmoid")),
    "simpo": LossSpec(simpo.simpo_loss, data="pairwise", needs_ref=False,
                      call=_call_pairwise),
    "orpo": LossSpec(orpo.orpo_loss, data="pairwise", needs_ref=False, call=_call_pairwise),
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
    "dpo": {"beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "rpo_alpha": "[0, inf)",
            "ld_alpha": "[0, 1]", "discopop_tau": "(0, inf)"},
    "bco_pair": {"beta": "(0, inf)"},
    "cpo": {"beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "simpo_gamma": "[0, inf)",
            "cpo_alpha": "[0, inf)"},
    "simpo": {"beta": "(0, inf)", "gamma": "[0, inf)", "label_smoothing": "[0, 0.5)",
              "sft_weight": "[0, inf)"},
    "orpo": {"beta": "[0, inf)"},
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
