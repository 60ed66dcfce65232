"""`register`: the one way a loss becomes trainable, built-in or a researcher's own.

A loss is a pure function: its positional parameters are per-sequence arrays and
batch columns, bound BY NAME from the data format's table
(jaxalign/data/schema.py); its keyword-only parameters are hyperparameters. The
built-in losses are registered with the same decorator in their own files
(jaxalign/losses/*.py), which places them in `LOSSES`; a researcher's loss lands in
`REGISTERED` and is named in a config as "path/to/file.py:function".

Argument names, for each sequence prefix p of the format (schema.Format.sequences):
  p + "logps", p + "lengths", "ref_" + p + "logps"          the LM head
  m + "_" + p + "logps" for each LoRA module m               register(modules=...)
  p + "scores"                                               register(head="scalar")
  p + c, "ref_" + p + c for each step column c               register(columns=...)
plus the format's batch columns by their argument names (Column.arg), its derived
arguments (ranked: is_positive) and the loss's prepared columns.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from jaxalign import guards
from jaxalign.data import schema


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What the step hands a loss, per example b and sequence s.

  Attributes:
    logps: [B, S] summed policy log-probs of each sequence's scored tokens (with
      LoRA modules, each module's [B, S] block side by side: [B, M * S]; with a
      scalar head, the model's [B, S] scores).
    ref_logps: [B, S] the same under the reference model; None if not needed.
    lengths: [B, S] scored-token counts (0 for padding sequences); None with a
      scalar head.
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


HEADS = ("lm", "scalar")
# register(online=...) default: the format's own online scheme, if it has one.
ONLINE_OF_FORMAT = {"groups": "grao", "negatives": "d2o"}
_FROM_FORMAT = "format"


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How the train step feeds one loss (made by `register`).

  Attributes:
    fn: the pure loss function.
    data: the record format it consumes (a name in schema.FORMATS).
    needs_ref: whether reference log-probs are an input.
    init_state: () -> the loss's running state; None for stateless losses.
      A stateful loss takes `state=` and returns (loss, metrics, new_state).
    prepare: host-side step run once before training, adding columns to the
      tokenized examples: prepare(examples, *, prompt_embeddings, seed,
      **options) -> examples, where `prompt_embeddings()` lazily returns the
      reference model's mean-pooled prompt hidden states [N, D]. Its keyword
      options come from `config.loss.options`.
    modules: names of the LoRA adapters the loss trains side by side on one
      frozen base (OFS-DPO: ("fast", "slow")), each with its own forward and
      optimizer; `inputs.logps` then holds the modules' [B, S] blocks side by
      side, bound as `<module>_<prefix>logps`. () for one policy.
    hparam_bounds: hyperparameter -> allowed interval ("(0, inf)", "[0, 0.5)"),
      checked before compiling by jaxalign.guards; names not listed are unchecked.
    columns: hparams -> names of extra per-sequence columns the step must
      compute from token log-probs for these hyperparameters (e.g. LD-DPO's
      "tail_logps"); they arrive in `LossInputs.columns` / `ref_columns`.
    check_hparams: hparams -> (key, problem) for a setting that is not a number
      in an interval (e.g. an unknown variant name), or None; checked before
      compiling.
    name: the name messages and the progress bar show.
    head: "lm": the train step's sequence log-probs; "scalar": a scalar-head
      model's per-sequence scores, bound as `<prefix>scores` (its own trainer,
      jaxalign/train/reward.py).
    origin: where a researcher's loss comes from ("module.qualname"; "" for built-ins).
    online: the online sampling scheme the loss's data can be generated with inside
      the run (jaxalign/train/online.py): "grao" (rewarded groups every step),
      "d2o" (self-generated negatives), or None (offline data only).
    prepared_columns: columns `prepare` adds to every example: name -> (per-example
      shape, dtype), so `jaxalign plan` lays out the same batch as the run; each
      binds to the loss argument of its name.
  """
  fn: Callable
  data: str
  needs_ref: bool
  init_state: Callable[[], Any] | None = None
  prepare: Callable | None = None
  modules: tuple[str, ...] = ()
  hparam_bounds: dict[str, str] = dataclasses.field(default_factory=dict)
  columns: Callable[[dict], tuple[str, ...]] | None = None
  check_hparams: Callable[[dict], tuple[str, str] | None] | None = None
  name: str = ""
  head: str = "lm"
  origin: str = ""
  online: str | None = None
  prepared_columns: dict[str, tuple[tuple[int, ...], Any]] = dataclasses.field(
      default_factory=dict)

  @property
  def trainer(self) -> str:
    """"reward_model" for a scalar head (its own trainer), else "policy"."""
    return "reward_model" if self.head == "scalar" else "policy"

  def call(self, fn: Callable, inputs: LossInputs, state, **hparams):
    """`fn` on `inputs`, its arguments bound by name: -> (loss, metrics, new_state).

    A stateless loss's `state` is passed through unchanged.

    Raises:
      ValueError: `fn` asks for an argument the step does not provide, or (a
        stateless loss) returns something other than (loss, metrics).
    """
    kwargs = bind(fn, self, inputs)
    if self.init_state is not None:
      return fn(**kwargs, state=state, **hparams)
    out = fn(**kwargs, **hparams)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
      raise ValueError(f"loss {getattr(fn, '__name__', fn)!r} must return (loss, metrics) "
                       f"with metrics a dict; got {type(out).__name__}")
    return out[0], out[1], state

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

  def argument_names(self) -> tuple[str, ...]:
    """Every array argument a loss of this spec can be given (without step columns)."""
    return keyword_names(self.data, with_ref=self.needs_ref, head=self.head,
                         modules=self.modules, prepared=tuple(self.prepared_columns))


def _keyword_only(fn: Callable, exclude: tuple[str, ...]) -> tuple[str, ...]:
  params = inspect.signature(fn).parameters.values()
  return tuple(p.name for p in params
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in exclude)


def _positional_names(fn: Callable) -> tuple[tuple[str, bool], ...]:
  """(name, required) of `fn`'s positional parameters."""
  return tuple((p.name, p.default is inspect.Parameter.empty)
               for p in inspect.signature(fn).parameters.values()
               if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                             inspect.Parameter.POSITIONAL_OR_KEYWORD))


# --- the names of a format's arrays ---------------------------------------------------

def keyword_names(data: str, *, with_ref: bool, head: str = "lm", modules: tuple[str, ...] = (),
                  prepared: tuple[str, ...] = ()) -> tuple[str, ...]:
  """The argument names a loss on `data` can be given (without the step's extra columns)."""
  f = schema.get(data)
  names = []
  for prefix in f.sequences:
    if head == "scalar":
      names.append(f"{prefix}scores")
      continue
    names += [f"{m}_{prefix}logps" for m in modules] or [f"{prefix}logps"]
    names.append(f"{prefix}lengths")
    if with_ref:
      names.append(f"ref_{prefix}logps")
  return tuple(names) + tuple(f.arguments()) + tuple(f.derived) + tuple(prepared)


def keyword_arrays(data: str, x: LossInputs, *, head: str = "lm",
                   modules: tuple[str, ...] = (), prepared: tuple[str, ...] = ()) -> dict:
  """`x` by argument name for a loss on `data`; reference ones only when there is one."""
  f = schema.get(data)
  out = {}

  def per_sequence(values, name: str, lead: str = ""):
    for prefix, i in f.sequences.items():
      out[f"{lead}{prefix}{name}"] = values[:, i]

  if head == "scalar":
    per_sequence(x.logps, "scores")
  elif modules:
    s = x.logps.shape[1] // len(modules)
    for k, m in enumerate(modules):
      per_sequence(x.logps[:, k * s:(k + 1) * s], "logps", f"{m}_")
  else:
    per_sequence(x.logps, "logps")
  if x.lengths is not None:
    per_sequence(x.lengths, "lengths")
  if x.ref_logps is not None:
    per_sequence(x.ref_logps, "logps", "ref_")
  for lead, cols in (("", x.columns), ("ref_", x.ref_columns)):
    for name, col in (cols or {}).items():
      per_sequence(col, name, lead)
  for arg, column in f.arguments().items():
    out[arg] = x.batch.get(column)
  for arg, derive in f.derived.items():
    out[arg] = derive(x.batch)
  for name in prepared:
    out[name] = x.batch.get(name)
  return out


def bind(fn: Callable, spec: LossSpec, x: LossInputs) -> dict:
  """The arrays `fn`'s positional parameters name, by name (what `LossSpec.call` passes).

  Raises:
    ValueError: a required parameter names an array the step does not provide.
  """
  arrays = keyword_arrays(spec.data, x, head=spec.head, modules=spec.modules,
                          prepared=tuple(spec.prepared_columns))
  kwargs = {}
  for name, required in _positional_names(fn):
    if arrays.get(name) is not None:
      kwargs[name] = arrays[name]
    elif required:
      why = (" (the step computes no reference log-probs for a loss registered with "
             "needs_ref=False)" if name.startswith("ref_") and x.ref_logps is None else "")
      raise ValueError(f"{spec.data} loss {getattr(fn, '__name__', fn)!r} needs {name!r}, "
                       f"which the step does not provide{why}")
  return kwargs


# --- register ----------------------------------------------------------------------

# Built-in losses (registered from jaxalign.losses' own modules) and researchers' ones.
LOSSES: dict[str, LossSpec] = {}
REGISTERED: dict[str, LossSpec] = {}
ATTR = "loss_spec"      # the LossSpec a decorated function carries
_BUILTIN_PACKAGE = "jaxalign.losses."


def one_of(key: str, allowed: tuple[str, ...], default: str):
  """A `check=` for one string setting that must be one of `allowed`."""
  def check(hparams: dict):
    value = hparams.get(key, default)
    if value not in allowed:
      return key, f"must be one of {list(allowed)}, got {value!r}"
    return None
  return check


def _check_signature(fn: Callable, spec: LossSpec, has_columns: bool) -> None:
  """Raises ValueError for a signature the binder cannot feed."""
  label = getattr(fn, "__qualname__", repr(fn))
  if spec.data not in schema.FORMATS:
    raise ValueError(f"register(data={spec.data!r}) for {label}: the data format must be one "
                     f"of {list(schema.FORMATS)}")
  if spec.head not in HEADS:
    raise ValueError(f"register(head={spec.head!r}) for {label}: must be one of {list(HEADS)}")
  params = inspect.signature(fn).parameters
  if any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
         for p in params.values()):
    raise ValueError(f"{label}: name each input (no *args / **kwargs), so they can be "
                     "bound by name")
  available = keyword_names(spec.data, with_ref=True, head=spec.head, modules=spec.modules,
                            prepared=tuple(spec.prepared_columns))
  for name, required in _positional_names(fn):
    # A step column (register(columns=...)) is bound only when the hyperparameters
    # ask for it, so such an argument must have a default.
    if name not in available and not (has_columns and not required):
      raise ValueError(f"{label}: argument {name!r} is not a {spec.data} column; a "
                       f"{spec.data} loss takes any of {list(available)} (hyperparameters "
                       "go after '*')")
    if name.startswith("ref_") and not spec.needs_ref:
      raise ValueError(f"{label}: takes {name!r} but is registered with needs_ref=False "
                       "(no reference pass is computed); drop the argument or set "
                       "needs_ref=True")
  if spec.init_state is not None and "state" not in _keyword_only(fn, exclude=()):
    raise ValueError(f"{label}: registered with init_state, so it must take a keyword-only "
                     "'state' and return (loss, metrics, new_state)")
  hparams = _keyword_only(fn, exclude=())
  for key, interval in spec.hparam_bounds.items():
    if key not in hparams:
      raise ValueError(f"{label}: ranges names {key!r}, which is not a keyword-only "
                       f"hyperparameter (those are {list(hparams)})")
    guards.parse_interval(interval)


def _origin(fn: Callable) -> str:
  return f"{fn.__module__}.{fn.__qualname__}"


def register(fn: Callable | None = None, *, data: str, needs_ref: bool = True,
             name: str | None = None, ranges: dict[str, str] | None = None,
             check: Callable[[dict], tuple[str, str] | None] | None = None,
             init_state: Callable[[], Any] | None = None, prepare: Callable | None = None,
             prepared_columns: dict[str, tuple[tuple[int, ...], Any]] | None = None,
             modules: tuple[str, ...] = (), online: str | None = _FROM_FORMAT,
             head: str = "lm", columns: Callable[[dict], tuple[str, ...]] | None = None):
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
    data: the record format the loss reads (one of schema.FORMATS).
    needs_ref: False: no reference pass is computed and no reference log-probs
      are stored; the function must then take no ref_* argument.
    name: the name shown in logs, and under which `get(name)` finds it once its
      module is imported (default: the function's name). A built-in loss's name
      is refused.
    ranges: hyperparameter -> allowed interval ("(0, inf)", "[0, 1]"), checked
      before compiling like the built-ins' bounds.
    check: hparams -> (key, problem) or None, for settings that are not a number
      in an interval; checked before compiling.
    init_state: () -> the loss's running state: the loss then takes `state=` and
      returns (loss, metrics, new_state).
    prepare, prepared_columns: a host-side step adding per-example columns before
      training, and those columns (LossSpec.prepare, LossSpec.prepared_columns).
    modules: LoRA modules trained side by side (LossSpec.modules).
    online: the online sampling scheme (LossSpec.online); default: the format's own.
    head: "lm" or "scalar" (LossSpec.head).
    columns: hparams -> step columns to compute (LossSpec.columns); arguments
      naming them must have defaults.

  Raises:
    ValueError: for a signature the batch cannot feed, a taken name, bad ranges.
  """
  def wrap(fn: Callable) -> Callable:
    key = name or fn.__name__
    origin = _origin(fn)
    builtin = fn.__module__.startswith(_BUILTIN_PACKAGE)
    if key in LOSSES and not builtin:
      raise ValueError(f"register: {key!r} is a built-in loss; give your loss another "
                       "name (register(..., name=...))")
    table = LOSSES if builtin else REGISTERED
    taken = table.get(key)
    if taken is not None and _origin(taken.fn) != origin:
      raise ValueError(f"register: the name {key!r} is already taken by "
                       f"{_origin(taken.fn)}; give this loss another name "
                       "(register(..., name=...))")
    spec = LossSpec(
        fn, data=data, needs_ref=needs_ref, init_state=init_state, prepare=prepare,
        modules=tuple(modules), hparam_bounds=dict(ranges or {}), columns=columns,
        check_hparams=check, name=key, head=head, origin="" if builtin else origin,
        online=ONLINE_OF_FORMAT.get(data) if online == _FROM_FORMAT else online,
        prepared_columns=dict(prepared_columns or {}))
    _check_signature(fn, spec, has_columns=columns is not None)
    table[key] = spec
    setattr(fn, ATTR, spec)
    return fn
  return wrap if fn is None else wrap(fn)
