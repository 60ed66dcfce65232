"""Every registered method trains end to end on the bundled task, and moves its metric."""

import ml_collections
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.train import loop
from tests.train.helpers import read_metrics, tiny_config

# method -> (loss, hparams, data source, options, metric that must rise[, config overrides])
CASES = {
    "dpo": ("dpo", dict(beta=0.1), "toy:pairwise?n=64", {}, "rewards/margins"),
    "ipo": ("dpo", dict(beta=0.1, variant="ipo"), "toy:pairwise?n=64", {}, "rewards/margins"),
    "hinge": ("dpo", dict(beta=0.1, variant="hinge"), "toy:pairwise?n=64", {},
              "rewards/margins"),
    "robust": ("dpo", dict(beta=0.1, variant="robust", label_smoothing=0.1),
               "toy:pairwise?n=64", {}, "rewards/margins"),
    "ln_dpo": ("ln_dpo", dict(beta=0.1), "toy:pairwise?n=64", {}, "rewards/margins"),
    "bco": ("bco", dict(beta=0.1), "toy:unpaired?n=64", {}, "rewards/margins"),
    "bco_udm": ("bco", dict(beta=0.1), "toy:unpaired?n=64",
                dict(udm="model", prompt_sample_size=32), "rewards/margins"),
    "kto": ("kto", dict(beta=0.1), "toy:unpaired?n=64", {}, "rewards/margins"),
    "apo_zero_unpaired": ("apo_zero_unpaired", dict(beta=0.1), "toy:unpaired?n=64", {},
                          "rewards/margins"),
    "d2o": ("d2o", dict(beta=0.1, alpha=0.1), "toy:negatives?n=64&k=3", {}, "rewards/margins"),
    "grao": ("grao", dict(), "toy:groups?n=64&g=3", {}, "-loss"),
    "aft": ("aft", dict(), "toy:ranked?n=64&g=3", {}, "-loss"),
    "ofs_dpo": ("ofs_dpo", dict(beta=0.1, alpha=0.1, swap_interval=4), "toy:pairwise?n=64", {},
                "fast/rewards/margins", {"lora.rank": 4, "lora.alpha": 8.0,
                                         "reference.mode": "frozen"}),
}


def test_every_registered_loss_has_a_case():
  # reward_model trains a scalar-head model with its own trainer (train/reward.py).
  assert {c[0] for c in CASES.values()} >= set(losses.LOSSES) - {"sft", "reward_model"}


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_trains_and_moves_its_metric(method, tmp_path):
  loss, hparams, source, options, metric, *over = CASES[method]
  cfg = tiny_config(total_steps=12, log_every=1, **{"optim.lr": 3e-3, "optim.warmup_steps": 1,
                                                     "data.train_path": source,
                                                     **(over[0] if over else {})})
  cfg.loss.name = loss
  cfg.loss.hparams = ml_collections.ConfigDict(hparams)
  cfg.loss.options = ml_collections.ConfigDict(options)
  loop.train(cfg, str(tmp_path), progress=False)
  rows = read_metrics(tmp_path)
  assert all(np.isfinite(r["loss"]) for r in rows)
  sign, key = (-1, metric[1:]) if metric.startswith("-") else (1, metric)
  values = sign * np.array([r[key] for r in rows])
  assert values[-3:].mean() > values[:3].mean(), (key, values)
