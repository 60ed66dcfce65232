"""Guards: config values checked before compiling, and a divergence guard while training.

`check_config_values` runs inside `config.validate` and raises ConfigError
naming the key for: a NaN or infinite float anywhere in the config, a loss
hyperparameter outside the interval its LossSpec declares (`hparam_bounds`), an
optimizer value outside its range, and a divergence threshold that cannot work.

`DivergenceGuard` watches the metrics the loop fetches at each log step and
stops a run whose loss, gradient norm or parameter norm blows up while staying
finite (the non-finite guard catches the rest): the loss against the median of
the recent logged losses, the gradient norm against the median of the recent
gradient norms, the parameter norm against the first one logged in this
process. Thresholds live in `config.divergence`; the defaults are far from
what any bundled demo or recipe reaches (see docs/reliability.md).
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Mapping

import numpy as np

from jaxalign.errors import ConfigError, DivergenceError

_INTERVAL = re.compile(r"^\s*([\[(])\s*([-+]?(?:inf|[0-9.eE+-]+))\s*,\s*"
                       r"([-+]?(?:inf|[0-9.eE+-]+))\s*([\])])\s*$")


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
  """'(0, inf)' -> (lo, hi, lo_closed, hi_closed); raises ValueError on bad notation."""
  m = _INTERVAL.match(text)
  if not m:
    raise ValueError(f"bad interval {text!r}; write e.g. '(0, inf)' or '[0, 0.5)'")
  return float(m.group(2)), float(m.group(3)), m.group(1) == "[", m.group(4) == "]"


def in_interval(value: float, text: str) -> bool:
  lo, hi, lo_closed, hi_closed = parse_interval(text)
  above = value >= lo if lo_closed else value > lo
  below = value <= hi if hi_closed else value < hi
  return above and below


def _fail(key: str, problem: str):
  raise ConfigError(f"config.{key}: {problem}")


def _walk(node: Any, prefix: str):
  """(dotted key, value) of every leaf, tuple/list items as key[i]."""
  if isinstance(node, Mapping):
    for k, v in node.items():
      yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
  elif isinstance(node, (list, tuple)):
    for i, v in enumerate(node):
      yield from _walk(v, f"{prefix}[{i}]")
  else:
    yield prefix, node


def check_finite(config_dict: Mapping) -> None:
  """Every float in the config is finite (NaN and +-inf are never a usable setting)."""
  for key, value in _walk(config_dict, ""):
    if isinstance(value, float) and not math.isfinite(value):
      _fail(key, f"must be a finite number, got {value}")


# Optimizer ranges: key -> (interval, what it means).
OPTIM_BOUNDS = {
    "b1": ("[0, 1)", "Adam's first-moment decay"),
    "b2": ("[0, 1)", "Adam's second-moment decay"),
    "eps": ("(0, inf)", "Adam's epsilon"),
    "weight_decay": ("[0, inf)", "decoupled weight decay"),
    "min_lr_ratio": ("[0, 1]", "the final learning rate / optim.lr"),
    "clip_norm": ("[0, inf)", "global-norm clipping threshold; 0 turns clipping off"),
}


def check_loss_hparams(name: str, spec, hparams: Mapping) -> None:
  """Each hyperparameter with a declared interval lies inside it (None means unset)."""
  bounds = getattr(spec, "hparam_bounds", None) or {}
  for key, interval in bounds.items():
    if key not in hparams or hparams[key] is None:
      continue
    value = hparams[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(f"loss.hparams.{key}", f"must be a number in {interval} for {name!r}, "
            f"got {value!r}")
    if not in_interval(float(value), interval):
      _fail(f"loss.hparams.{key}", f"must be in {interval} for {name!r}, got {value!r}")
  check = getattr(spec, "check_hparams", None)
  problem = check(dict(hparams)) if check is not None else None
  if problem is not None:
    _fail(f"loss.hparams.{problem[0]}", problem[1])


def check_optim(optim) -> None:
  for key, (interval, meaning) in OPTIM_BOUNDS.items():
    if key in optim and not in_interval(float(optim[key]), interval):
      _fail(f"optim.{key}", f"must be in {interval} ({meaning}), got {optim[key]!r}")
  warmup = optim.warmup_steps
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    _fail("optim.warmup_steps", f"must be an int >= 0, got {warmup!r}")


def divergence_defaults():
  """config.divergence: on by default, with thresholds no sane run reaches."""
  import ml_collections
  d = ml_collections.ConfigDict()
  d.enabled = True
  # The median of the last `window` logged values is the baseline; nothing is
  # judged before `min_history` values are logged.
  d.window = 20
  d.min_history = 5
  # Stop when loss > median + loss_spike * max(|median|, 1): with the default 50
  # a DPO loss (starts at ln 2) must pass ~50, an SFT loss 50x its recent median.
  d.loss_spike = 50.0
  # Stop when grad_norm (before clipping) > grad_norm_spike * median grad norm.
  d.grad_norm_spike = 1000.0
  # Stop when param_norm > param_norm_growth * the first param_norm logged.
  d.param_norm_growth = 10.0
  return d


def check_divergence_config(config) -> None:
  d = config.get("divergence")
  if d is None:
    return
  if not isinstance(d.enabled, bool):
    _fail("divergence.enabled", f"must be True or False, got {d.enabled!r}")
  for key in ("window", "min_history"):
    if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 1:
      _fail(f"divergence.{key}", f"must be an int >= 1, got {d[key]!r}")
  if d.min_history > d.window:
    _fail("divergence.min_history", f"must be <= divergence.window ({d.window})")
  for key in ("loss_spike", "grad_norm_spike", "param_norm_growth"):
    if not d[key] > (0 if key == "loss_spike" else 1):
      _fail(f"divergence.{key}", f"must be > {0 if key == 'loss_spike' else 1}, got {d[key]!r}")


def check_config_values(config, spec) -> None:
  """All of the above; called from config.validate before anything is built."""
  check_finite(config.to_dict())
  check_loss_hparams(config.loss.name, spec, config.loss.hparams.to_dict())
  check_optim(config.optim)
  check_divergence_config(config)


class DivergenceGuard:
  """Host-side check of the logged metrics; `check` raises DivergenceError."""

  def __init__(self, *, enabled: bool = True, window: int = 20, min_history: int = 5,
               loss_spike: float = 50.0, grad_norm_spike: float = 1000.0,
               param_norm_growth: float = 10.0):
    self.enabled = enabled
    self.min_history = min_history
    self.loss_spike = loss_spike
    self.grad_norm_spike = grad_norm_spike
    self.param_norm_growth = param_norm_growth
    self._losses = collections.deque(maxlen=window)
    self._grad_norms = collections.deque(maxlen=window)
    self._first_param_norm = None

  @classmethod
  def from_config(cls, config) -> "DivergenceGuard":
    d = config.get("divergence")
    if d is None:
      return cls()
    return cls(**d.to_dict())

  def problem(self, metrics: Mapping[str, float]) -> str | None:
    """What tripped for these metrics (and records them when nothing did)."""
    if not self.enabled:
      return None
    loss = float(metrics.get("loss", float("nan")))
    grad = float(metrics.get("grad_norm", float("nan")))
    param = float(metrics.get("param_norm", float("nan")))
    if not all(math.isfinite(v) for v in (loss, grad, param)):
      return None  # the non-finite guard (or skip_nonfinite) handles these
    found = None
    if len(self._losses) >= self.min_history:
      median = float(np.median(self._losses))
      limit = median + self.loss_spike * max(abs(median), 1.0)
      if loss > limit:
        found = (f"loss {loss:.6g} > {limit:.6g} (median of the last {len(self._losses)} "
                 f"logged losses {median:.6g}, divergence.loss_spike={self.loss_spike:g})")
    if found is None and len(self._grad_norms) >= self.min_history:
      median = float(np.median(self._grad_norms))
      if median > 0 and grad > self.grad_norm_spike * median:
        found = (f"grad_norm {grad:.6g} > {self.grad_norm_spike:g} x the median "
                 f"{median:.6g} of the last {len(self._grad_norms)} (divergence.grad_norm_spike)")
    if found is None and self._first_param_norm is not None and self._first_param_norm > 0:
      if param > self.param_norm_growth * self._first_param_norm:
        found = (f"param_norm {param:.6g} > {self.param_norm_growth:g} x the first logged "
                 f"{self._first_param_norm:.6g} (divergence.param_norm_growth)")
    if found is None:
      self._losses.append(loss)
      self._grad_norms.append(grad)
      if self._first_param_norm is None:
        self._first_param_norm = param
    return found

  def check(self, step: int, metrics: Mapping[str, float], checkpointer) -> None:
    """Raises DivergenceError naming what tripped at `step` and the last good checkpoint."""
    found = self.problem(metrics)
    if found is None:
      return
    checkpointer.wait()
    good = checkpointer.latest_step()
    raise DivergenceError(
        f"divergence at step {step}: {found}; "
        + (f"last good checkpoint: step {good} in {checkpointer.directory}"
           if good is not None else "no checkpoint was written before it")
        + "; lower optim.lr, or tune/disable config.divergence")
