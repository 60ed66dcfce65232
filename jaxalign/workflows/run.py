"""Every run mode, dispatched in one place.

A recipe is one of config.RUN_MODES: rounds of generate-score-train
(`iterative.rounds > 0`, workflows/iterative.py), one stage per domain
(`data.domains`, workflows/continual.py, OFS-DPO and COFS-DPO), a scalar reward
model (one run of train/loop.py, then exported by train/reward.py), or one run
(train/loop.py; online methods sample inside it). The CLI, the demos and the
tests all train through `train` here; the layers below it never dispatch to the
ones above.
"""

from __future__ import annotations

import jax
import ml_collections

from jaxalign import config as config_lib
from jaxalign.train import loop, reward
from jaxalign.train.rundir import RunResult
from jaxalign.workflows import continual, iterative


def train(config: config_lib.RunSpec | ml_collections.ConfigDict, workdir: str, *,
          progress: bool = True, devices=None, stop_after: int | None = None) -> RunResult:
  """Trains `config` in `workdir` with the trainer its mode needs, resuming what exists.

  Args: as jaxalign.train.loop.train, except `config`: a RunSpec (config.resolve, as
  the CLI passes it) or a recipe, resolved here once (the one entry point that takes
  either; every trainer below takes the spec); `stop_after` is honoured by single
  runs (reward models too) and iterative rounds.
  """
  devices = jax.devices() if devices is None else list(devices)
  spec = config_lib.resolve(config, len(devices), platform=devices[0].platform)
  trainers = {
      "iterative": lambda: iterative.train_rounds(spec, workdir, progress=progress,
                                                  devices=devices, stop_after=stop_after),
      "continual": lambda: continual.train(spec, workdir, progress=progress, devices=devices),
      # The one loop, then the trained model's directory (train/reward.py).
      "reward_model": lambda: reward.export(spec, loop.run_loop(
          spec, workdir, progress=progress, devices=devices, stop_after=stop_after),
          devices=devices),
      "run": lambda: loop.train(spec, workdir, progress=progress, devices=devices,
                                stop_after=stop_after),
  }
  assert trainers.keys() == config_lib.RUN_MODES.keys()
  return trainers[spec.mode]()
