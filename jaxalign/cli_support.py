"""Pieces of the command line kept out of cli.py: model-field overrides on any recipe,
one-line errors for recipe files that do not load, quiet startup, --verbose.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import logging
import os
import re
import traceback

MODEL_OVERRIDE_PREFIX = "--config.model.overrides."
LOSS_HPARAM_PREFIX = "--config.loss.hparams."


def split_model_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
  """Takes `--config.model.overrides.FIELD=VALUE` and `--config.loss.hparams.KEY=VALUE`
  out of `argv`.

  ml_collections can only override keys a recipe already defines, and most recipes
  define no `model.overrides` at all, nor the hyperparameters of a loss other than
  their own (e.g. `--config.loss.name=losses/dpo_positive.py:dpo_positive_loss
  --config.loss.hparams.lam=5.0`); these flags are applied by `apply_model_overrides`
  instead (config.validate then checks the loss takes them). Returns (the other
  args, [(flag, field, value)]).
  """
  rest, items = [], []
  for arg in argv:
    for prefix in (MODEL_OVERRIDE_PREFIX, LOSS_HPARAM_PREFIX):
      if arg.startswith(prefix) and "=" in arg:
        flag, _, value = arg.partition("=")
        field = flag[len(prefix):]
        if field and "." not in field:
          items.append((flag, field, value))
          break
    else:
      rest.append(arg)
  return rest, items


def _parse(value: str, type_name: str):
  if type_name == "str":
    return value
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    if "str" in type_name:
      return value
    raise ValueError(f"cannot parse {value!r} as {type_name}") from None
  if isinstance(parsed, list):
    parsed = tuple(parsed)
  checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool)}
  base = type_name.split("|")[0].strip()
  if parsed is None and "None" in type_name:
    return None
  if base in checks and not checks[base](parsed):
    raise ValueError(f"expected {type_name}, got {value!r}")
  return float(parsed) if base == "float" else parsed


def apply_model_overrides(config, items: list[tuple[str, str, str]]) -> None:
  """Sets each (flag, field, value) in `config.model.overrides`, typed per ModelConfig.

  Raises:
    KeyError: an unknown field, with a suggestion (the CLI prints it as one line).
    ValueError: a value of the wrong type, naming the flag.
  """
  hparams = [i for i in items if i[0].startswith(LOSS_HPARAM_PREFIX)]
  items = [i for i in items if not i[0].startswith(LOSS_HPARAM_PREFIX)]
  _apply_loss_hparams(config, hparams)
  if not items:
    return
  from jaxalign.models import transformer
  fields = {f.name: str(f.type) for f in dataclasses.fields(transformer.ModelConfig)}
  overrides = config.model.overrides
  for flag, field, value in items:
    if field not in fields:
      close = difflib.get_close_matches(field, fields, n=1)
      hint = f'\nDid you mean "{close[0]}" instead of "{field}"?' if close else ""
      raise KeyError(f"'{field}'{hint}")
    try:
      parsed = _parse(value, fields[field])
    except ValueError as e:
      raise ValueError(f"{flag}: {e}") from None
    with overrides.unlocked():
      if field in overrides:
        del overrides[field]   # a recipe's own value may have another type (int for float)
      overrides[field] = parsed


def _apply_loss_hparams(config, items: list[tuple[str, str, str]]) -> None:
  """Sets each (flag, key, value) in `config.loss.hparams`: typed like the recipe's own
  value when it has one, else as a Python literal (a bare word stays a string)."""
  if not items:
    return
  hparams = config.loss.hparams
  for flag, key, value in items:
    old = hparams.get(key) if key in hparams else None
    type_name = ("float" if isinstance(old, float) else
                 "int" if isinstance(old, int) and not isinstance(old, bool) else
                 "bool" if isinstance(old, bool) else "str" if isinstance(old, str) else "any")
    if type_name in ("float", "any") and value.strip().lower().lstrip("+-") in (
        "inf", "infinity", "nan"):
      parsed = float(value)    # as ml_collections reads them; validate then refuses them
    elif type_name == "any":
      try:
        parsed = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        parsed = value
      parsed = tuple(parsed) if isinstance(parsed, list) else parsed
    else:
      try:
        parsed = _parse(value, type_name)
      except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    with hparams.unlocked():
      if key in hparams:
        del hparams[key]
      hparams[key] = parsed


_TRACE_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def config_file_error(e: BaseException, argv: list[str]) -> str | None:
  """'FILE:LINE: Type: message' for a recipe file that does not parse or raises; else None."""
  config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_path is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
    config_path = argv[argv.index("--config") + 1]
  if config_path is None:
    return None
  config_file = os.path.abspath(config_path.split(":")[0])
  if isinstance(e, SyntaxError) and e.filename:
    return f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}"
  text = str(e)
  if "Error whilst parsing config file" in text:  # ml_collections' re-raised ValueError/TypeError
    frames = _TRACE_FRAME.findall(text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    where = [f for f in frames if os.path.abspath(f[0]) == config_file] or frames
    if where:
      return f"{where[-1][0]}:{where[-1][1]}: {lines[-1].strip()}"
    return f"{config_path}: {lines[-1].strip()}"
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == config_file]
  if frames:
    return f"{frames[-1].filename}:{frames[-1].lineno}: {type(e).__name__}: {e}"
  return None


def quiet_startup(command: str, argv: list[str]) -> None:
  """Silences startup noise that is no concern of the user.

  transformers' "PyTorch was not found" advisory (jaxalign never needs PyTorch), and,
  with libtpu installed on a machine without a TPU, libtpu's TPU_WORKER_HOSTNAMES
  errors: such a machine then runs JAX on its other backends (JAX_PLATFORMS is left
  alone when set, and `plan --topology` keeps the TPU compiler it needs).
  """
  logging.getLogger("transformers").addFilter(
      lambda record: "PyTorch was not found" not in record.getMessage())
  if os.environ.get("JAX_PLATFORMS") or (command == "plan" and any(
      a.startswith("--topology") for a in argv)):
    return
  if importlib.util.find_spec("libtpu") is None or _has_tpu_device():
    return
  if any(importlib.util.find_spec(n) is not None
         for n in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
    return   # a GPU machine: JAX's own backend choice stands
  os.environ["JAX_PLATFORMS"] = "cpu"


def _has_tpu_device() -> bool:
  if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE"):
    return True
  try:
    entries = os.listdir("/dev")
  except OSError:
    return True
  return any(name.startswith("accel") for name in entries) or os.path.isdir("/dev/vfio")


# One flag convention for every command (TRL's underscore style).
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")
_PROGRESS_OFF = ("noprogress", "no_progress")


def normalize_flags(argv: list[str]) -> list[str]:
  """Every command's flags in one spelling: underscores, dashes accepted
  (`--max-new-tokens=3` -> `--max_new_tokens=3`), and one progress switch:
  `--progress=false`, `--noprogress`, `--no_progress` and `--no-progress` all mean
  `--progress=false`. Config overrides (`--config.a.b=v`) and values are left alone.
  """
  out = []
  for arg in argv:
    if arg.startswith("--") and len(arg) > 2 and not arg.startswith("--config."):
      name, eq, value = arg[2:].partition("=")
      name = name.replace("-", "_")
      if name in _PROGRESS_OFF and not eq:
        name, eq, value = "progress", "=", "false"
      arg = f"--{name}{eq}{value}"
    out.append(arg)
  return out


def wants_help(argv: list[str]) -> bool:
  return any(a in HELP_FLAGS for a in argv)


CONFIG_HELP = """config keys:
  --config.KEY=VALUE        any key of the recipe, e.g. --config.optim.lr=1e-5
                            (`jaxalign train --print_config` prints every resolved key)
  --config.model.overrides.FIELD=VALUE   a field of the model config
  --config.loss.hparams.KEY=VALUE        a hyperparameter of the loss (docs/losses.md)
Flag names take underscores; dashes are accepted (--stop-after-steps = --stop_after_steps)."""


def absl_help(prog: str, usage: str, fv, footer: str = CONFIG_HELP) -> str:
  """The --help text of an absl-flag command: usage, each flag with its default, footer."""
  lines = [f"usage: {prog} {usage}", "", "flags:"]
  names = sorted({fv[name].name for name in fv})
  for name in names:
    flag = fv[name]
    spelled = f"--[no]{name}" if flag.boolean else f"--{name}"
    default = "" if flag.default is None else f" (default: {flag.default_as_str})"
    lines.append(f"  {spelled}: {flag.help}{default}")
  lines += ["  -h, --help: show this message and exit", "", footer]
  return "\n".join(lines)


def parse_bool(text: str) -> bool:
  """argparse type of a boolean flag, spelled as absl takes it."""
  value = text.strip().lower()
  if value in ("true", "t", "1", "yes", "y"):
    return True
  if value in ("false", "f", "0", "no", "n"):
    return False
  raise ValueError(f"not a boolean: {text!r}")


def flat_config(config) -> list[str]:
  """`config.a.b = value` lines of a ConfigDict (or dict), sorted: what --print_config shows."""
  def walk(node, prefix):
    for key in sorted(node):
      value = node[key]
      if hasattr(value, "items"):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"config.{prefix}{key} = {value!r}"
  return list(walk(config.to_dict() if hasattr(config, "to_dict") else config, ""))


def use_cpu_devices(devices: str | None) -> None:
  """`plan --devices cpu:N`: asks JAX for N host CPU devices before its backend starts
  (the same as XLA_FLAGS=--xla_force_host_platform_device_count=N). A backend already
  started (jaxalign called from Python after using JAX) keeps its count; plan then names
  the flag to set."""
  if not devices or not devices.startswith("cpu:"):
    return
  try:
    count = int(devices.split(":", 1)[1])
  except ValueError:
    return   # plan's own check names the bad value
  import jax
  if count < 1:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    pass


class LogFormatter(logging.Formatter):
  """`jaxalign: message` for jaxalign's own INFO lines (a run's phases and summaries);
  `LEVEL logger: message` for everything else."""

  def format(self, record: logging.LogRecord) -> str:
    if record.levelno == logging.INFO and record.name.startswith("jaxalign"):
      return f"jaxalign: {record.getMessage()}"
    return super().format(record)


def configure_logging() -> None:
  """WARNING for every library, INFO for jaxalign's own lines, on stderr."""
  handler = logging.StreamHandler()
  handler.setFormatter(LogFormatter("%(levelname)s %(name)s: %(message)s"))
  logging.basicConfig(level=logging.WARNING, handlers=[handler])
  logging.getLogger("jaxalign").setLevel(logging.INFO)
