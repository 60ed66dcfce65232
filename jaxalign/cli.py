"""`jaxalign train | demo | generate | ...`: the command line, and the only place that sees flags.

  jaxalign train --config configs/dpo_toy.py --workdir runs/x --config.optim.lr=1e-5
  jaxalign demo [--workdir DIR] [--seed N]

Usage errors (unknown config key, bad value, impossible mesh) exit with status 2
and one line naming the key, before anything is compiled or written.
"""

import argparse
import logging
import os
import sys
import traceback

from jaxalign import cli_support, errors

USAGE = """usage: jaxalign <command> [flags]

commands:
  train   --config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]
          [--coordinator HOST:PORT --num_processes N --process_id I | --distributed]
          one process of a multi-process job (see docs/scaling.md)
  prepare --config configs/X.py --out DIR [--workers N] [--shard_size N] [--config.a.b=v ...]
          tokenize config.data.train_path once into ArrayRecord shards + manifest;
          train on it with --config.data.train_path=DIR (resumable: a rerun keeps done shards)
  demo    [--workdir DIR] [--seed N] [--method M]   SFT then alignment on the bundled task
          (--method continual: two domains, forgetting matrix of DPO / OFS-DPO / COFS-DPO)
  plan    --config configs/X.py (--topology v5p:4x4x4 | --devices cpu:8) [--config.a.b=v ...]
          compile the real step ahead of time: per-device memory, FLOPs, predicted MFU
          (data.packing: [--pack_sequence_length N] [--pack_fill F]
           [--pack_prompt_length P] with data.share_prompt, the data assumed)
  export  --checkpoint RUN_DIR --out HF_DIR   write a transformers-loadable model
  generate --checkpoint RUN_DIR --prompts FILE --out FILE [--n N] [--temperature T]
          [--top_k K] [--top_p P] [--max_new_tokens M] [--seed S]   sample completions
  generate-candidates --checkpoint RUN_DIR --questions FILE --k K --out FILE
          [--temperature T] [--max_new_tokens M] [--reward arithmetic|exact_match] [--seed N]
          k labelled samples per question: the AFT training set (ranked format)

`jaxalign COMMAND --help` lists a command's flags. Flag names take underscores (TRL's
style); dashes are accepted. --progress=false (or --noprogress) turns the bar off.
"""

TRAIN_USAGE = ("--config configs/X.py[:arg] --workdir DIR [--config.a.b=value ...]\n"
               "  trains the recipe in DIR, resuming what DIR holds; one process of a\n"
               "  multi-process job with --coordinator/--num_processes/--process_id or\n"
               "  --distributed (docs/scaling.md)")
PREPARE_USAGE = ("--config configs/X.py --out DIR [--workers N] [--shard_size N] "
                 "[--config.a.b=v ...]\n"
                 "  tokenizes config.data.train_path once into ArrayRecord shards + manifest;\n"
                 "  train on it with --config.data.train_path=DIR (a rerun keeps done shards)")
PLAN_USAGE = ("--config configs/X.py (--topology v5p:4x4x4 | --devices cpu:8) "
              "[--config.a.b=v ...]\n"
              "  compiles the real train step ahead of time: per-device memory, FLOPs,\n"
              "  predicted MFU (docs/scaling.md); exits 1 when the plan does not fit")
EPILOG = "Flag names take underscores; dashes are accepted (--max-new-tokens)."


def _die(command: str, message: str, status: int = 2) -> int:
  if errors.debug_enabled():   # --verbose / JAXALIGN_DEBUG=1: the full traceback too
    traceback.print_exc()
  first_line = str(message).strip().splitlines()[0] if str(message).strip() else "error"
  print(f"jaxalign {command}: error: {first_line}", file=sys.stderr)
  return status


def _config_value(config_flag):
  """The --config ConfigDict; a file that failed to load raises OSError here.

  (ml_collections defers a load failure to the first attribute access.)
  """
  config = config_flag.value
  try:
    config.to_dict  # the deferred error surfaces on access
  except OSError as e:  # its last line says why (e.g. no such file)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise OSError(f"--config: {lines[-1] if lines else e}") from None
  return config


def _train(argv: list[str]) -> int:
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  given = list(argv)
  argv, model_overrides = cli_support.split_model_overrides(argv)
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
  flags.DEFINE_bool("print_config", False, "Print the resolved config (every key, defaults "
                    "filled in) and exit without training.", flag_values=fv)
  _define_distributed_flags(fv)
  if cli_support.wants_help(argv):
    print(cli_support.absl_help("jaxalign train", TRAIN_USAGE, fv))
    return 0
  try:
    fv(full_argv)
    if fv["config"].value is None:
      raise flags.Error("--config is required")
    if not fv.workdir and not fv.print_config:
      raise flags.Error("--workdir is required")
    config = _config_value(config_flag)
    cli_support.apply_model_overrides(config, model_overrides)
    cluster = _cluster(fv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    return _die("train", _flag_message(e, argv + [f for f, _, _ in model_overrides]))
  except Exception as e:  # the recipe file raised (or does not parse)
    return _die("train", cli_support.config_file_error(e, argv) or _flag_message(e, argv))

  from jaxalign import peers
  if cluster.is_multiprocess and not peers.supervised():
    # The training runs as a child, so a lost peer's native abort becomes one line.
    return peers.supervise([sys.executable, "-m", "jaxalign.cli", "train", *given],
                           workdir=fv.workdir,
                           process_id=cluster.process_id,
                           num_processes=cluster.num_processes,
                           hold_s=2 * cluster.heartbeat_timeout_s + 30)
  from jaxalign import distributed
  distributed.initialize(cluster)   # before anything asks JAX for devices
  import jax
  if cluster.is_multiprocess:
    logging.getLogger("jaxalign").warning("%s", distributed.describe())
  from jaxalign import config as config_lib
  from jaxalign import guards
  from jaxalign.data.formats import DataError
  from jaxalign.workflows import run

  try:   # validated once, into the frozen spec every layer below takes
    spec = config_lib.resolve(config, jax.device_count())
  except config_lib.ConfigError as e:
    return _die("train", str(e))
  if fv.print_config:
    print("\n".join(cli_support.flat_config(spec.config)))
    return 0
  try:
    result = run.train(spec, fv.workdir, progress=fv.progress,
                       stop_after=fv.stop_after_steps)
  except config_lib.ConfigError as e:  # includes errors.ResumeMismatchError: a refused resume
    return _die("train", str(e))
  except DataError as e:
    return _die("train", str(e), status=1)
  except (errors.NonFiniteError, errors.RunError, guards.DivergenceError) as e:
    return _die("train", str(e), status=1)   # RunError includes runlock.LockedError
  except OSError as e:  # e.g. checkpoint.CheckpointWriteError (disk full), a missing file
    return _die("train", str(e), status=1)
  except jax.errors.JaxRuntimeError as e:   # e.g. a collective whose peer died
    return _die("train", str(e), status=1)
  if result.already_complete:
    print(f"already complete: step {result.final_step} of {config.total_steps} in "
          f"{result.workdir}; raise --config.total_steps to train further")
    return 0
  if result.stopped_by_signal:
    if result.stopped_in_pass:   # before training: no step run, no checkpoint saved
      print(f"stopped by {result.signal_name} {result.stopped_in_pass}", file=sys.stderr)
    else:
      print(f"stopped by {result.signal_name} at step {result.final_step}; checkpoint saved "
            f"in {result.workdir}/checkpoints; run the same command again to continue",
            file=sys.stderr)
    if result.signal_name == "SIGINT":
      from jaxalign.train import signals
      return signals.INTERRUPTED_STATUS   # 130, the shell's status for Ctrl-C
  elif fv.stop_after_steps is not None and result.final_step < config.total_steps:
    print(f"stopped after --stop_after_steps={fv.stop_after_steps} at step {result.final_step} "
          f"of {config.total_steps}; checkpoint saved in {result.workdir}/checkpoints; run the "
          "same command again to continue", file=sys.stderr)
  else:
    loss = result.last_metrics.get('loss', float('nan'))
    print(f"done: step {result.final_step}, loss {loss:.4f}"
          f", workdir {result.workdir}")
  return 0


def _prepare(argv: list[str]) -> int:
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  argv, model_overrides = cli_support.split_model_overrides(argv)
  full_argv = ["jaxalign prepare"] + argv
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "The training recipe whose data to prepare.", flag_values=fv,
      lock_config=True, sys_argv=full_argv)
  flags.DEFINE_string("out", None, "Output directory of the prepared dataset.", flag_values=fv)
  flags.DEFINE_integer("workers", 1, "Tokenizing worker processes.", flag_values=fv)
  flags.DEFINE_integer("shard_size", 10_000, "Examples per shard file.", flag_values=fv)
  if cli_support.wants_help(argv):
    print(cli_support.absl_help("jaxalign prepare", PREPARE_USAGE, fv))
    return 0
  try:
    fv(full_argv)
    if fv["config"].value is None:
      raise flags.Error("--config is required")
    if not fv.out:
      raise flags.Error("--out is required")
    config = _config_value(config_flag)
    cli_support.apply_model_overrides(config, model_overrides)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    return _die("prepare", _flag_message(e, argv + [f for f, _, _ in model_overrides]))
  except Exception as e:  # the recipe file raised (or does not parse)
    return _die("prepare", cli_support.config_file_error(e, argv) or _flag_message(e, argv))

  import jax
  from jaxalign import config as config_lib
  from jaxalign.data.formats import DataError
  from jaxalign.workflows import prepare as prepare_lib
  try:
    spec = config_lib.resolve(config, jax.device_count())   # validated once
    manifest = prepare_lib.prepare_from_config(spec, fv.out, shard_size=fv.shard_size,
                                               workers=fv.workers)
  except config_lib.ConfigError as e:
    return _die("prepare", str(e))
  except (DataError, OSError) as e:
    return _die("prepare", str(e), status=1)
  print(f"prepared {manifest['examples']} examples ({manifest['skipped']} skipped) in "
        f"{len(manifest['shards'])} shards ({manifest['written_shards']} written, "
        f"{manifest['reused_shards']} kept) in {manifest['seconds']:.1f} s: "
        f"{os.path.abspath(fv.out)}; train with --config.data.train_path={fv.out}")
  return 0


def _define_distributed_flags(fv) -> None:
  from absl import flags
  from jaxalign import distributed
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0's coordinator service, "
                      "to join a multi-process job (env JAXALIGN_COORDINATOR).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Processes in the job (env "
                       "JAXALIGN_NUM_PROCESSES).", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1 (env "
                       "JAXALIGN_PROCESS_ID).", flag_values=fv)
  flags.DEFINE_bool("distributed", False, "Join a multi-process job, detecting coordinator, "
                    "count and id from the cluster (Cloud TPU, SLURM, Open MPI).", flag_values=fv)
  flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for every process to "
                       "join.", flag_values=fv)
  flags.DEFINE_integer("heartbeat_timeout", distributed.HEARTBEAT_TIMEOUT_S,
                       "Seconds without a heartbeat after which a process counts as lost; "
                       "the others then stop with one line naming it.", flag_values=fv)


def _cluster(fv):
  from jaxalign import distributed
  return distributed.resolve(coordinator=fv.coordinator, num_processes=fv.num_processes,
                             process_id=fv.process_id, auto=fv.distributed,
                             timeout_s=fv.distributed_timeout,
                             heartbeat_timeout_s=fv.heartbeat_timeout)


def _plan(argv: list[str]) -> int:
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  argv, model_overrides = cli_support.split_model_overrides(argv)
  full_argv = ["jaxalign plan"] + argv
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Path to a configs/*.py recipe.", flag_values=fv, lock_config=True,
      sys_argv=full_argv)
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4 (needs libtpu).",
                      flag_values=fv)
  flags.DEFINE_string("devices", None, "Local devices instead, e.g. cpu:8.", flag_values=fv)
  flags.DEFINE_integer("pack_sequence_length", None, "data.packing: real tokens the plan "
                       "assumes per sequence (default data.max_length: the largest bucket).",
                       flag_values=fv)
  flags.DEFINE_float("pack_fill", 1.0, "data.packing: assumed fraction of real tokens in the "
                     "packed rows.", flag_values=fv)
  flags.DEFINE_integer("pack_prompt_length", None, "data.packing with data.share_prompt: "
                       "prompt tokens the plan assumes per example, shared by its sequences "
                       "(default data.max_prompt_length, at most the sequence length - 1).",
                       flag_values=fv)
  if cli_support.wants_help(argv):
    print(cli_support.absl_help("jaxalign plan", PLAN_USAGE, fv))
    return 0
  try:
    fv(full_argv)
    if fv["config"].value is None:
      raise flags.Error("--config is required")
    if (fv.topology is None) == (fv.devices is None):
      raise flags.Error("give exactly one of --topology or --devices")
    config = _config_value(config_flag)
    cli_support.apply_model_overrides(config, model_overrides)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    return _die("plan", _flag_message(e, argv + [f for f, _, _ in model_overrides]))
  except Exception as e:  # the recipe file raised (or does not parse)
    return _die("plan", cli_support.config_file_error(e, argv) or _flag_message(e, argv))

  cli_support.use_cpu_devices(fv.devices)   # before JAX starts: --devices cpu:N as written
  from jaxalign import config as config_lib
  from jaxalign import plan as plan_lib

  try:
    pack = plan_lib.PackAssumption(fv.pack_sequence_length, fv.pack_fill, fv.pack_prompt_length)
    result = plan_lib.plan(config, topology=fv.topology, devices=fv.devices, pack=pack)
  except (config_lib.ConfigError, plan_lib.PlanError) as e:
    return _die("plan", str(e))
  print(plan_lib.format_plan(result))
  return 0 if result["fits"] else 1


def _export(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="jaxalign export", epilog=EPILOG,
                                   description="Writes a transformers-loadable model "
                                   "(config.json, model.safetensors, tokenizer) of a run.")
  parser.add_argument("--checkpoint", required=True, help="a jaxalign run directory")
  parser.add_argument("--out", required=True, help="output directory (HF format)")
  parser.add_argument("--architecture", default=None,
                      help="e.g. LlamaForCausalLM (default: from the run's hf_path or inferred)")
  args = parser.parse_args(argv)
  from jaxalign.train import rundir

  try:
    rundir.export_checkpoint(args.checkpoint, args.out, architecture=args.architecture)
  except (ValueError, FileNotFoundError, errors.RunError) as e:   # a corrupt checkpoint
    return _die("export", str(e), status=1)
  except OSError as e:   # errors.OutputWriteError: --out is full or read-only
    return _die("export", str(e), status=1)
  print(f"exported {args.checkpoint} to {os.path.abspath(args.out)}")
  return 0


def _sampling_flags(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
  parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0: off")
  parser.add_argument("--top_p", type=float, default=1.0, help="1.0: off")
  parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
  parser.add_argument("--batch_size", type=int, default=64, help="prompts per engine call")
  parser.add_argument("--seed", type=int, default=0)


def _generate(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="jaxalign generate", epilog=EPILOG,
                                   description="Samples completions of a file of prompts "
                                   "from a trained run.")
  parser.add_argument("--checkpoint", required=True, help="a jaxalign run directory")
  parser.add_argument("--prompts", required=True,
                      help="JSONL/Parquet of {prompt} records (text or chat messages)")
  parser.add_argument("--out", required=True, help="output JSONL (one record per prompt)")
  parser.add_argument("--n", type=int, default=1, help="completions per prompt")
  parser.add_argument("--max_prompt_length", type=int, default=None,
                      help="prompt tokens kept (default: the run's data.max_prompt_length)")
  _sampling_flags(parser, max_new_tokens=64)
  args = parser.parse_args(argv)
  from jaxalign.data.formats import DataError
  from jaxalign.sampling import SamplingParams
  from jaxalign.workflows import generate as generate_lib

  try:
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, n=args.n)
    stats = generate_lib.generate_file(args.checkpoint, args.prompts, args.out, sp,
                                       seed=args.seed, batch_size=args.batch_size,
                                       max_prompt_length=args.max_prompt_length)
  except (DataError, FileNotFoundError, errors.RunError) as e:
    return _die("generate", str(e), status=1)
  except ValueError as e:
    return _die("generate", str(e))
  print(f"wrote {stats['completions']} completions of {stats['prompts']} prompts "
        f"({stats['generated_tokens']} tokens, {100 * stats['stopped']:.0f}% stopped, "
        f"{stats['seconds']:.1f} s) to {os.path.abspath(args.out)}")
  return 0


def _generate_candidates(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="jaxalign generate-candidates", epilog=EPILOG,
                                   description="Samples k labelled candidates per question: "
                                   "the AFT training set (ranked format).")
  parser.add_argument("--checkpoint", required=True, help="a jaxalign run directory (SFT/VFT)")
  parser.add_argument("--questions", required=True,
                      help="JSONL/Parquet of {prompt, reference?} (or a toy: source)")
  parser.add_argument("--k", type=int, required=True, help="samples per question")
  parser.add_argument("--out", required=True, help="output JSONL (ranked format, for aft)")
  parser.add_argument("--reward", default="arithmetic",
                      help="checker: a jaxalign.rewards name (value > 0 = correct)")
  _sampling_flags(parser, max_new_tokens=32)
  args = parser.parse_args(argv)
  from jaxalign.data.formats import DataError
  from jaxalign.workflows import candidates

  sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, batch_size=args.batch_size)
  try:
    stats = candidates.generate_candidates(args.checkpoint, args.questions, args.out, k=args.k,
                                           sampling=sampling, reward=args.reward,
                                           seed=args.seed)
  except (DataError, FileNotFoundError, errors.RunError) as e:
    return _die("generate-candidates", str(e), status=1)
  except (ValueError, KeyError) as e:  # bad flag values, an unknown checker
    return _die("generate-candidates", str(e.args[0]) if isinstance(e, KeyError) else str(e))
  print(f"wrote {stats['written']} questions, {stats['candidates']} candidates "
        f"({100 * stats['positive_fraction']:.1f}% correct, {stats['dropped_empty']} empty "
        f"dropped) to {os.path.abspath(args.out)}; train aft on it with "
        f"--config.data.group_size={args.k}")
  return 0


def _flag_message(e: Exception, argv: list[str]) -> str:
  """absl/ml_collections errors carry the key; keep the informative first line."""
  recipe_error = cli_support.config_file_error(e, argv)
  if recipe_error:   # the recipe file itself raised: its file and line
    return recipe_error
  if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError):
    e = e.args[0]  # how ml_collections reports an unknown key in an override
  if isinstance(e, KeyError) and e.args:
    # KeyError("'lrr'\nDid you mean \"lr\" instead of \"lrr\"?")
    lines = [line.strip() for line in str(e.args[0]).splitlines() if line.strip()]
    key = lines[0].strip("'\"") if lines else "?"
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                 and key in a.split("=")[0].split(".")), "--config")
    return "; ".join([f"{flag}: unknown config key {key!r}"] + lines[1:])
  text = str(e).strip()
  for line in text.splitlines():
    if line.strip() and not line.startswith("Traceback"):
      return line.strip()
  return text or type(e).__name__


def _demo(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog="jaxalign demo", epilog=EPILOG,
      description="SFT on the bundled arithmetic task, then alignment with --method against "
      "the SFT model, then held-out greedy accuracy before and after (README.md).")
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--method", default="dpo",
                      help="dpo | ipo | ln_dpo | simpo | orpo | cpo | cpo_simpo | sppo_hard | "
                      "exo_pair | apo_zero | apo_down | nca_pair | aot | aot_unpaired | discopop | "
                      "dpo_sft_mix | ld_dpo | wpo | tr_dpo | bco_pair | bco | kto | "
                      "apo_zero_unpaired | d2o | grao (online) | grao_rm (online, a reward model "
                      "trained first) | grao_offline | aft | iterative_dpo | ofs_dpo (default "
                      "dpo); methods run in one workdir share its SFT model. continual: addition "
                      "then subtraction with sequential DPO, OFS-DPO and COFS-DPO, printing a "
                      "forgetting matrix")
  parser.add_argument("--progress", type=cli_support.parse_bool, nargs="?", const=True,
                      default=True, help="show progress bars (--progress=false or "
                      "--noprogress: off)")
  args = parser.parse_args(argv)

  from jaxalign.workflows import demo

  if args.method == "continual":
    from jaxalign.workflows import demo_continual
    summary = demo_continual.run_continual(args.workdir, seed=args.seed,
                                           progress=args.progress)
    print()
    print(demo_continual.format_matrix(summary))
    print(f"matrix: {os.path.join(os.path.abspath(args.workdir), 'forgetting.json')}")
    return 0
  try:
    demo.load_recipe(args.method)   # configs/<method>_demo.py
  except (ValueError, FileNotFoundError) as e:
    return _die("demo", str(e))
  if os.path.exists(os.path.join(args.workdir, args.method)):
    return _die("demo", f"{args.workdir} already holds a {args.method} demo run; pass a new "
                "--workdir")
  summary = demo.run_demo(args.workdir, method=args.method, seed=args.seed,
                          progress=args.progress)
  print()
  print(demo.format_table(summary))
  print(f"summary: {os.path.join(os.path.abspath(args.workdir), 'summary.json')}")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--verbose" in argv:   # full tracebacks with each one-line error
    argv.remove("--verbose")
    os.environ["JAXALIGN_DEBUG"] = "1"
  cli_support.configure_logging()   # jaxalign's phases as `jaxalign: ...` lines on stderr
  if argv[:1] == ["help"] and len(argv) > 1:   # `jaxalign help train` = `jaxalign train --help`
    argv = [argv[1], "--help"]
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if argv else 2
  command, rest = argv[0], cli_support.normalize_flags(argv[1:])
  commands = {"train": _train, "prepare": _prepare, "demo": _demo, "plan": _plan, "export": _export,
              "generate": _generate, "generate-candidates": _generate_candidates}
  if command not in commands:
    print(USAGE, file=sys.stderr)
    return _die(command, f"unknown command {command!r}")
  cli_support.quiet_startup(command, rest)
  try:
    return commands[command](rest)
  except KeyboardInterrupt:   # Ctrl-C before the run's own handler is installed
    return _die(command, "interrupted", status=130)


if __name__ == "__main__":
  sys.exit(main())
