"""Every run mode, dispatched in one place.

A recipe is one of: rounds of generate-score-train (`iterative.rounds > 0`,
workflows/iterative.py), one stage per domain (`data.domains`,
workflows/continual.py, OFS-DPO and COFS-DPO), a scalar reward model (a loss
whose trainer is "reward_model", train/reward.py), or one run (train/loop.py).
The CLI, the demos and the tests all train through `train` here; the layers
below it never dispatch to the ones above.
"""

from __future__ import annotations

import ml_collections

from jaxalign import config as config_lib
from jaxalign.train import loop, reward
from jaxalign.train.rundir import RunResult
from jaxalign.workflows import continual, iterative


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          devices=None, stop_after: int | None = None) -> RunResult:
  """Trains `config` in `workdir` with the trainer its mode needs, resuming what exists.

  Args: as jaxalign.train.loop.train; `stop_after` is honoured by single runs and
  iterative rounds.
  """
  which = config_lib.run_mode(config)
  if which == "iterative":
    return iterative.train_rounds(config, workdir, progress=progress, devices=devices,
                                  stop_after=stop_after)
  if which == "continual":
    return continual.train(config, workdir, progress=progress, devices=devices)
  if which == "reward_model":
    return reward.train(config, workdir, progress=progress, devices=devices)
  return loop.train(config, workdir, progress=progress, devices=devices, stop_after=stop_after)
