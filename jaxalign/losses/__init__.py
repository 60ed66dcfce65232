"""The loss registry: a loss name -> its pure function and what it needs.

Every loss, built-in or a researcher's own, is a function decorated with
`register(data=..., needs_ref=..., ranges=..., ...)` (jaxalign/losses/registry.py);
a built-in is one file in this package, registered where it is defined, and
found in `LOSSES`. A researcher's loss needs no edit here: decorated in any
file, it is named in the config as "path/to/file.py:function" or
"package.module:function" (see `get`, and losses/README.md at the top of the
repository). The trainer reads `LossSpec` to know the data format (which fixes
the sequences per example that go through the forward; jaxalign/data/schema.py),
whether reference log-probs are needed and whether the loss carries running
state; it never changes per loss. Arguments are bound by name from the format's
table (`keyword_names`), one path for every loss.

Everything that finds a loss by name (config validation, train, plan, online,
resume, export, generate) goes through `get`.
"""

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any

from jaxalign.data import schema
from jaxalign.losses.registry import (LOSSES, REGISTERED, LossInputs, LossSpec, keyword_arrays,
                                      keyword_names, one_of, register)
from jaxalign.losses.registry import ATTR
# The built-in losses: importing each module registers its losses in LOSSES.
from jaxalign.losses import (aft, bco, cpo, d2o, dpo, grao, kto, ln_dpo, ofs,  # noqa: F401
                             orpo, reward, sft, simpo)

FORMATS = tuple(schema.FORMATS)
__all__ = ["LOSSES", "REGISTERED", "FORMATS", "LossInputs", "LossSpec", "LossLookupError",
           "keyword_arrays", "keyword_names", "one_of", "register", "get", "canonical_name",
           "source_fingerprint"]


# ------------------------------------------------------------------------------
# Finding a loss by name: built-in, or a researcher's in their own file.

class LossLookupError(KeyError):
  """config.loss.name names no loss: unknown, not importable, or not a registered loss."""

  def __str__(self):  # one plain line (KeyError-style quoting would add quotes)
    return str(self.args[0]) if self.args else ""


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
    except Exception as e:  # the user's file: any error becomes one line
      raise LossLookupError(f"{ref!r}: cannot import {path}: {_one_line(e)}") from None
  else:
    where = f"module {target}"
    try:
      module = importlib.import_module(target)
    except Exception as e:
      raise LossLookupError(f"{ref!r}: cannot import module {target!r}: {_one_line(e)} "
                            "(a file path ending in .py needs no installing)") from None
  if not hasattr(module, attr):
    raise LossLookupError(f"{ref!r}: {where} has no function {attr!r}")
  spec = getattr(getattr(module, attr), ATTR, None)
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


def source_fingerprint(spec: LossSpec) -> str:
  """sha256 of the file that defines a researcher's loss; "" for a built-in.

  The whole file, not the function's own lines: helpers and constants beside the
  loss are part of the objective (so is any other edit, comments included). A run
  records it with its config (config.loss.source_sha256) and a resume refuses a
  different one like a changed hyperparameter (jaxalign/train/resume.py).

  A built-in loss is part of the installed jaxalign and has none: a jaxalign
  upgrade keeps a built-in's formula for a given name and hyperparameters (a new
  formula gets a new name or hyperparameter), so an edit of jaxalign/losses/*.py
  does not refuse resuming the checkpoints made before it. Neither does a loss
  whose source file cannot be found (defined interactively): "" as well.
  """
  if not spec.origin:
    return ""
  try:
    path = inspect.getsourcefile(spec.fn)
  except TypeError:
    return ""
  if path is None or not os.path.isfile(path):
    return ""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()
