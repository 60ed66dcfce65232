"""A loss traced on an abstract batch of its format, before anything is built or written.

`check` runs the loss through `jax.eval_shape` on per-sequence inputs made of
ShapeDtypeStructs (the shapes the train step hands it: [B, S] log-probs and
counts, the format's loss columns, the loss's prepared and step columns, its
running state), so it costs no compile and no model. It says, in one line, what
would otherwise surface as a long traceback after the workdir and the reference
pass are written: a loss that is not a scalar, a result that is not
(loss, metrics[, new_state]), a metric that is not a scalar, a new state of
another structure than the initial one, an argument the step does not provide,
or a body that raises when traced.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data import schema
from jaxalign.losses.registry import LossInputs, LossSpec, bind


class _Refused(Exception):
  """What the traced loss returned cannot train (the message says why)."""


def _shape(x) -> str:
  return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


def _where(e: BaseException, source: str | None) -> str:
  """" (at FILE:LINE)" of the innermost traceback frame in the loss's own file."""
  line, tb = None, e.__traceback__
  while tb is not None:
    if source is not None and tb.tb_frame.f_code.co_filename == source:
      line = tb.tb_lineno
    tb = tb.tb_next
  return f" (at {source}:{line})" if line is not None else ""


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _batch(spec: LossSpec, b: int, group_size: int | None, online: bool) -> dict:
  """The format's loss columns [B, ...] as the step passes them.

  A column records may leave out (Column.optional) is given only when the loss
  cannot run without it, so a loss that takes it with a default is traced on the
  path it takes when the data lacks it; with `online` sampling, also the optional
  columns no record field gives (the sampler adds them: GRAO's answer_rewards).
  """
  fmt = schema.get(spec.data)
  params = inspect.signature(spec.fn).parameters
  required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
  out = {}
  for c in fmt.columns:
    sampled = online and c.optional and c.field is None
    if c.arg is None or not (c.in_plan or c.arg in required or sampled):
      continue
    out[c.name] = jax.ShapeDtypeStruct((b, *fmt.column_shape(c, group_size)), c.dtype)
  for name, (shape, dtype) in spec.prepared_columns.items():
    out[name] = jax.ShapeDtypeStruct((b, *shape), dtype)
  return out


def _inputs(spec: LossSpec, hparams: dict, b: int, group_size: int | None, *,
            ref_columns: bool, online: bool) -> dict:
  """The step's LossInputs fields for a micro-batch of `b` examples, as ShapeDtypeStructs."""
  s = schema.get(spec.data).num_sequences(group_size)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, np.float32)
  columns = {name: f32((b, s)) for name in spec.column_names(hparams)}
  return dict(
      logps=f32((b, s * max(len(spec.modules), 1))),
      ref_logps=f32((b, s)) if spec.needs_ref else None,
      lengths=jax.ShapeDtypeStruct((b, s), np.int32),
      batch=_batch(spec, b, group_size, online),
      columns=columns,
      ref_columns=dict(columns) if columns and ref_columns else None)


def _check_result(out: Any, spec: LossSpec, state: Any) -> None:
  """Raises _Refused naming what is wrong with the loss's (traced) result."""
  stateful = spec.init_state is not None
  want = "(loss, metrics, new_state)" if stateful else "(loss, metrics)"
  if not isinstance(out, tuple) or len(out) != (3 if stateful else 2):
    got = (f"a tuple of {len(out)}" if isinstance(out, tuple)
           else f"an array of shape {_shape(out)}" if hasattr(out, "shape")
           else f"a {type(out).__name__}")
    raise _Refused(f"returns {got}; it must return {want}"
                   + ("" if stateful else " with metrics a dict of scalars"))
  loss, metrics = out[0], out[1]
  if not hasattr(loss, "shape") or loss.shape != ():
    raise _Refused(f"returns a loss of shape {_shape(loss)}; it must be a scalar (reduce "
                   "over the batch, e.g. .mean())")
  if not jnp.issubdtype(loss.dtype, jnp.floating):
    raise _Refused(f"returns a loss of dtype {loss.dtype}; it must be a float to "
                   "differentiate")
  if not isinstance(metrics, dict):
    raise _Refused(f"returns metrics of type {type(metrics).__name__}; they must be a dict "
                   "of scalars (name -> value)")
  for key, value in metrics.items():
    if not isinstance(key, str):
      raise _Refused(f"returns a metric named {key!r}; metric names must be strings")
    if jnp.shape(value) != ():
      raise _Refused(f"returns metric {key!r} of shape {_shape(value)}; every metric must "
                     "be a scalar (e.g. .mean())")
  if stateful:
    old, new = jax.tree.structure(state), jax.tree.structure(out[2])
    if old != new:
      raise _Refused(f"returns a new state of structure {new}; it must have the initial "
                     f"state's {old}")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(out[2])):
      if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
        raise _Refused(f"returns a new state leaf {jnp.result_type(b)}{list(jnp.shape(b))}"
                       f" where the initial state has {jnp.result_type(a)}"
                       f"{list(jnp.shape(a))}; the state must keep its shapes and dtypes")


def check(spec: LossSpec, hparams: dict, *, batch_size: int, group_size: int | None = None,
          ref_columns: bool = False, online: bool = False,
          name: str | None = None) -> str | None:
  """What stops `spec`'s loss from training on its format, in one line; None if nothing.

  Args:
    spec: the loss.
    hparams: its hyperparameters (config.loss.hparams).
    batch_size: B, the examples of one micro-batch.
    group_size: G of a grouped format (ignored otherwise).
    ref_columns: whether the reference's step columns are computed too (a frozen
      reference; a precomputed one holds log-probs only).
    online: the batches are sampled in the run (config.online.enabled), which
      adds the format's sampled columns.
    name: how the message names the loss (config.loss.name); default its
      registered name.

  Traced with jax.eval_shape: nothing is compiled or run.
  """
  label = repr(name) if name else f"loss {spec.name!r}"
  fmt = schema.get(spec.data)
  group_size = group_size if fmt.grouped else None
  where = f"an abstract {spec.data} batch (B={batch_size}" + (
      f", G={group_size})" if group_size else ")")
  fn = spec.fn
  try:
    source = inspect.getsourcefile(fn)
  except TypeError:   # a built-in or C function: no source file
    source = None

  def traced(fields: dict, state):
    inputs = LossInputs(**fields)
    try:
      kwargs = bind(fn, spec, inputs)
    except ValueError as e:
      raise _Refused(f"cannot be fed: {str(e).splitlines()[0]}") from None
    out = (fn(**kwargs, **hparams) if spec.init_state is None
           else fn(**kwargs, state=state, **hparams))
    _check_result(out, spec, state)
    return out[0]

  try:
    state = None if spec.init_state is None else jax.eval_shape(spec.init_state)
    jax.eval_shape(traced, _inputs(spec, hparams, batch_size, group_size,
                                   ref_columns=ref_columns, online=online), state)
  except _Refused as e:
    return f"{label} {e} (traced on {where})"
  except Exception as e:  # the loss's own code: any error becomes one line
    return f"{label} fails when traced on {where}: {_first_line(e)}{_where(e, source)}"
  return None
