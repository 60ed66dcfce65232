"""Generates tests/losses/trl_kto_vectors.json: TRL's KTO and reward-model numbers.

A sibling of make_trl_vectors.py (the pairwise DPO-family vectors), kept
separate so the two files never conflict. The JSON in the repo was produced by
TRL 1.16.0 with torch 2.13.0 (CPU) and the transformers that TRL pulled
(recorded in the file), float64 tensors. jaxalign never imports TRL; the test
test_trl_kto_conformance.py only reads the JSON.

How to run (from the repo root; PyPI access needed, the project venv untouched):

  python3 -m venv /work/trlvenv-k && . /work/trlvenv-k/bin/activate
  pip install torch==2.13.0     # first (a local CPU wheel where there is one): else CUDA
  pip install "trl==1.16.0"
  python tests/losses/make_trl_kto_vectors.py

What is called. No model is built: TRL's methods run as unbound functions on a
stand-in `self` with exactly the attributes they read (copied from a real
config object as __init__ does); the model is a stub whose per-token log-probs
sum to the given per-sequence values (and, for the reward model, whose logits
are the given scores). So TRL's own loss and metric code runs unchanged:

  * `trl.KTOTrainer._compute_loss` (which calls the real `_compute_kl_logps`),
    with `precompute_ref_log_probs=True` (reference log-probs of the
    completions and of the KL sequences given in the batch), loss_type "kto"
    and "apo_zero_unpaired".
  * `trl.RewardTrainer.compute_loss`, without and with a `margin` column and
    with `center_rewards_coefficient`.

Inputs come from fixed NumPy seeds, rounded to float32 values so jaxalign
(float32) and TRL (float64) see the same numbers. Cases include ties (policy
equal to reference everywhere, so the KL estimate is 0), extreme log-ratios
(|S - S_ref| up to 2000, so sigmoids saturate), a negative KL estimate (clamped
to 0), one-class batches, and unequal class weights.
"""

import argparse
import json
import math
import os
import types
from collections import defaultdict

import numpy as np
import torch
import transformers
import trl

B = 8
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trl_kto_vectors.json")
DT = torch.float64


def _f32(x):
  return [float(v) for v in np.asarray(x, np.float32)]


def _t(x):
  return torch.tensor(x, dtype=DT)


class _Accelerator:
  """Single-process stand-in for accelerate.Accelerator."""
  device = torch.device("cpu")

  def gather_for_metrics(self, x):
    return x

  def gather(self, x):
    return x


def _config(cls, **kw):
  return cls(output_dir="/tmp/trl_kto_vectors_unused", report_to=[], use_cpu=True,
             bf16=False, **kw)


# ------------------------------------------------------------------ inputs


def _unpaired(rng, *, kind):
  """One batch: logps/ref_logps of the completions and of the KL sequences."""
  ref = rng.uniform(-250.0, -30.0, B)
  ref_kl = rng.uniform(-250.0, -30.0, B)
  labels = rng.permutation(np.arange(B) < 5)
  if kind == "normal":
    logps, kl = ref + rng.normal(0.0, 6.0, B), ref_kl + rng.normal(2.0, 6.0, B)
  elif kind == "ties":               # policy == reference: every ratio and the KL are 0
    logps, kl = ref.copy(), ref_kl.copy()
  elif kind == "extreme":            # saturated sigmoids, both signs
    logps = ref + rng.choice([-2000.0, -300.0, 300.0, 2000.0], B)
    kl = ref_kl + rng.choice([-50.0, 900.0], B)
  elif kind == "negative_kl":        # the KL estimate < 0 -> clamped to 0
    logps, kl = ref + rng.normal(0.0, 6.0, B), ref_kl - np.abs(rng.normal(8.0, 2.0, B))
  elif kind == "all_desirable":
    logps, kl = ref + rng.normal(0.0, 6.0, B), ref_kl + rng.normal(1.0, 3.0, B)
    labels = np.ones(B, bool)
  else:
    raise ValueError(kind)
  return {"logps": _f32(logps), "ref_logps": _f32(ref), "kl_logps": _f32(kl),
          "ref_kl_logps": _f32(ref_kl), "labels": [bool(v) for v in labels]}


def _kto_step(args, batch):
  from trl import KTOTrainer

  s = types.SimpleNamespace()
  s.args = args
  s.model = types.SimpleNamespace(training=True)
  s.accelerator = _Accelerator()
  s.beta = args.beta
  s.precompute_ref_logps = True
  s.loss_type = args.loss_type
  s.desirable_weight = args.desirable_weight
  s.undesirable_weight = args.undesirable_weight
  s.calculate_KL = args.loss_type not in ["apo_zero_unpaired"]   # as KTOTrainer.__init__
  s.aux_loss_enabled = False
  s._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
  s._total_train_tokens = 0
  s._tp_size = 1
  s._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, s)

  T = 6
  completion_mask = torch.zeros(B, T, dtype=torch.long)
  completion_mask[:, 2:] = 1
  main_ids = torch.zeros(B, T, dtype=torch.long)
  kl_ids = torch.ones(B, T, dtype=torch.long)     # the stub tells the two forwards apart

  def per_token(values):
    lp = torch.zeros(B, T - 1, dtype=DT)
    lp[:, -1] = _t(values)                          # sums to the sequence log-prob
    return lp

  class _Model:
    def __call__(self, input_ids, **kw):
      lp = per_token(batch["kl_logps"] if bool(input_ids[0, 0] == 1) else batch["logps"])
      z = torch.zeros(B, T - 1, dtype=DT)
      return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z)

  inputs = {"input_ids": main_ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
            "completion_mask": completion_mask,
            "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(B, T, dtype=torch.long),
            "KL_completion_mask": completion_mask.clone(),
            "label": torch.tensor(batch["labels"]),
            "ref_logps": _t(batch["ref_logps"]), "ref_KL_logps": _t(batch["ref_kl_logps"])}
  loss = KTOTrainer._compute_loss(s, _Model(), inputs, False)
  out = {"loss": float(loss)}
  for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected"):
    if s._metrics["train"].get(k):
      (out[k],) = s._metrics["train"][k]
  return out


KTO_CASES = [
    # name, loss_type, TRL KTOConfig kwargs, input kind, seed
    ("kto_beta0.1", "kto", dict(beta=0.1), "normal", 1),
    ("kto_beta0.5_weights", "kto", dict(beta=0.5, desirable_weight=1.33,
                                        undesirable_weight=0.8), "normal", 2),
    ("kto_ties", "kto", dict(beta=0.1), "ties", 3),
    ("kto_extreme", "kto", dict(beta=1.0), "extreme", 4),
    ("kto_negative_kl", "kto", dict(beta=0.2), "negative_kl", 5),
    ("kto_all_desirable", "kto", dict(beta=0.1), "all_desirable", 6),
    ("apo_zero_unpaired_beta0.1", "apo_zero_unpaired", dict(beta=0.1), "normal", 7),
    ("apo_zero_unpaired_weights", "apo_zero_unpaired",
     dict(beta=0.3, desirable_weight=0.7, undesirable_weight=1.2), "normal", 8),
    ("apo_zero_unpaired_ties", "apo_zero_unpaired", dict(beta=0.1), "ties", 9),
    ("apo_zero_unpaired_extreme", "apo_zero_unpaired", dict(beta=1.0), "extreme", 10),
]


def kto_cases():
  from trl import KTOConfig
  cases = []
  for name, loss_type, kw, kind, seed in KTO_CASES:
    batch = _unpaired(np.random.default_rng(seed), kind=kind)
    args = _config(KTOConfig, loss_type=loss_type, precompute_ref_log_probs=True, **kw)
    cases.append({
        "name": f"trl{trl.__version__}/{name}", "trl_version": trl.__version__,
        "trl_call": "KTOTrainer._compute_loss (stub model, precomputed ref log-probs)",
        "trl_setting": {"loss_type": loss_type, **kw},
        "jaxalign": {"fn": "kto_loss" if loss_type == "kto" else "apo_zero_unpaired_loss",
                     "kwargs": kw},
        "seed": seed, "inputs": batch, "trl": _kto_step(args, batch)})
  return cases


# ------------------------------------------------------------- reward model


def _reward_step(args, batch):
  from trl import RewardTrainer

  s = types.SimpleNamespace()
  s.args = args
  s.model = types.SimpleNamespace(training=True)
  s.accelerator = _Accelerator()
  s._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
  s._total_train_tokens = 0
  s._tp_size = 1
  logits = _t(batch["chosen"] + batch["rejected"])[:, None]   # [chosen; rejected]

  def model(**kw):
    return types.SimpleNamespace(logits=logits)

  inputs = {"input_ids": torch.zeros(2 * B, 4, dtype=torch.long),
            "attention_mask": torch.ones(2 * B, 4, dtype=torch.long)}
  if "margin" in batch:
    inputs["margin"] = _t(batch["margin"])
  loss = RewardTrainer.compute_loss(s, model, inputs)
  out = {"loss": float(loss)}
  for k in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
    (out[k],) = s._metrics["train"][k]
  return out


def _pairs(rng, kind, with_margin):
  if kind == "ties":                  # half the pairs tied: accuracy counts them wrong
    c = rng.normal(0.0, 2.0, B)
    r = np.where(np.arange(B) % 2 == 0, c, rng.normal(0.0, 2.0, B))
  elif kind == "extreme":
    c, r = rng.choice([-60.0, 60.0], B), rng.choice([-60.0, 60.0], B)
  else:
    c, r = rng.normal(0.5, 2.0, B), rng.normal(-0.5, 2.0, B)
  out = {"chosen": _f32(c), "rejected": _f32(r)}
  if with_margin:
    out["margin"] = _f32(rng.uniform(0.0, 2.0, B))
  return out


REWARD_CASES = [
    # name, RewardConfig kwargs, input kind, margin, seed
    ("bt", dict(), "normal", False, 11),
    ("bt_margin", dict(), "normal", True, 12),
    ("bt_center0.01", dict(center_rewards_coefficient=0.01), "normal", False, 13),
    ("bt_margin_center0.1", dict(center_rewards_coefficient=0.1), "normal", True, 14),
    ("bt_ties", dict(), "ties", False, 15),
    ("bt_extreme", dict(center_rewards_coefficient=0.01), "extreme", True, 16),
]


def reward_cases():
  from trl import RewardConfig
  cases = []
  for name, kw, kind, margin, seed in REWARD_CASES:
    batch = _pairs(np.random.default_rng(seed), kind, margin)
    args = _config(RewardConfig, **kw)
    cases.append({
        "name": f"trl{trl.__version__}/{name}", "trl_version": trl.__version__,
        "trl_call": "RewardTrainer.compute_loss (stub model returning the scores)",
        "trl_setting": {"center_rewards_coefficient": args.center_rewards_coefficient,
                        "margin": margin},
        "jaxalign": {"fn": "bradley_terry_loss",
                     "kwargs": {"center_rewards_coefficient":
                                args.center_rewards_coefficient or 0.0}},
        "seed": seed, "inputs": batch, "trl": _reward_step(args, batch)})
  return cases


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=OUT)
  out_path = parser.parse_args().out
  cases = kto_cases() + reward_cases()
  for c in cases:
    for k, v in c["trl"].items():
      if not math.isfinite(v):
        raise SystemExit(f"{c['name']}: non-finite {k}={v}")
  data = {
      "about": ("TRL conformance vectors for jaxalign's KTO, APO-zero unpaired and "
                "Bradley-Terry reward losses, made by tests/losses/make_trl_kto_vectors.py; "
                "read by test_trl_kto_conformance.py."),
      "trl_version": trl.__version__, "torch": torch.__version__,
      "transformers": transformers.__version__, "dtype": "float64",
      "cases": cases,
  }
  with open(out_path, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  print(f"TRL {trl.__version__}: wrote {len(cases)} cases to {out_path}")


if __name__ == "__main__":
  main()
