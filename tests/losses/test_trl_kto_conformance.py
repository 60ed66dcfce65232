"""TRL conformance of KTO, APO-zero unpaired and the Bradley-Terry reward loss.

The expected numbers in trl_kto_vectors.json come from TRL 1.16.0's own
`KTOTrainer._compute_loss` and `RewardTrainer.compute_loss` (torch 2.13.0 CPU,
float64), run by make_trl_kto_vectors.py on stand-in objects; TRL is not
needed here. Inputs are float32-exact and jaxalign runs in float32, so the
tolerance is float32's: rtol 1e-5 (atol 1e-6 for values near zero).

Cases: kto (beta 0.1; beta 0.5 with desirable/undesirable weights 1.33/0.8;
ties, policy == reference so the KL estimate is 0; extreme log-ratios up to
+-2000 with beta 1; a negative KL estimate clamped to 0; an all-desirable
batch), apo_zero_unpaired (beta 0.1; weights 0.7/1.2; ties; extreme), and
the reward loss (plain, margin, centering 0.01 and 0.1, half the pairs tied,
saturated scores with margin and centering).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.kto import apo_zero_unpaired_loss, kto_loss
from jaxalign.losses.reward import bradley_terry_loss

RTOL, ATOL = 1e-5, 1e-6

with open(os.path.join(os.path.dirname(__file__), "trl_kto_vectors.json")) as _f:
  VECTORS = json.load(_f)
CASES = {c["name"]: c for c in VECTORS["cases"]}
KTO = [n for n, c in CASES.items() if c["jaxalign"]["fn"] != "bradley_terry_loss"]
REWARD = [n for n, c in CASES.items() if c["jaxalign"]["fn"] == "bradley_terry_loss"]


def _f32(x):
  return jnp.asarray(np.asarray(x, np.float32))


def _check(name, ours, trl):
  for key, want in trl.items():
    got = float(ours[key])
    assert np.isclose(got, want, rtol=RTOL, atol=ATOL), f"{name}: {key} {got} != TRL {want}"


def test_vectors_cover_every_case():
  assert len(KTO) == 10 and len(REWARD) == 6
  assert VECTORS["trl_version"] == "1.16.0"


@pytest.mark.parametrize("name", KTO)
def test_kto_family_matches_trl(name):
  case = CASES[name]
  x, kw = case["inputs"], case["jaxalign"]["kwargs"]
  args = (_f32(x["logps"]), _f32(x["ref_logps"]), jnp.asarray(x["labels"]))
  if case["jaxalign"]["fn"] == "kto_loss":
    loss, metrics = kto_loss(*args, _f32(x["kl_logps"]), _f32(x["ref_kl_logps"]), **kw)
  else:
    loss, metrics = apo_zero_unpaired_loss(*args, **kw)
  _check(name, {**metrics, "loss": loss}, case["trl"])
  # TRL logs no per-class metric for an empty class; ours are 0 there.
  if not any(not v for v in x["labels"]):
    assert float(metrics["count/rejected"]) == 0.0 and float(metrics["rewards/rejected"]) == 0.0


@pytest.mark.parametrize("name", REWARD)
def test_reward_loss_matches_trl(name):
  case = CASES[name]
  x = case["inputs"]
  margin = _f32(x["margin"]) if "margin" in x else None
  loss, metrics = bradley_terry_loss(_f32(x["chosen"]), _f32(x["rejected"]), margin,
                                     **case["jaxalign"]["kwargs"])
  _check(name, {**metrics, "loss": loss}, case["trl"])
