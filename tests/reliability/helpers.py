"""Shared pieces of the fault-injection tests: CLI runs, checkpoint reads, compile spying."""

import contextlib
import os
import pathlib
import sys
import time

import jax
import numpy as np
from jax import monitoring

from jaxalign import checkpoint as ckpt
from jaxalign import cli
from jaxalign.train import rundir

REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
RECIPES = str(pathlib.Path(__file__).resolve().parent / "recipes.py")
TINY_CLI_CONFIG = str(pathlib.Path(REPO_ROOT) / "tests" / "train" / "tiny_cli_config.py")

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def recipe_arg(recipe: pathlib.Path, workdir: pathlib.Path) -> str:
  """The `:arg` a shipped recipe needs to validate on its own ("" for most).

  configs/grao_rm_demo.py scores with the reward model that `jaxalign demo` trains
  in an earlier stage, and validation checks that it is saved; a seed-initialised
  one of the demo's model stands for it in `workdir`.
  """
  if recipe.name != "grao_rm_demo.py":
    return ""
  from flax import nnx

  from jaxalign import config as config_lib
  from jaxalign.rewards import model as reward_model
  from jaxalign.workflows import demo
  model = reward_model.RewardModel(config_lib.model_config(demo.base_config()),
                                   rngs=nnx.Rngs(0))
  reward_model.save_reward_model(model, demo.reward_model_path(str(workdir)))
  return f":{workdir}"


def cli_command(*args: str) -> list[str]:
  """`python -m jaxalign.cli train ...` for a subprocess run."""
  return [sys.executable, "-m", "jaxalign.cli", "train", *args]


def cli_env() -> dict[str, str]:
  # XLA_FLAGS (8 CPU devices) and JAX_PLATFORMS come from tests/conftest.py.
  return {**os.environ, "PYTHONPATH": REPO_ROOT}


def error_lines(stderr: str) -> list[str]:
  """The non-empty lines of a run's stderr other than its progress lines (`jaxalign: ...`,
  the start summary, passes, compile): what a failing run says about the failure."""
  return [line for line in stderr.splitlines()
          if line.strip() and not line.startswith("jaxalign: ")]


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
  """`jaxalign train ARGS` in this process: (exit status, non-empty stderr lines)."""
  status = cli.main(["train", *args])
  err = capsys.readouterr().err
  return status, [line for line in err.splitlines() if line.strip()]


# Bounds only a hung subprocess run: a test waits for the run's progress, however slow,
# and fails (never goes on) when this passes.
HANG_S = 900


def wait_for(condition, proc, what: str, *, poll_s: float = 0.05) -> None:
  """Polls until `condition()`: the test acts on the run's progress, never on a deadline.

  Fails if the run ends first (its output in the message) or after HANG_S (a hang).
  """
  hang = time.monotonic() + HANG_S
  while not condition():
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n"
                           f"{out or ''}{err or ''}")
    assert time.monotonic() < hang, f"no {what} after {HANG_S} s: the run hangs"
    time.sleep(poll_s)


def logged_rows(workdir) -> int:
  """Rows in WORKDIR/metrics.jsonl so far (0 before the first)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


def params(workdir, config) -> list[np.ndarray]:
  """The trainable parameters of a run's latest checkpoint, as host arrays."""
  _, p, _ = rundir.load_run_params(str(workdir), config)
  return jax.tree.leaves(jax.device_get(p))


def assert_bit_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def complete_steps(workdir) -> list[int]:
  """The checkpoint steps Orbax would restore from (complete ones only)."""
  checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=100)
  try:
    return sorted(checkpointer.all_steps())
  finally:
    checkpointer.close()


@contextlib.contextmanager
def compile_events():
  """Collects the JAX lowering/compilation events fired inside the block.

  Tracing alone (`jax.eval_shape`, which validation uses for abstract shapes) is
  not compiling and is not collected.
  """
  events: list[str] = []

  def listener(event: str, duration: float, **kwargs):
    del duration, kwargs
    if event in COMPILE_EVENTS:
      events.append(event)

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    monitoring.unregister_event_duration_listener(listener)
