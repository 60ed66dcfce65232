"""`jaxalign train | demo`: the command line, and the only place that sees flags.

  jaxalign train --config configs/dpo_toy.py --workdir runs/x --config.optim.lr=1e-5
  jaxalign demo [--workdir DIR] [--seed N]

Usage errors (unknown config key, bad value, impossible mesh) exit with status 2
and one line naming the key, before anything is compiled or written.
"""

import argparse
import logging
import os
import sys

USAGE = """usage: jaxalign <command> [flags]

commands:
  train   --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]
  demo    [--workdir DIR] [--seed N] [--method M]   SFT then alignment on the bundled task
"""


def _die(command: str, message: str, status: int = 2) -> int:
  first_line = str(message).strip().splitlines()[0] if str(message).strip() else "error"
  print(f"jaxalign {command}: error: {first_line}", file=sys.stderr)
  return status


def _train(argv: list[str]) -> int:
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  full_argv = ["jaxalign train"] + argv
  # sys_argv: the override flags are discovered from this list, not sys.argv,
  # so main() also works when called from Python.
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Path to a configs/*.py recipe (optionally :arg).",
      flag_values=fv, lock_config=True, sys_argv=full_argv)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)
  flags.DEFINE_integer("stop_after_steps", None, "Leave after this many steps of this "
                       "invocation, with a checkpoint; rerun to continue.", flag_values=fv)
  try:
    fv(full_argv)
    if fv["config"].value is None:
      raise flags.Error("--config is required")
    if not fv.workdir:
      raise flags.Error("--workdir is required")
    config = config_flag.value
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    return _die("train", _flag_message(e))

  import jax
  from jaxalign import config as config_lib
  from jaxalign.data.formats import DataError
  from jaxalign.train import loop

  try:
    config_lib.validate(config, jax.device_count())
  except config_lib.ConfigError as e:
    return _die("train", str(e))
  try:
    result = loop.train(config, fv.workdir, progress=fv.progress,
                        stop_after=fv.stop_after_steps)
  except config_lib.ConfigError as e:
    return _die("train", str(e))
  except DataError as e:
    return _die("train", str(e), status=1)
  except loop.NonFiniteError as e:
    return _die("train", str(e), status=1)
  if result.stopped_by_signal:
    print(f"stopped by SIGTERM at step {result.final_step}; checkpoint saved in "
          f"{result.workdir}/checkpoints", file=sys.stderr)
  else:
    print(f"done: step {result.final_step}, loss {result.last_metrics.get('loss', float('nan')):.4f}"
          f", workdir {result.workdir}")
  return 0


def _flag_message(e: Exception) -> str:
  """absl/ml_collections errors carry the key; keep the informative first line."""
  text = str(e).strip()
  for line in text.splitlines():
    if line.strip() and not line.startswith("Traceback"):
      return line.strip()
  return text or type(e).__name__


def _demo(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="jaxalign demo", description=__doc__)
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--method", default="dpo",
                      help="dpo | ipo | ln_dpo | bco | d2o | grao | aft (default dpo); "
                      "methods run in one workdir share its SFT model")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  from jaxalign import demo

  if args.method not in demo.METHODS:
    return _die("demo", f"unknown method {args.method!r}; known: {sorted(demo.METHODS)}")
  if os.path.exists(os.path.join(args.workdir, args.method)):
    return _die("demo", f"{args.workdir} already holds a {args.method} demo run; pass a new "
                "--workdir")
  summary = demo.run_demo(args.workdir, method=args.method, seed=args.seed,
                          progress=not args.no_progress)
  print()
  print(demo.format_table(summary))
  print(f"summary: {os.path.join(os.path.abspath(args.workdir), 'summary.json')}")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command == "train":
    return _train(rest)
  if command == "demo":
    return _demo(rest)
  print(USAGE, file=sys.stderr)
  return _die(command, f"unknown command {command!r}")


if __name__ == "__main__":
  sys.exit(main())
