"""Generates tests/losses/trl_vectors.json: TRL's own loss outputs on fixed inputs.

The file in the repo was produced by TRL 0.28.0 (transformers 5.1.0) and TRL
1.16.0 (transformers 5.25.0), each with torch 2.13.0 (CPU), float64 tensors
(side venvs made as below).
jaxalign never imports TRL: the tests in
test_trl_conformance.py only read the JSON. Re-run this script only to refresh
the vectors or to add a TRL version.

How to run (from the repo root; PyPI access needed, the project venv untouched):

  python3 -m venv /tmp/trlvenv && . /tmp/trlvenv/bin/activate
  pip install torch==2.13.0          # first: otherwise pip pulls a CUDA build
  pip install "trl==0.28.0" "transformers==5.1.0" joblib
  # transformers 5.1.0: with later ones (e.g. 5.23) TRL 0.28's optional-import
  # checks misfire (`import weave`); joblib: BCOTrainer's module imports it.
  python tests/losses/make_trl_vectors.py      # writes the TRL 0.28.0 cases

  python3 -m venv /tmp/trlvenv2 && . /tmp/trlvenv2/bin/activate
  pip install torch==2.13.0 && pip install "trl==1.16.0"
  python tests/losses/make_trl_vectors.py      # merges in the TRL 1.16.0 cases

Each run replaces the cases of the TRL version it runs under and keeps the
others. The inputs come from a fixed NumPy seed, independent of TRL, and are
rounded to float32 values so jaxalign (float32) and TRL (float64) see exactly
the same numbers.

What is called (docs/losses.md, "Compared with which TRL"). No model is built: TRL's trainer methods
are called as unbound functions on a minimal stand-in `self` that carries
exactly the attributes those methods read, copied from a real TRL config
object as the trainer's __init__ does; the model forward is a stub returning
the given per-sequence log-probs. So TRL's loss *and* metric code runs as is.

  * TRL <= 0.28 (`DPOTrainer.get_batch_loss_metrics`, which calls the real
    `DPOTrainer.dpo_loss`; reference log-probs passed precomputed in the batch):
    sigmoid, cDPO (sigmoid + label_smoothing), robust, ipo, hinge,
    reference_free, bco_pair with the running-mean shift over 2 batches (the
    real `RunningMoments` on the stand-in). For ipo, 0.28's
    `concatenated_forward` divides every sequence's summed log-prob by its
    completion length (`all_logps / loss_mask.sum(-1)`, policy and reference
    alike); the stub applies that one division.
  * TRL 0.28 `trl.experimental.bco.BCOTrainer.get_batch_loss_metrics` (real
    `bco_loss`, `_get_prompt_embeddings`, `_vectorize_prompt`, `_get_udm_weight`,
    `_get_chosen_prob`; the embedding model and the fitted classifier are
    stubs whose predicted p(desirable) is given): unpaired BCO over 2 training
    batches plus 1 eval batch, without and with UDM weights.
  * TRL >= 1.4 (`DPOTrainer._compute_loss`, a stub model whose per-token
    log-probs sum to the given sequence log-probs, `precompute_ref_log_probs`):
    sigmoid_norm (LN-DPO), ipo, sigmoid, robust, hinge, bco_pair (no shift).
    TRL 1.4.0's `sigmoid_norm` branch is textually identical to 1.16.0's.
  * TRL >= 1.16 only (cases_v1_types, inputs from TYPES_SEED: 3 random seeds,
    ties = policy equal to reference, extreme log-ratios of 300 to 600):
    every other `loss_type` of DPOTrainer (exo_pair, nca_pair, bco_pair,
    sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft,
    sigmoid_norm), two weighted lists (`loss_type=[...]`, `loss_weights`),
    `ld_alpha` and `use_weighting` (the stub model also returns
    `log_sum_sq_probs`), through `_compute_loss`; and
    `trl.experimental.cpo.CPOTrainer` (sigmoid, hinge, ipo, simpo) and
    `trl.experimental.orpo.ORPOTrainer` through `get_batch_loss_metrics` with a
    stub `concatenated_forward` returning the (mean) log-probs and the chosen
    token-mean NLL over the response (CPO's NLL; ORPO's for a one-token prompt,
    so the ORPO inputs carry no unscored tokens). Per-example losses: the same
    TRL call on each row alone (none for AOT, whose rows are coupled by sorting).
  * TRL >= 1.16, ORPO through its own forward (orpo_model/<set>): a tiny
    randomly initialised float64 `LlamaForCausalLM` (no download) and pairs laid
    out as ORPOTrainer's tokenizer lays them out (BOS + prompt of 1 to 6 tokens,
    response + EOS, right padding, labels -100 on prompt and padding);
    `ORPOTrainer.get_batch_loss_metrics` runs the real `concatenated_forward`
    (`concatenated_inputs`, its cross-entropy NLL over prompt + response,
    `get_batch_logps`) and `odds_ratio_loss`. jaxalign's inputs are summed from
    the same model's logits by TRL's `ORPOTrainer.get_batch_logps`: the response
    labels, and the chosen sequence's other real tokens (the unscored_* columns).
  * TRL 0.28 `bco_pair` over batches of 8, 3 and 8 pairs, with its
    RunningMoments var and count (jaxalign `shift_count="batch"`).
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
from packaging.version import Version

SEED = 20260724
B = 8
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trl_vectors.json")
TORCH_DTYPE = torch.float64


# ----------------------------------------------------------------- inputs


def _f32(x):
  """float32-representable float64 values, as a plain list."""
  return [float(v) for v in np.asarray(x, np.float32)]


def _paired_batch(rng):
  ref_chosen = np.asarray(rng.uniform(-250.0, -30.0, B))
  ref_rejected = np.asarray(rng.uniform(-250.0, -30.0, B))
  return {
      "chosen_logps": _f32(ref_chosen + rng.normal(0.0, 6.0, B)),
      "rejected_logps": _f32(ref_rejected + rng.normal(0.0, 6.0, B)),
      "ref_chosen_logps": _f32(ref_chosen),
      "ref_rejected_logps": _f32(ref_rejected),
      "chosen_lengths": [int(v) for v in rng.integers(5, 120, B)],
      "rejected_lengths": [int(v) for v in rng.integers(5, 120, B)],
  }


def _unpaired_batch(rng, n_desirable):
  ref = np.asarray(rng.uniform(-250.0, -30.0, B))
  labels = np.zeros(B, bool)
  labels[rng.permutation(B)[:n_desirable]] = True
  # p(desirable prompt) from the UDM classifier; spans both clip bounds.
  p = np.asarray([0.02, 0.2, 0.4, 0.5, 0.62, 0.8, 0.93, 0.995])[rng.permutation(B)]
  return {
      "logps": _f32(ref + rng.normal(0.0, 6.0, B)),
      "ref_logps": _f32(ref),
      "labels": [bool(v) for v in labels],
      "p_desirable": _f32(p),
  }


def make_inputs():
  rng = np.random.default_rng(SEED)
  return {
      "paired": [_paired_batch(rng), _paired_batch(rng)],
      # Unequal desirable counts (5 then 3) so pooled and per-class means differ.
      "unpaired": [_unpaired_batch(rng, 5), _unpaired_batch(rng, 3), _unpaired_batch(rng, 4)],
  }


def _t(x):
  return torch.tensor(x, dtype=TORCH_DTYPE)


# ---------------------------------------------------------------- stand-ins


class _Accelerator:
  """Single-process stand-in for accelerate.Accelerator (what the methods call)."""
  device = torch.device("cpu")
  use_distributed = False
  process_index = 0
  num_processes = 1

  def gather_for_metrics(self, x):
    return x

  def gather(self, x):
    return x

  def pad_across_processes(self, x, **_):
    return x

  def reduce(self, x, reduction="mean"):
    return x


def _config(config_cls, **kw):
  return config_cls(output_dir="/tmp/trl_vectors_unused", report_to=[], use_cpu=True,
                    bf16=False, **kw)


# ------------------------------------------------------------ TRL <= 0.28 DPO


def _dpo_v028_standin(args):
  """The attributes DPOTrainer (0.28) __init__ sets and get_batch_loss_metrics /
  dpo_loss read."""
  from trl.trainer.dpo_config import FDivergenceConstants
  from trl.trainer.dpo_trainer import DPOTrainer
  from trl.trainer.utils import RunningMoments

  s = types.SimpleNamespace()
  s.args = args
  s.accelerator = _Accelerator()
  s.beta = args.beta
  s.label_smoothing = args.label_smoothing
  s.loss_type = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
  s.loss_weights = args.loss_weights
  s.use_weighting = args.use_weighting
  s.aux_loss_enabled = False
  s.reference_free = args.reference_free
  s.f_divergence_type = args.f_divergence_type
  s.f_divergence_params = {
      FDivergenceConstants.ALPHA_DIVERGENCE_COEF_KEY: args.f_alpha_divergence_coef}
  s.running = RunningMoments(accelerator=s.accelerator)  # bco_pair's shift
  s.dpo_loss = types.MethodType(DPOTrainer.dpo_loss, s)
  return s, DPOTrainer


def _dpo_v028_step(s, trainer_cls, batch):
  ipo = "ipo" in s.loss_type
  c, r = _t(batch["chosen_logps"]), _t(batch["rejected_logps"])
  rc, rr = _t(batch["ref_chosen_logps"]), _t(batch["ref_rejected_logps"])
  if ipo:  # concatenated_forward (0.28): all_logps / loss_mask.sum(-1), policy and ref
    lc, lr = _t(batch["chosen_lengths"]), _t(batch["rejected_lengths"])
    c, r, rc, rr = c / lc, r / lr, rc / lc, rr / lr

  n = len(c)

  def concatenated_forward(model, batch, is_ref_model=False):
    return {"chosen_logps": c, "rejected_logps": r,
            "mean_chosen_logits": torch.zeros(n, dtype=TORCH_DTYPE),
            "mean_rejected_logits": torch.zeros(n, dtype=TORCH_DTYPE)}

  s.concatenated_forward = concatenated_forward
  loss, metrics = trainer_cls.get_batch_loss_metrics(
      s, None, {"ref_chosen_logps": rc, "ref_rejected_logps": rr}, train_eval="train")
  out = {"loss": float(loss)}
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"):
    out[k] = float(metrics[k])
  if "bco_pair" in s.loss_type:
    out["delta"] = float(s.running.mean)
    out["state/var"] = float(s.running.var)
    out["state/count"] = float(s.running.count)
  return out


DPO_V028_CASES = [
    # name, jaxalign kwargs, TRL DPOConfig kwargs, steps
    ("sigmoid", dict(variant="sigmoid", beta=0.1),
     dict(loss_type="sigmoid", beta=0.1), 1),
    ("cdpo_eps0.1", dict(variant="sigmoid", beta=0.1, label_smoothing=0.1),
     dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.1), 1),
    ("robust_eps0.1", dict(variant="robust", beta=0.1, label_smoothing=0.1),
     dict(loss_type="robust", beta=0.1, label_smoothing=0.1), 1),
    ("ipo_tau0.1", dict(variant="ipo", beta=0.1, ipo_length_norm=True),
     dict(loss_type="ipo", beta=0.1), 1),
    ("hinge_beta0.5", dict(variant="hinge", beta=0.5),
     dict(loss_type="hinge", beta=0.5), 1),
    ("reference_free", dict(variant="sigmoid", beta=0.05, reference_free=True),
     dict(loss_type="sigmoid", beta=0.05, reference_free=True), 1),
    ("bco_pair_delta", dict(beta=0.1),
     dict(loss_type="bco_pair", beta=0.1), 2),
    # Batches of 8, 3 and 8 pairs: TRL 0.28 counts each batch's mean once, so delta
    # is the mean of the three batch means (jaxalign shift_count="batch").
    ("bco_pair_delta_unequal", dict(beta=0.1, shift_count="batch"),
     dict(loss_type="bco_pair", beta=0.1), 3),
]


def cases_v028(inputs):
  from trl import DPOConfig
  cases = []
  for name, jax_kw, trl_kw, steps in DPO_V028_CASES:
    args = _config(DPOConfig, **trl_kw)
    s, trainer_cls = _dpo_v028_standin(args)
    step_records = []
    for i in range(steps):
      batch = inputs["paired"][i % 2]
      if name == "bco_pair_delta_unequal" and i == 1:
        batch = {k: v[:3] for k, v in batch.items()}
      step_records.append({"inputs": batch, "trl": _dpo_v028_step(s, trainer_cls, batch)})
    loss_name = "bco_pair_loss" if trl_kw["loss_type"] == "bco_pair" else "dpo_loss"
    cases.append({
        "name": f"trl{trl.__version__}/{name}",
        "trl_version": trl.__version__,
        "trl_call": "DPOTrainer.get_batch_loss_metrics -> DPOTrainer.dpo_loss",
        "trl_setting": {k: v for k, v in trl_kw.items()},
        "jaxalign": {"fn": loss_name, "kwargs": jax_kw,
                     "state": "init_bco_state()" if loss_name == "bco_pair_loss" else None},
        "steps": step_records,
    })
  cases.extend(_bco_unpaired_v028(inputs))
  return cases


# -------------------------------------------------------- TRL 0.28 unpaired BCO


def _bco_unpaired_v028(inputs):
  from trl.experimental.bco import BCOConfig, BCOTrainer
  from trl.trainer.utils import RunningMoments

  cases = []
  for udm in (False, True):
    args = _config(BCOConfig, beta=0.1)
    s = types.SimpleNamespace()
    s.args = args
    s.accelerator = _Accelerator()
    s.beta = args.beta
    s.aux_loss_enabled = False
    s.running = RunningMoments(accelerator=s.accelerator)
    s.match_underlying_distribution = udm  # a property of the real class
    s.processing_class = types.SimpleNamespace(pad_token_id=0)
    s.embedding_tokenizer = types.SimpleNamespace(pad_token_id=-1) if udm else None
    for meth in ("bco_loss", "_get_prompt_embeddings", "_vectorize_prompt", "_get_udm_weight",
                 "_get_chosen_prob"):
      setattr(s, meth, types.MethodType(getattr(BCOTrainer, meth), s))
    # The fitted LogisticRegression, stubbed: the one-dim "embedding" is p itself.
    s.clf = types.SimpleNamespace(
        predict_proba=lambda e: np.stack([1.0 - e[:, 0], e[:, 0]], axis=1).astype(np.float64))

    step_records = []
    for i, do_train in enumerate((True, True, False)):
      batch = inputs["unpaired"][i]
      logps, ref = _t(batch["logps"]), _t(batch["ref_logps"])
      labels = batch["labels"]
      chosen_idx = [j for j in range(B) if labels[j] is True]
      rejected_idx = [j for j in range(B) if labels[j] is False]

      def forward(model, b, logps=logps, ci=chosen_idx, ri=rejected_idx):
        # BCOTrainer.forward's return: policy logps and summed logits, split by label.
        return (logps[ci], logps[ri], torch.zeros(len(ci), dtype=TORCH_DTYPE),
                torch.zeros(len(ri), dtype=TORCH_DTYPE))

      s.forward = forward
      p = _t(batch["p_desirable"])
      s.embedding_func = lambda input_ids, attention_mask, p=p: p[:, None]
      trl_batch = {"reference_logps": ref, "label": labels,
                   "embedding_input_ids": torch.ones(B, 3, dtype=torch.long),
                   "embedding_attention_mask": torch.ones(B, 3, dtype=torch.long)}
      loss, metrics = BCOTrainer.get_batch_loss_metrics(s, None, trl_batch, do_train=do_train)
      out = {"loss": float(loss), "delta": float(metrics["delta"])}
      for side in ("chosen", "rejected"):
        n = metrics[f"count/{side}"]
        out[f"count/{side}"] = float(n)
        out[f"rewards/{side}"] = float(metrics[f"rewards/{side}_sum"]) / n
        out[f"logps/{side}"] = float(metrics[f"logps/{side}_sum"]) / n
      out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
      if udm:
        w = BCOTrainer._get_udm_weight(s, p[rejected_idx][:, None])
        out["udm/weight_mean"] = float(w.mean())
      step_records.append({"inputs": batch if udm else {k: v for k, v in batch.items()
                                                      if k != "p_desirable"},
                           "update_state": do_train, "trl": out})
    cases.append({
        "name": f"trl{trl.__version__}/bco_unpaired" + ("_udm" if udm else ""),
        "trl_version": trl.__version__,
        "trl_call": "trl.experimental.bco.BCOTrainer.get_batch_loss_metrics -> bco_loss"
                    + (" (UDM: _get_udm_weight, _get_chosen_prob)" if udm else ""),
        "trl_setting": {"beta": 0.1, "min_density_ratio": args.min_density_ratio,
                        "max_density_ratio": args.max_density_ratio,
                        "udm": udm, "steps": "train, train, eval (do_train=False)"},
        "jaxalign": {"fn": "bco_loss", "kwargs": {"beta": 0.1}, "state": "init_bco_state()",
                     "udm_weights": "density_ratio_weights(p_desirable)" if udm else None},
        "steps": step_records,
    })
  return cases


# ------------------------------------------------------------ TRL >= 1.4 DPO


def _dpo_v1_step(args, batch):
  """TRL >= 1.4 DPOTrainer._compute_loss on `batch` (any number of rows).

  The stub model gives every completion token of a sequence the same log-prob
  S/|y| (so they sum to S) and, for WPO, the same log sum_v p_v^2, given as
  batch["chosen_log_sum_sq"] / ["rejected_log_sum_sq"] (0 when absent).
  """
  from trl.trainer.dpo_trainer import DPOTrainer
  B = len(batch["chosen_logps"])

  s = types.SimpleNamespace()
  s.args = args
  s.model = types.SimpleNamespace(training=True)
  s.accelerator = _Accelerator()
  s.beta = args.beta
  s.precompute_ref_logps = True
  s.loss_types = args.loss_type
  s.loss_weights = args.loss_weights or [1.0] * len(s.loss_types)
  s.ld_alpha = args.ld_alpha
  s.f_divergence_type = args.f_divergence_type
  s.f_alpha_divergence_coef = args.f_alpha_divergence_coef
  s.label_smoothing = args.label_smoothing
  s.use_weighting = args.use_weighting
  s.aux_loss_enabled = False
  s._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
  s._total_train_tokens = 0
  s._tp_size = 1

  # Sequences [prompt (2 tokens) | completion | padding]; batch is [chosen; rejected].
  lengths = list(batch["chosen_lengths"]) + list(batch["rejected_lengths"])
  seq_logps = list(batch["chosen_logps"]) + list(batch["rejected_logps"])
  prompt = 2
  T = prompt + max(lengths)
  completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
  attention_mask = torch.zeros(2 * B, T, dtype=torch.long)
  for j, n in enumerate(lengths):
    completion_mask[j, prompt:prompt + n] = 1
    attention_mask[j, :prompt + n] = 1
  shift_mask = completion_mask[:, 1:].to(TORCH_DTYPE)
  # Per-token log-probs, each completion token S/|y|: they sum to S.
  per_token = shift_mask * (_t(seq_logps) / _t(lengths))[:, None]
  lssp = list(batch.get("chosen_log_sum_sq", [0.0] * B)) + list(
      batch.get("rejected_log_sum_sq", [0.0] * B))
  log_sum_sq = shift_mask * _t(lssp)[:, None]

  class _Model:
    def __call__(self, **kw):
      z = torch.zeros(2 * B, T - 1, dtype=TORCH_DTYPE)
      return types.SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z,
                                   log_sum_sq_probs=log_sum_sq,
                                   is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool))

  # The precomputed reference as TRL's _compute_ref_log_probs forms it from per-token
  # log-probs (the same stub layout): LD-weighted with ld_alpha; policy == reference
  # inputs (ties) then give log-ratios of exactly 0, as in TRL itself.
  ref_seq = list(batch["ref_chosen_logps"]) + list(batch["ref_rejected_logps"])
  ref_per_token = shift_mask * (_t(ref_seq) / _t(lengths))[:, None]
  if args.ld_alpha is None:
    ref_logps = ref_per_token.sum(dim=1)
  else:
    shift_completion = completion_mask[:, 1:]
    comp_pos = shift_completion.cumsum(dim=1)
    chosen_lens, rejected_lens = shift_completion.sum(dim=1).chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens)
    shared = torch.cat([shared, shared], dim=0).unsqueeze(1)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared)
    tail_mask = comp_pos > shared
    ref_logps = ((ref_per_token * shared_mask).sum(dim=1)
                 + args.ld_alpha * (ref_per_token * tail_mask).sum(dim=1))
  ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)
  inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long),
            "attention_mask": attention_mask, "completion_mask": completion_mask,
            "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
  loss = DPOTrainer._compute_loss(s, _Model(), inputs, False)
  out = {"loss": float(loss)}
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"):
    (out[k],) = s._metrics["train"][k]
  return out


DPO_V1_CASES = [
    ("sigmoid_norm_beta2", "ln_dpo_loss", dict(beta=2.0),
     dict(loss_type=["sigmoid_norm"], beta=2.0)),
    ("ipo_tau0.1", "dpo_loss", dict(variant="ipo", beta=0.1, ipo_length_norm=True),
     dict(loss_type=["ipo"], beta=0.1)),
    ("sigmoid", "dpo_loss", dict(variant="sigmoid", beta=0.1),
     dict(loss_type=["sigmoid"], beta=0.1)),
    ("robust_eps0.1", "dpo_loss", dict(variant="robust", beta=0.1, label_smoothing=0.1),
     dict(loss_type=["robust"], beta=0.1, label_smoothing=0.1)),
    ("hinge_beta0.5", "dpo_loss", dict(variant="hinge", beta=0.5),
     dict(loss_type=["hinge"], beta=0.5)),
    ("bco_pair_no_delta", "bco_pair_loss", dict(beta=0.1),
     dict(loss_type=["bco_pair"], beta=0.1)),
]


def cases_v1(inputs):
  from trl import DPOConfig
  cases = []
  for name, fn, jax_kw, trl_kw in DPO_V1_CASES:
    args = _config(DPOConfig, precompute_ref_log_probs=True, **trl_kw)
    batch = inputs["paired"][0]
    cases.append({
        "name": f"trl{trl.__version__}/{name}",
        "trl_version": trl.__version__,
        "trl_call": "DPOTrainer._compute_loss (stub model, precomputed ref log-probs)",
        "trl_setting": trl_kw,
        "jaxalign": {"fn": fn, "kwargs": jax_kw, "state": None},
        "steps": [{"inputs": batch, "trl": _dpo_v1_step(args, batch)}],
    })
  return cases


# ------------------------------------- TRL >= 1.16: the other pairwise losses

TYPES_SEED = 20261202


def _lengths_pair(rng, n):
  return ([int(v) for v in rng.integers(5, 120, n)], [int(v) for v in rng.integers(5, 120, n)])


def make_type_inputs():
  """Input sets for the loss-type cases: 3 random seeds, ties (policy == reference)
  and extreme log-ratios (|rho| of 300 to 600). Every log-prob is negative (ORPO and
  CPO read them as probabilities) and float32-exact."""
  rng = np.random.default_rng(TYPES_SEED)
  sets = {}
  for k in range(3):
    ref_c, ref_r = rng.uniform(-250.0, -30.0, B), rng.uniform(-250.0, -30.0, B)
    lc, lr = _lengths_pair(rng, B)
    sets[f"seed{k}"] = {
        "chosen_logps": ref_c + rng.normal(0.0, 6.0, B),
        "rejected_logps": ref_r + rng.normal(0.0, 6.0, B),
        "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r,
        "chosen_lengths": lc, "rejected_lengths": lr}
  ref_c, ref_r = rng.uniform(-250.0, -30.0, B), rng.uniform(-250.0, -30.0, B)
  lc, lr = _lengths_pair(rng, B)
  sets["ties"] = {"chosen_logps": ref_c, "rejected_logps": ref_r, "ref_chosen_logps": ref_c,
                  "ref_rejected_logps": ref_r, "chosen_lengths": lc, "rejected_lengths": lr}
  ref_c, ref_r = rng.uniform(-1000.0, -700.0, B), rng.uniform(-1000.0, -700.0, B)
  sign = np.where(np.arange(B) % 2 == 0, 1.0, -1.0)
  lc, lr = _lengths_pair(rng, B)
  sets["extreme"] = {
      "chosen_logps": ref_c + sign * rng.uniform(300.0, 600.0, B),
      "rejected_logps": ref_r - sign * rng.uniform(300.0, 600.0, B),
      "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r,
      "chosen_lengths": lc, "rejected_lengths": lr}
  out = {}
  for name, x in sets.items():
    x = {k: (_f32(v) if "logps" in k else v) for k, v in x.items()}
    # WPO: a per-sequence log sum_v p_v^2 (the stub gives every token the same one).
    x["chosen_log_sum_sq"] = _f32(rng.uniform(-3.0, -0.2, B))
    x["rejected_log_sum_sq"] = _f32(rng.uniform(-3.0, -0.2, B))
    out[name] = x
  return out


def _ld_columns(x, ld_alpha):  # alpha is applied by the losses
  """LD-DPO inputs for the uniform-token stub: the tail (tokens past the shorter
  response) holds (|y| - shared) / |y| of each sequence's log-prob, reference too.
  Returns jaxalign's tail columns (TRL forms its LD-weighted reference in _dpo_v1_step)."""
  lc, lr = np.asarray(x["chosen_lengths"], float), np.asarray(x["rejected_lengths"], float)
  shared = np.minimum(lc, lr)
  cols = {}
  for side, n in (("chosen", lc), ("rejected", lr)):
    frac = (n - shared) / n
    cols[f"{side}_tail_logps"] = _f32(np.asarray(x[f"{side}_logps"]) * frac)
    cols[f"ref_{side}_tail_logps"] = _f32(np.asarray(x[f"ref_{side}_logps"]) * frac)
  return cols


def _wpo_columns(x):
  cols = {}
  for side in ("chosen", "rejected"):
    per_token = np.asarray(x[f"{side}_logps"], np.float64) / np.asarray(x[f"{side}_lengths"])
    cols[f"{side}_wpo_logps"] = _f32(per_token - np.asarray(x[f"{side}_log_sum_sq"]))
  return cols


def _rows(x, i):
  return {k: v[i:i + 1] for k, v in x.items()}


# name, jaxalign kwargs of dpo_loss, TRL DPOConfig kwargs, per-example (not batch-coupled)
DPO_TYPE_CASES = [
    ("sigmoid_norm", dict(variant="sigmoid_norm", beta=1.0),
     dict(loss_type=["sigmoid_norm"], beta=1.0), True),
    ("exo_pair", dict(variant="exo_pair", beta=0.1, label_smoothing=1e-3),
     dict(loss_type=["exo_pair"], beta=0.1, label_smoothing=1e-3), True),
    ("nca_pair", dict(variant="nca_pair", beta=0.1), dict(loss_type=["nca_pair"], beta=0.1), True),
    ("bco_pair", dict(variant="bco_pair", beta=0.1), dict(loss_type=["bco_pair"], beta=0.1), True),
    ("sppo_hard", dict(variant="sppo_hard", beta=0.1),
     dict(loss_type=["sppo_hard"], beta=0.1), True),
    ("aot", dict(variant="aot", beta=0.1), dict(loss_type=["aot"], beta=0.1), False),
    ("aot_eps0.1", dict(variant="aot", beta=0.1, label_smoothing=0.1),
     dict(loss_type=["aot"], beta=0.1, label_smoothing=0.1), False),
    ("aot_unpaired", dict(variant="aot_unpaired", beta=0.1),
     dict(loss_type=["aot_unpaired"], beta=0.1), False),
    ("apo_zero", dict(variant="apo_zero", beta=0.1), dict(loss_type=["apo_zero"], beta=0.1), True),
    ("apo_down", dict(variant="apo_down", beta=0.1), dict(loss_type=["apo_down"], beta=0.1), True),
    ("discopop", dict(variant="discopop", beta=0.1, discopop_tau=0.05),
     dict(loss_type=["discopop"], beta=0.1, discopop_tau=0.05), True),
    ("sft", dict(variant="sft", beta=0.1), dict(loss_type=["sft"], beta=0.1), True),
    ("multi_sigmoid_sft", dict(variant=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1),
     dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1), True),
    ("multi_apo_bco_ipo", dict(variant=["apo_zero", "bco_pair", "ipo"],
                               loss_weights=[0.5, 1.0, 2.0], beta=0.1),
     dict(loss_type=["apo_zero", "bco_pair", "ipo"], loss_weights=[0.5, 1.0, 2.0], beta=0.1),
     True),
    ("ld_alpha0.5", dict(variant="sigmoid", beta=0.1, ld_alpha=0.5),
     dict(loss_type=["sigmoid"], beta=0.1, ld_alpha=0.5), True),
    ("wpo", dict(variant="sigmoid", beta=0.1, use_weighting=True),
     dict(loss_type=["sigmoid"], beta=0.1, use_weighting=True), True),
    ("wpo_ld_ipo", dict(variant="ipo", beta=0.1, use_weighting=True, ld_alpha=0.3),
     dict(loss_type=["ipo"], beta=0.1, use_weighting=True, ld_alpha=0.3), True),
]


def _dpo_type_case(name, jax_kw, trl_kw, per_example, set_name, x):
  from trl import DPOConfig
  args = _config(DPOConfig, precompute_ref_log_probs=True, **trl_kw)
  jax_inputs = {k: v for k, v in x.items() if not k.endswith("_log_sum_sq")}
  trl_x = dict(x)
  if trl_kw.get("ld_alpha") is not None:
    jax_inputs.update(_ld_columns(x, trl_kw["ld_alpha"]))
  if trl_kw.get("use_weighting"):
    jax_inputs.update(_wpo_columns(x))
  out = _dpo_v1_step(args, trl_x)
  if per_example:
    out["per_example"] = [_dpo_v1_step(args, _rows(trl_x, i))["loss"] for i in range(B)]
  return {
      "name": f"trl{trl.__version__}/{name}/{set_name}",
      "trl_version": trl.__version__,
      "trl_call": "DPOTrainer._compute_loss (stub model, precomputed ref log-probs); "
                  "per_example: the same on each row alone",
      "trl_setting": trl_kw,
      "jaxalign": {"fn": "dpo_loss", "kwargs": jax_kw, "state": None},
      "steps": [{"inputs": jax_inputs, "trl": out}],
  }


def _cpo_standin(args, cls_name):
  from trl.experimental.cpo import CPOTrainer
  from trl.experimental.orpo import ORPOTrainer
  s = types.SimpleNamespace()
  s.args = args
  s.accelerator = _Accelerator()
  s.beta = args.beta
  s.aux_loss_enabled = False
  if cls_name == "cpo":
    s.label_smoothing = args.label_smoothing
    s.loss_type = args.loss_type
    s.cpo_alpha = args.cpo_alpha
    s.simpo_gamma = args.simpo_gamma
    s.alpha = args.alpha
    s.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, s)
    return s, CPOTrainer
  s.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, s)
  return s, ORPOTrainer


def _cpo_step(s, trainer_cls, x, average):
  """get_batch_loss_metrics with a stub concatenated_forward: the (mean) log-probs as
  TRL's get_batch_logps returns them, and the chosen NLL = token-mean cross entropy
  over the response. That is CPO's NLL (TRL's labels mask the prompt) and ORPO's for a
  one-token prompt (ORPO's cross-entropy runs over every token after the first, so
  a one-token prompt adds nothing; the jaxalign inputs say so: unscored 0). ORPO's
  NLL over longer prompts is checked through TRL's real forward (_orpo_model_case)."""
  c, r = _t(x["chosen_logps"]), _t(x["rejected_logps"])
  lc, lr = _t(x["chosen_lengths"]), _t(x["rejected_lengths"])
  nll = -c.sum() / lc.sum()
  if average:
    c, r = c / lc, r / lr
  n = len(c)
  z = torch.zeros(n, 1, 1, dtype=TORCH_DTYPE)
  s.concatenated_forward = lambda model, batch: (c, r, z, z, nll)
  loss, metrics = trainer_cls.get_batch_loss_metrics(s, None, {}, train_eval="train")
  keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected", "nll_loss"]
  if trainer_cls.__name__ == "ORPOTrainer":
    keys += ["log_odds_ratio", "log_odds_chosen"]
  out = {"loss": float(loss)}
  for k in keys:
    out[k] = float(metrics[k])
  return out


# name, jaxalign fn, its kwargs, "cpo" | "orpo", TRL config kwargs
CPO_CASES = [
    ("cpo_sigmoid", "cpo_loss", dict(beta=0.1, cpo_alpha=1.0), "cpo",
     dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)),
    ("cpo_sigmoid_eps0.1", "cpo_loss", dict(beta=0.1, cpo_alpha=1.0, label_smoothing=0.1),
     "cpo", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, label_smoothing=0.1)),
    ("cpo_hinge", "cpo_loss", dict(beta=0.1, loss_type="hinge", cpo_alpha=0.5), "cpo",
     dict(loss_type="hinge", beta=0.1, cpo_alpha=0.5)),
    ("cpo_ipo", "cpo_loss", dict(beta=0.1, loss_type="ipo", cpo_alpha=1.0), "cpo",
     dict(loss_type="ipo", beta=0.1, cpo_alpha=1.0)),
    ("cpo_simpo", "cpo_loss", dict(beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.3),
     "cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3)),
    ("simpo", "simpo_loss", dict(beta=2.0, gamma=0.5), "cpo",
     dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
    ("orpo", "orpo_loss", dict(beta=0.1), "orpo", dict(beta=0.1)),
]


def _cpo_case(name, fn, jax_kw, kind, trl_kw, set_name, x):
  if kind == "cpo":
    from trl.experimental.cpo import CPOConfig as cfg_cls
    call = "trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics -> cpo_loss"
  else:
    from trl.experimental.orpo import ORPOConfig as cfg_cls
    call = "trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics -> odds_ratio_loss"
  args = _config(cfg_cls, **trl_kw)
  s, cls = _cpo_standin(args, kind)
  average = kind == "orpo" or trl_kw.get("loss_type") in ("ipo", "simpo")
  out = _cpo_step(s, cls, x, average)
  if kind == "cpo" and trl_kw["cpo_alpha"] == 0.0:
    out.pop("nll_loss")    # TRL logs 0 (it skips the NLL); jaxalign logs none
  out["per_example"] = [_cpo_step(s, cls, _rows(x, i), average)["loss"] for i in range(B)]
  inputs = {k: v for k, v in x.items() if not k.startswith("ref_") and "log_sum_sq" not in k}
  if kind == "orpo":   # the one-token prompt of the stub: no unscored token to add
    inputs["chosen_unscored_logps"] = [0.0] * B
    inputs["chosen_unscored_lengths"] = [0] * B
  return {
      "name": f"trl{trl.__version__}/{name}/{set_name}",
      "trl_version": trl.__version__,
      "trl_call": call + " (stub concatenated_forward); per_example: each row alone",
      "trl_setting": trl_kw,
      "jaxalign": {"fn": fn, "kwargs": jax_kw, "state": None},
      "steps": [{"inputs": inputs, "trl": out}],
  }


def cases_v1_types():
  sets = make_type_inputs()
  cases = []
  for set_name, x in sets.items():
    for name, jax_kw, trl_kw, per_example in DPO_TYPE_CASES:
      cases.append(_dpo_type_case(name, jax_kw, trl_kw, per_example, set_name, x))
    for name, fn, jax_kw, kind, trl_kw in CPO_CASES:
      cases.append(_cpo_case(name, fn, jax_kw, kind, trl_kw, set_name, x))
  for set_name, (seed, init_range) in ORPO_MODEL_SETS.items():
    cases.append(_orpo_model_case(set_name, seed, init_range))
  return cases


# ------------------------------- ORPO through TRL's own forward on a tiny model

ORPO_MODEL_SEED = 20261207
# set name -> (model seed, output-head scale): spread and peaked next-token
# distributions (the peaked one gives log-odds far from 0).
ORPO_MODEL_SETS = {"model_a": (0, 1.0), "model_b": (1, 1.0), "model_peaked": (2, 8.0)}
_VOCAB, _PAD = 32, 0


def _tiny_model(seed, head_scale):
  """A randomly initialised 2-layer LlamaForCausalLM, float64 (no download), its output
  head scaled by head_scale."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
      initializer_range=0.5, pad_token_id=_PAD, bos_token_id=1, eos_token_id=2,
      tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).to(TORCH_DTYPE).eval()
  with torch.no_grad():
    model.lm_head.weight.mul_(head_scale)
  return model


def _orpo_batch(rng, n):
  """n pairs in the layout ORPOTrainer.tokenize_row + its collator produce: BOS + prompt
  (1 to 6 tokens, 4 the most common) then the response + EOS, right-padded; labels
  -100 on the prompt and the padding."""
  rows = {k: [] for k in ("chosen", "rejected")}
  for i in range(n):
    p = 4 if i % 2 == 0 else int(rng.integers(1, 7))
    prompt = [1] + [int(v) for v in rng.integers(3, _VOCAB, p - 1)]
    for side in rows:
      response = [int(v) for v in rng.integers(3, _VOCAB, int(rng.integers(1, 8)))] + [2]
      rows[side].append((prompt, response))
  batch = {}
  for side, pairs in rows.items():
    t = max(len(a) + len(b) for a, b in pairs)
    ids = torch.full((n, t), _PAD, dtype=torch.long)
    att = torch.zeros((n, t), dtype=torch.long)
    labels = torch.full((n, t), -100, dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
      ids[i, :len(a) + len(b)] = torch.tensor(a + b)
      att[i, :len(a) + len(b)] = 1
      labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
    batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": att,
                  f"{side}_labels": labels})
  return batch


def _orpo_model_standin(args):
  from trl.experimental.orpo import ORPOTrainer
  s, _ = _cpo_standin(args, "orpo")
  s.is_encoder_decoder = False
  s.padding_value = _PAD
  s.concatenated_inputs = ORPOTrainer.concatenated_inputs
  s.get_batch_logps = ORPOTrainer.get_batch_logps
  s.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, s)
  return s, ORPOTrainer


def _orpo_model_inputs(model, batch):
  """jaxalign's inputs from the same model outputs, summed by TRL's get_batch_logps:
  each response's log-probs and tokens (TRL's labels), and each chosen sequence's other
  real tokens after its first (the labels the response masks: the prompt less BOS)."""
  from trl.experimental.orpo import ORPOTrainer
  out = {}
  with torch.no_grad():
    for side in ("chosen", "rejected"):
      ids, att = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
      labels = batch[f"{side}_labels"]
      logits = model(ids, attention_mask=att, use_cache=False).logits
      unscored = torch.where((att == 1) & (labels == -100), ids, -100)
      for name, lab in (("", labels), ("unscored_", unscored)):
        logps = ORPOTrainer.get_batch_logps(logits, lab, average_log_prob=False)
        out[f"{side}_{name}logps"] = [float(v) for v in logps]
        out[f"{side}_{name}lengths"] = [int(v) for v in (lab[:, 1:] != -100).sum(-1)]
  for k in ("rejected_unscored_logps", "rejected_unscored_lengths"):
    out.pop(k)
  return out


def _orpo_model_case(set_name, seed, head_scale):
  from trl.experimental.orpo import ORPOConfig
  trl_kw = dict(beta=0.1)
  s, cls = _orpo_model_standin(_config(ORPOConfig, **trl_kw))
  model = _tiny_model(seed, head_scale)
  batch = _orpo_batch(np.random.default_rng(ORPO_MODEL_SEED + seed), B)

  def run(b):
    with torch.no_grad():
      loss, metrics = cls.get_batch_loss_metrics(s, model, b, train_eval="train")
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]
    return {"loss": float(loss), **{k: float(metrics[k]) for k in keys}}

  out = run(batch)
  # One row alone (it keeps the batch's right padding, which changes nothing: the
  # model is causal and TRL masks padded labels).
  out["per_example"] = [run({k: v[i:i + 1] for k, v in batch.items()})["loss"]
                        for i in range(B)]
  return {
      "name": f"trl{trl.__version__}/orpo_model/{set_name}",
      "trl_version": trl.__version__,
      "trl_call": ("trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics -> "
                   "concatenated_forward (tiny LlamaForCausalLM, float64; its NLL over "
                   "prompt + response) -> odds_ratio_loss; inputs: ORPOTrainer.get_batch_logps "
                   "sums of the same logits; per_example: each row alone"),
      "trl_setting": trl_kw,
      "jaxalign": {"fn": "orpo_loss", "kwargs": dict(beta=0.1), "state": None},
      "steps": [{"inputs": _orpo_model_inputs(model, batch), "trl": out}],
  }


# --------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=OUT)
  out_path = parser.parse_args().out

  version = Version(trl.__version__)
  inputs = make_inputs()
  if version < Version("0.29"):
    new_cases = cases_v028(inputs)
  elif version >= Version("1.16"):
    new_cases = cases_v1(inputs) + cases_v1_types()
  elif version >= Version("1.4"):
    new_cases = cases_v1(inputs)
  else:
    raise SystemExit(f"TRL {version}: this script covers <= 0.28 and >= 1.4 only")

  data = {"cases": []}
  if os.path.exists(out_path):
    with open(out_path) as f:
      data = json.load(f)
  kept = [c for c in data["cases"] if c["trl_version"] != trl.__version__]
  versions = dict(data.get("trl_versions", {}))
  versions[trl.__version__] = {"torch": torch.__version__,
                               "transformers": transformers.__version__, "dtype": "float64"}
  for c in new_cases:
    for st in c["steps"]:
      for k, v in st["trl"].items():
        if not all(math.isfinite(u) for u in (v if isinstance(v, list) else [v])):
          raise SystemExit(f"{c['name']}: non-finite {k}={v}")
  data = {
      "about": ("TRL conformance vectors for jaxalign losses (docs/losses.md, Compared with which TRL), "
                "made by tests/losses/make_trl_vectors.py; read by test_trl_conformance.py."),
      "seed": SEED,
      "trl_versions": dict(sorted(versions.items(), key=lambda kv: Version(kv[0]))),
      "cases": sorted(kept + new_cases,
                      key=lambda c: (Version(c["trl_version"]), c["name"])),
  }
  with open(out_path, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  print(f"TRL {trl.__version__}: wrote {len(new_cases)} cases to {out_path}")


if __name__ == "__main__":
  main()
