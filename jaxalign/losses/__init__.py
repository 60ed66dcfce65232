"""The loss registry: a loss name -> its pure function and what it needs.

A built-in method is one file in this package plus one entry in `LOSSES`. A
researcher's own loss needs no edit here: a function decorated with
`register(data=..., needs_ref=...)` in any file is named in the config as
`"path/to/file.py:function"` or `"package.module:function"` (see `get`, and
losses/README.md at the top of the repository). The trainer reads `LossSpec`
to know the data format (which fixes the sequences per example that go
through the forward), whether reference log-probs are needed and whether the
loss carries running state; it never changes per loss.

Everything that finds a loss by name (config validation, train, plan, online,
resume, export, generate) goes through `get`.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

import jax.numpy as jnp

from jaxalign import guards

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
      COLUMNS in jaxalign/losses/columns.py says what each is).
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
  # The name messages and the progress bar show (the registry key, or the
  # decorated function's name).
  name: str = ""
  # "policy": the one train step on the LM's sequence log-probs; "reward_model":
  # a scalar-head model with its own trainer (jaxalign/train/reward.py).
  trainer: str = "policy"
  # Where a registered loss comes from ("module.qualname"; "" for built-ins).
  origin: str = ""
  # The online sampling scheme the loss's data can be generated with inside the run
  # (jaxalign/train/online.py): "grao" (rewarded groups every step), "d2o" (self-
  # generated negatives), or None (offline data only).
  online: str | None = None
  # Columns `prepare` adds to every example: name -> (per-example shape, dtype), so
  # `jaxalign plan` lays out the same batch as the run.
  prepared_columns: dict[str, tuple[tuple[int, ...], Any]] = dataclasses.field(
      default_factory=dict)

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


# Keyword binding: each data format's [B, S] sequences, by argument name. A prefix
# names a sequence (an index) or a group of them (a slice); each gets
# <prefix>logps, <prefix>lengths, ref_<prefix>logps (with a reference) and
# <prefix><column> / ref_<prefix><column> for the step's extra columns.
# Sequence order per format is jaxalign/data/tokenize.py's.
KEYWORD_SEQUENCES: dict[str, dict[str, int | slice]] = {
    "sft": {"": 0},
    "pairwise": {"chosen_": 0, "rejected_": 1},
    "unpaired": {"": 0},
    "unpaired_kl": {"": 0, "kl_": 1},          # 1: the mismatched KL sequence
    "negatives": {"rejected_": 0, "group_": slice(1, None)},   # 0: the human negative
    "groups": {"answer_": 0, "group_": slice(1, None)},        # 0: the reference answer
    "ranked": {"answer_": 0, "group_": slice(1, None)},        # 0: the reference CoT
}
# Argument name -> batch column, per format (absent optional columns bind None).
KEYWORD_BATCH: dict[str, dict[str, str]] = {
    "sft": {},
    "pairwise": {"margin": "margin"},
    "unpaired": {"labels": "label"},
    "unpaired_kl": {"labels": "label"},
    "negatives": {"group_mask": "group_mask"},
    "groups": {"group_mask": "group_mask", "group_rewards": "rewards",
               "answer_rewards": "answer_rewards"},
    "ranked": {"group_mask": "group_mask", "labels": "labels", "ranks": "ranks",
               "has_reference": "has_reference"},
}
FORMATS = tuple(KEYWORD_SEQUENCES)


def keyword_names(data: str, *, with_ref: bool) -> tuple[str, ...]:
  """The argument names a loss on `data` can be given (without the step's extra columns)."""
  names = []
  for prefix in KEYWORD_SEQUENCES[data]:
    names += [f"{prefix}logps", f"{prefix}lengths"] + ([f"ref_{prefix}logps"] if with_ref else [])
  names += list(KEYWORD_BATCH[data])
  if data == "ranked":
    names.append("is_positive")
  return tuple(names)


def keyword_arrays(data: str, x: LossInputs) -> dict:
  """`x` by argument name for a loss on `data`; reference ones only when there is one."""
  out = {}
  for prefix, i in KEYWORD_SEQUENCES[data].items():
    out[f"{prefix}logps"] = x.logps[:, i]
    out[f"{prefix}lengths"] = x.lengths[:, i]
    if x.ref_logps is not None:
      out[f"ref_{prefix}logps"] = x.ref_logps[:, i]
    for ref, cols in (("", x.columns), ("ref_", x.ref_columns)):
      for name, col in (cols or {}).items():
        out[f"{ref}{prefix}{name}"] = col[:, i]
  for name, column in KEYWORD_BATCH[data].items():
    out[name] = x.batch.get(column)
  if data == "ranked":
    labels, ranks = x.batch.get("labels"), x.batch.get("ranks")
    out["is_positive"] = labels if labels is not None else (
        None if ranks is None else ranks == 1)
  return out


def _pairwise_arrays(x: LossInputs) -> dict:
  """The pairwise inputs by argument name; reference ones only when there is a reference."""
  return keyword_arrays("pairwise", x)


_PAIRWISE_NAMES = frozenset({"chosen_logps", "rejected_logps", "ref_chosen_logps",
                             "ref_rejected_logps", "chosen_lengths", "rejected_lengths"})


def _positional_names(fn: Callable) -> tuple[tuple[str, bool], ...]:
  """(name, required) of `fn`'s positional parameters."""
  return tuple((p.name, p.default is inspect.Parameter.empty)
               for p in inspect.signature(fn).parameters.values()
               if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                             inspect.Parameter.POSITIONAL_OR_KEYWORD))


def _bind_by_name(fn, data: str, x: LossInputs, hparams: dict):
  """Calls `fn` with the arrays its positional parameters name, and `hparams`."""
  arrays = keyword_arrays(data, x)
  kwargs = {}
  for name, required in _positional_names(fn):
    if arrays.get(name) is not None:
      kwargs[name] = arrays[name]
    elif required:
      why = (" (the step computes no reference log-probs for a loss registered with "
             "needs_ref=False)" if name.startswith("ref_") and x.ref_logps is None else "")
      raise ValueError(f"{data} loss {getattr(fn, '__name__', fn)!r} needs {name!r}, "
                       f"which the step does not provide{why}")
  return fn(**kwargs, **hparams)


@_stateless
def _call_pairwise(fn, x: LossInputs, **hparams):
  """Pairwise adapter by argument name: a loss takes what its signature names.

  Reference-free losses (no ref_* parameters, needs_ref=False) get no reference
  arrays, and none is computed for them; a loss that names a reference argument
  without one gets a one-line error at trace time.
  """
  names = _positional_names(fn)
  if not any(name in _PAIRWISE_NAMES for name, _ in names):
    # A signature in other words: the historical positional order.
    if x.ref_logps is None:
      raise ValueError(f"pairwise loss {getattr(fn, '__name__', fn)!r} takes positional "
                       "reference log-probs, but the step computes none for a loss "
                       "registered with needs_ref=False; name its arguments chosen_logps, "
                       "rejected_logps, chosen_lengths, rejected_lengths to go without")
    return fn(x.logps[:, 0], x.logps[:, 1], x.ref_logps[:, 0], x.ref_logps[:, 1],
              x.lengths[:, 0], x.lengths[:, 1], **hparams)
  return _bind_by_name(fn, "pairwise", x, hparams)


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
                    columns=dpo.dpo_columns, check_hparams=dpo.check_hparams),
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
                    init_state=bco.init_bco_state, prepare=bco.prepare_udm,
                    prepared_columns={"udm_weights": ((), jnp.float32)}),
    "kto": LossSpec(kto.kto_loss, data="unpaired_kl", needs_ref=True, call=_call_kto),
    "apo_zero_unpaired": LossSpec(kto.apo_zero_unpaired_loss, data="unpaired", needs_ref=True,
                                  call=_call_unpaired),
    # Bradley-Terry reward-model training: its own trainer (jaxalign/train/reward.py)
    # scores sequences with the scalar head, not the LM log-probs of the train step.
    "reward_model": LossSpec(reward.bradley_terry_loss, data="pairwise", needs_ref=False,
                             call=_call_reward, trainer="reward_model"),
    "d2o": LossSpec(d2o.d2o_loss, data="negatives", needs_ref=True, call=_call_d2o,
                    online="d2o"),
    "grao": LossSpec(grao.grao_loss, data="groups", needs_ref=False, call=_call_grao,
                     online="grao"),
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
LOSSES = {name: dataclasses.replace(
    spec, name=name,
    hparam_bounds=spec.hparam_bounds or _BOUNDS.get(name, {}))
          for name, spec in LOSSES.items()}


# ------------------------------------------------------------------------------
# Losses a researcher writes in their own file.

class LossLookupError(KeyError):
  """config.loss.name names no loss: unknown, not importable, or not a registered loss."""

  def __str__(self):  # one plain line (KeyError-style quoting would add quotes)
    return str(self.args[0]) if self.args else ""


# register(...) entries by name, for losses defined in code the process imported.
REGISTERED: dict[str, LossSpec] = {}
_ATTR = "loss_spec"      # the LossSpec a decorated function carries
_ONLINE_FOR = {"groups": "grao", "negatives": "d2o"}


def _check_user_loss(fn: Callable, data: str, needs_ref: bool, ranges: dict) -> None:
  """Raises ValueError for a signature the keyword adapter cannot feed."""
  label = getattr(fn, "__qualname__", repr(fn))
  if data not in FORMATS:
    raise ValueError(f"register(data={data!r}) for {label}: the data format must be one "
                     f"of {list(FORMATS)}")
  params = inspect.signature(fn).parameters.values()
  if any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
         for p in params):
    raise ValueError(f"{label}: name each input (no *args / **kwargs), so they can be "
                     "bound by name")
  available = keyword_names(data, with_ref=True)
  for name, _ in _positional_names(fn):
    if name not in available:
      raise ValueError(f"{label}: argument {name!r} is not a {data} column; a {data} loss "
                       f"takes any of {list(available)} (hyperparameters go after '*')")
    if name.startswith("ref_") and not needs_ref:
      raise ValueError(f"{label}: takes {name!r} but is registered with needs_ref=False "
                       "(no reference pass is computed); drop the argument or set "
                       "needs_ref=True")
  hparams = _keyword_only(fn, exclude=())
  for key, interval in ranges.items():
    if key not in hparams:
      raise ValueError(f"{label}: ranges names {key!r}, which is not a keyword-only "
                       f"hyperparameter (those are {list(hparams)})")
    guards.parse_interval(interval)


def register(fn: Callable | None = None, *, data: str, needs_ref: bool = True,
             name: str | None = None, ranges: dict[str, str] | None = None,
             check: Callable[[dict], tuple[str, str] | None] | None = None):
  """Makes a pure function a loss jaxalign trains with, without editing jaxalign.

    @register(data="pairwise", needs_ref=True, ranges={"beta": "(0, inf)"})
    def my_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                *, beta: float = 0.1):
      ...
      return loss, metrics        # a scalar and a dict of scalars

  and `config.loss.name = "path/to/file.py:my_loss"` (or "package.module:my_loss").

  The positional arguments are bound by name from the batch (`keyword_names(data,
  with_ref=...)` lists them: pairwise chosen_logps, rejected_logps,
  ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths;
  sft logps, lengths; unpaired logps, ref_logps, labels; groups group_logps,
  group_mask, group_rewards, answer_logps, ...), each [B] or [B, G]. The
  keyword-only arguments are hyperparameters, set from `config.loss.hparams`.

  Args:
    data: the record format the loss reads (one of FORMATS).
    needs_ref: False: no reference pass is computed and no reference log-probs
      are stored; the function must then take no ref_* argument.
    name: the name shown in logs, and under which `get(name)` finds it once its
      module is imported (default: the function's name). A built-in loss's name
      is refused.
    ranges: hyperparameter -> allowed interval ("(0, inf)", "[0, 1]"), checked
      before compiling like the built-ins' bounds.
    check: hparams -> (key, problem) or None, for settings that are not a number
      in an interval; checked before compiling.

  Raises:
    ValueError: for a signature the batch cannot feed, a taken name, bad ranges.
  """
  def wrap(fn: Callable) -> Callable:
    key = name or fn.__name__
    if key in LOSSES:
      raise ValueError(f"register: {key!r} is a built-in loss; give your loss another "
                       "name (register(..., name=...))")
    _check_user_loss(fn, data, needs_ref, dict(ranges or {}))
    origin = f"{fn.__module__}.{fn.__qualname__}"
    taken = REGISTERED.get(key)
    if taken is not None and taken.origin != origin:
      raise ValueError(f"register: the name {key!r} is already taken by {taken.origin}; "
                       "give this loss another name (register(..., name=...))")
    spec = LossSpec(fn, data=data, needs_ref=needs_ref, call=_keyword_call(data),
                    hparam_bounds=dict(ranges or {}), check_hparams=check, name=key,
                    online=_ONLINE_FOR.get(data), origin=origin)
    REGISTERED[key] = spec
    setattr(fn, _ATTR, spec)
    return fn
  return wrap if fn is None else wrap(fn)


def _keyword_call(data: str) -> Callable:
  @_stateless
  def call(fn, x: LossInputs, **hparams):
    out = _bind_by_name(fn, data, x, hparams)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
      raise ValueError(f"loss {getattr(fn, '__name__', fn)!r} must return (loss, metrics) "
                       f"with metrics a dict; got {type(out).__name__}")
    return out
  return call


def _is_path(target: str) -> bool:
  return target.endswith(".py") or "/" in target or os.sep in target


def canonical_name(name: str) -> str:
  """`name` as a run records it: a file reference with its path made absolute
  (relative paths resolve against the working directory), anything else unchanged."""
  target, sep, attr = str(name).rpartition(":")
  if sep and target and _is_path(target):
    return f"{os.path.abspath(os.path.expanduser(target))}:{attr}"
  return name


_FILE_MODULES: dict[tuple[str, int, int], Any] = {}


def _import_file(path: str):
  """The module of the .py file `path` (imported once per file version)."""
  st = os.stat(path)
  key = (path, st.st_mtime_ns, st.st_size)
  if key in _FILE_MODULES:
    return _FILE_MODULES[key]
  stem = os.path.splitext(os.path.basename(path))[0]
  mod_name = f"_jaxalign_loss_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"
  spec = importlib.util.spec_from_file_location(mod_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[mod_name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(mod_name, None)
    raise
  _FILE_MODULES[key] = module
  return module


def _one_line(e: BaseException) -> str:
  if isinstance(e, SyntaxError):
    return f"{e.filename}:{e.lineno}: {e.msg}"
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load(ref: str) -> LossSpec:
  """The LossSpec of "path/to/file.py:function" or "package.module:function"."""
  target, _, attr = ref.rpartition(":")
  if not target or not attr.isidentifier():
    raise LossLookupError(f"{ref!r}: write 'path/to/file.py:function' or "
                          "'package.module:function'")
  if _is_path(target):
    path = os.path.abspath(os.path.expanduser(target))
    if not os.path.isfile(path):
      raise LossLookupError(f"{ref!r}: no such file {path}")
    where = path
    try:
      module = _import_file(path)
    except Exception as e:  # noqa: BLE001  the user's file: any error becomes one line
      raise LossLookupError(f"{ref!r}: cannot import {path}: {_one_line(e)}") from None
  else:
    where = f"module {target}"
    try:
      module = importlib.import_module(target)
    except Exception as e:  # noqa: BLE001
      raise LossLookupError(f"{ref!r}: cannot import module {target!r}: {_one_line(e)} "
                            "(a file path ending in .py needs no installing)") from None
  if not hasattr(module, attr):
    raise LossLookupError(f"{ref!r}: {where} has no function {attr!r}")
  spec = getattr(getattr(module, attr), _ATTR, None)
  if not isinstance(spec, LossSpec):
    raise LossLookupError(f"{ref!r}: {attr} is not a registered loss; decorate it with "
                          "@jaxalign.losses.register(data=..., needs_ref=...)")
  return spec


def get(name: str) -> LossSpec:
  """The loss `name` names: a built-in, "path/to/file.py:function",
  "package.module:function", or a name registered in this process.

  Raises:
    LossLookupError (a KeyError): one line saying what is wrong with `name`.
  """
  if name in LOSSES:
    return LOSSES[name]
  if ":" in str(name):
    return _load(str(name))
  if name in REGISTERED:
    return REGISTERED[name]
  raise LossLookupError(f"unknown loss {name!r}; known: {sorted(LOSSES)}, or your own as "
                        "'path/to/file.py:function' / 'package.module:function'")
