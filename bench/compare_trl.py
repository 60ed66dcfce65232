"""The same tiny DPO training run in TRL (PyTorch, CPU) and in jaxalign: tokens/s and ratio.

  python bench/compare_trl.py --trl-python /work/venv-trl/bin/python
  python bench/compare_trl.py --trl-python VENV/bin/python --steps 20 --d-model 512

TRL is never a jaxalign dependency: it runs in a subprocess with the python of
a separate environment (`python -m venv V && V/bin/pip install torch==2.13.0
trl`), which runs this same file in worker mode (no jax imported there).

Both sides get the same run:
  model: a Llama-shaped decoder (jaxalign ModelConfig -> the equivalent
    transformers LlamaConfig via jaxalign.models.hf_config.config_to_hf), float32,
    random init (each framework its own; throughput does not depend on values).
  data: the same random token ids: B pairs per step, prompt P tokens, chosen
    and rejected responses T - P tokens each including EOS, so every sequence
    is exactly T tokens and no token is padding.
  objective: sigmoid DPO, beta 0.1, reference log-probs precomputed before the
    timed steps (TRL: precompute_ref_log_probs=True; jaxalign: reference.mode
    "precompute" columns), AdamW, one optimizer step per batch.
Timing: `--warmup` steps (compilation in jaxalign, allocator warm-up in
PyTorch), then `--steps` steps timed on the wall clock, host data handling of
each framework included (TRL's collator and dataloader; jaxalign's host batch
to global array). Tokens/s = real tokens (2 * B * T per step) / time per step.
With `--repeats R` the two runs alternate R times and the fastest of each is
reported (a shared machine's load changes over minutes).
Not a test: it prints both figures and their ratio, and one `JSON {...}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD, EOS = "<pad>", "</s>"


def make_data(num_pairs: int, *, vocab: int, prompt_len: int, length: int, seed: int):
  """Token ids: prompt [N, P], chosen / rejected [N, T - P] whose last id is EOS (vocab - 1)."""
  rng = np.random.default_rng(seed)
  resp = length - prompt_len
  prompt = rng.integers(3, vocab - 2, size=(num_pairs, prompt_len))
  chosen = rng.integers(3, vocab - 2, size=(num_pairs, resp))
  rejected = rng.integers(3, vocab - 2, size=(num_pairs, resp))
  chosen[:, -1] = rejected[:, -1] = vocab - 1
  return prompt, chosen, rejected


# --- TRL worker (runs in the TRL environment; imports no jax) ----------------

def trl_worker(spec_path: str) -> None:
  """One TRL DPOTrainer run described by the JSON at `spec_path`; prints a RESULT line.

  The data (npz at spec["data"]) is either fixed-length -- prompt [N, P], chosen
  and rejected [N, T - P] -- or ragged, padded arrays plus their real lengths
  prompt_len, chosen_len, rejected_len [N] (bench/packing.py). Ragged data runs
  in dataset order (train_sampling_strategy "sequential"), so each step gets the
  batch the caller laid out; TRL pads each batch to its longest sequence (its
  default collator). Real and computed (padded) tokens of the timed steps are
  counted on the policy's own forwards (a pre-hook: grad-enabled calls only, so
  the reference precompute pass is not counted).
  """
  import torch
  from datasets import Dataset
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                            TrainerCallback)
  import trl
  from trl import DPOConfig, DPOTrainer

  spec = json.load(open(spec_path))
  vocab, B = spec["vocab"], spec["batch"]
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  # A word-level tokenizer: "w<i>" is id i, so text round-trips to the same ids.
  words = {f"w{i}": i for i in range(vocab - 2)}
  words[PAD], words[EOS] = vocab - 2, vocab - 1
  tok = Tokenizer(models.WordLevel(words, unk_token=PAD))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)

  def text(ids):
    return " ".join(EOS if i == vocab - 1 else f"w{i}" for i in ids)

  data = np.load(spec["data"])
  ragged = "prompt_len" in data
  n = len(data["prompt"])
  lens = ({k: data[f"{k}_len"] for k in ("prompt", "chosen", "rejected")} if ragged else
          {k: np.full(n, data[k].shape[1]) for k in ("prompt", "chosen", "rejected")})
  ids = {k: [data[k][i, :lens[k][i]] for i in range(n)] for k in lens}
  # The prompt ends with a space: TRL tokenizes prompt + completion as one string.
  rows = [{"prompt": text(p) + " ", "chosen": text(c), "rejected": text(r)}
          for p, c, r in zip(ids["prompt"], ids["chosen"], ids["rejected"])]
  hf = dict(spec["hf_config"])
  hf.pop("architectures", None)
  hf.pop("torch_dtype", None)
  hf.pop("dtype", None)
  model = LlamaForCausalLM(LlamaConfig(**hf)).float()
  total_steps = spec["warmup"] + spec["steps"]
  args = DPOConfig(
      output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B, max_steps=total_steps,
      learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
      loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=spec["length"],
      logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True,
      dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=False,
      remove_unused_columns=False,
      train_sampling_strategy="sequential" if ragged else "random")
  times: list[float] = []
  real: list[int] = []       # per step: non-padding tokens of the policy forward
  computed: list[int] = []   # per step: tokens it ran over (rows x the batch's longest)

  class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      real.append(0)
      computed.append(0)

    def on_step_end(self, args, state, control, **kwargs):
      times.append(time.perf_counter())

  def count(module, args, kwargs):
    if torch.is_grad_enabled() and real:
      mask = kwargs["attention_mask"]
      real[-1] += int(mask.sum())
      computed[-1] += mask.numel()

  model.register_forward_pre_hook(count, with_kwargs=True)
  trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer, callbacks=[Clock()])
  ds = trainer.train_dataset
  for i in range(n if ragged else 1):   # TRL's tokenization gives back the same ids
    ex = ds[i]
    assert list(ex["prompt_ids"]) == [int(t) for t in ids["prompt"][i]], f"prompt {i}"
    for k in ("chosen", "rejected"):
      got = len(ex["prompt_ids"]) + len(ex[f"{k}_ids"])
      want = int(lens["prompt"][i] + lens[k][i])
      assert got == want, f"TRL tokenized {k} {i} to {got} tokens, not {want}"
  trainer.train()
  warm = spec["warmup"]
  timed = times[warm - 1:] if warm else [times[0]] + times
  seconds = timed[-1] - timed[0]
  step_s = seconds / (len(timed) - 1)
  timed_steps = slice(warm, None) if warm else slice(1, None)
  real_timed, computed_timed = sum(real[timed_steps]), sum(computed[timed_steps])
  print("RESULT " + json.dumps({
      "framework": "trl", "trl": trl.__version__, "torch": torch.__version__,
      "threads": torch.get_num_threads(),
      "params": sum(p.numel() for p in model.parameters()), "step_s": step_s,
      "timed_seconds": seconds, "real_tokens_per_step": real[timed_steps],
      "computed_tokens_per_step": computed[timed_steps],
      "padding_fraction": 1 - real_timed / max(computed_timed, 1),
      "tokens_per_s": real_timed / seconds}))


def run_trl(trl_python: str, spec_path: str) -> dict:
  """The TRL side in its own environment's python; its RESULT line as a dict."""
  proc = subprocess.run([trl_python, os.path.abspath(__file__), "--_trl-worker", spec_path],
                        capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode or not lines:
    sys.exit(f"TRL run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
             f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


# --- jaxalign (this environment) ----------------------------------------------

def jaxalign_config(args):
  """The recipe both sides run: a Llama-shaped model from the flags, sigmoid DPO
  (beta 0.1) on precomputed reference log-probs, AdamW at lr 1e-4 after one
  warm-up step, B pairs of T tokens per step, on one device."""
  from jaxalign import config as config_lib

  c = config_lib.defaults()
  c.model.preset = "tiny"
  c.model.overrides.update(dict(
      vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
      n_kv_heads=args.kv_heads, head_dim=args.d_model // args.heads, d_ff=args.d_ff,
      max_seq_len=args.length, rope_theta=10000.0, norm_eps=1e-5))
  c.data.max_length, c.data.max_prompt_length = args.length, args.prompt_length
  c.data.batch_size = args.batch
  c.mesh.shape = (1, 1, 1)
  c.loss.name = "dpo"
  c.loss.hparams = dict(beta=0.1, label_smoothing=0.0)
  c.reference.mode = "precompute"
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1
  c.total_steps = 10**6
  c.logprob_chunk_size = 8192
  return c


def run_jaxalign(config, prompt, chosen, rejected, *, warmup: int, steps: int) -> dict:
  """`config`'s train step, as `jaxalign train` builds it, timed on the pairs given."""
  import jax
  from jaxalign import sharding
  from jaxalign.train import build as build_lib, init

  built = build_lib.build_config(config, jax.devices()[:1])
  step_fn, batch_sharding = built.step_fn, built.batch_sharding
  model_cfg, batch = built.run_spec.model_cfg, config.data.batch_size

  P, R = prompt.shape[1], chosen.shape[1]
  T = P + R
  loss_mask = np.zeros((batch, 2, T), np.int32)
  loss_mask[:, :, P:] = 1
  attention = np.ones((batch, 2, T), np.int32)

  def host_batch(i):
    sl = slice(i * batch, (i + 1) * batch)
    tokens = np.stack([np.concatenate([prompt[sl], chosen[sl]], 1),
                       np.concatenate([prompt[sl], rejected[sl]], 1)], axis=1).astype(np.int32)
    # Precomputed reference columns (values do not change the work done).
    ref = np.full((batch, 2), -float(R) * np.log(model_cfg.vocab_size), np.float32)
    return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask,
            "ref_logps": ref}

  with jax.set_mesh(built.mesh):
    state = init.initial_state(built.run_spec, built, fresh=True)
    for i in range(warmup):
      state, metrics = step_fn(state, sharding.host_to_global(host_batch(i), batch_sharding))
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
      state, metrics = step_fn(state, sharding.host_to_global(host_batch(i), batch_sharding))
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps
  return {"framework": "jaxalign", "jax": jax.__version__, "params": model_cfg.num_params(),
          "step_s": step_s, "tokens_per_s": 2 * batch * T / step_s,
          "loss": float(metrics["loss"])}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--trl-python", help="python of an environment with trl and torch")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=8, help="pairs per step")
  ap.add_argument("--length", type=int, default=128, help="tokens per sequence")
  ap.add_argument("--prompt-length", type=int, default=32)
  ap.add_argument("--vocab", type=int, default=2048)
  ap.add_argument("--d-model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv-heads", type=int, default=2)
  ap.add_argument("--d-ff", type=int, default=688)
  ap.add_argument("--repeats", type=int, default=1,
                  help="alternate TRL and jaxalign this many times; report the best of each")
  ap.add_argument("--_trl-worker", dest="trl_worker", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.trl_worker:
    return trl_worker(args.trl_worker)
  if not args.trl_python:
    ap.error("--trl-python is required (the python of the TRL environment)")

  sys.path.insert(0, ROOT)
  from jaxalign import config as config_lib
  from jaxalign.models.hf_config import config_to_hf

  config = jaxalign_config(args)
  model_cfg = config_lib.model_config(config)
  num_pairs = args.batch * (args.warmup + args.steps)
  prompt, chosen, rejected = make_data(num_pairs, vocab=args.vocab, prompt_len=args.prompt_length,
                                       length=args.length, seed=0)

  with tempfile.TemporaryDirectory() as tmp:
    data_path = os.path.join(tmp, "data.npz")
    np.savez(data_path, prompt=prompt, chosen=chosen, rejected=rejected)
    spec_path = os.path.join(tmp, "spec.json")
    json.dump({"hf_config": config_to_hf(model_cfg, "LlamaForCausalLM"), "data": data_path,
               "vocab": args.vocab, "batch": args.batch, "length": args.length,
               "warmup": args.warmup, "steps": args.steps}, open(spec_path, "w"))
    trl_runs, jx_runs = [], []
    for r in range(args.repeats):   # alternate, so a change in machine load hits both
      print(f"[{r + 1}/{args.repeats}] TRL ({args.trl_python}) ...", file=sys.stderr)
      trl_runs.append(run_trl(args.trl_python, spec_path))
      print(f"[{r + 1}/{args.repeats}] jaxalign ...", file=sys.stderr)
      jx_runs.append(run_jaxalign(config, prompt, chosen, rejected, warmup=args.warmup,
                                  steps=args.steps))
  # Best (fastest) repeat of each: the one least disturbed by other load.
  trl_result = min(trl_runs, key=lambda x: x["step_s"])
  jx = min(jx_runs, key=lambda x: x["step_s"])

  ratio = jx["tokens_per_s"] / trl_result["tokens_per_s"]
  print(f"\nDPO step, {model_cfg.num_params() / 1e6:.2f}M params (d_model {args.d_model}, "
        f"{args.layers} layers, vocab {args.vocab}), {args.batch} pairs x 2 x {args.length} "
        f"tokens, float32, CPU ({os.cpu_count()} cores); {args.steps} timed steps after "
        f"{args.warmup} warm-up")
  print(f"  TRL {trl_result['trl']} (torch {trl_result['torch']}, "
        f"{trl_result['threads']} threads, {trl_result['params'] / 1e6:.2f}M params): "
        f"{trl_result['step_s'] * 1e3:8.1f} ms/step {trl_result['tokens_per_s']:9.0f} tokens/s")
  print(f"  jaxalign (jax {jx['jax']}):{'':>38}{jx['step_s'] * 1e3:8.1f} ms/step "
        f"{jx['tokens_per_s']:9.0f} tokens/s")
  print(f"  ratio jaxalign / TRL: {ratio:.2f}x   (best of {args.repeats}; all step ms: TRL "
        + ", ".join(f"{x['step_s'] * 1e3:.1f}" for x in trl_runs) + "; jaxalign "
        + ", ".join(f"{x['step_s'] * 1e3:.1f}" for x in jx_runs) + ")")
  print("JSON " + json.dumps({"bench": "compare_trl", "date": time.strftime("%Y-%m-%d"),
                              "args": {k: v for k, v in vars(args).items() if k != "trl_worker"},
                              "trl": trl_result, "jaxalign": jx, "ratio": ratio,
                              "trl_runs": trl_runs, "jaxalign_runs": jx_runs,
                              "loadavg": os.getloadavg()}))


if __name__ == "__main__":
  main()
