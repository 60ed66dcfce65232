"""Continual training over domains and COFS-DPO's combination of stored fast modules."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxalign import config as config_lib
from jaxalign.models import lora, transformer
from jaxalign.workflows import continual, run
from jaxalign.data import reading
from tests.train.helpers import read_metrics, tiny_config


def test_toy_source_op_filter():
  minus = reading.read_records("toy:pairwise?n=16&seed=1&ops=-", split="train")
  plus = reading.read_records("toy:pairwise?n=16&seed=1&ops=+", split="train")
  assert all("-" in r["prompt"] and "+" not in r["prompt"] for r in minus)
  assert all("+" in r["prompt"] and "-" not in r["prompt"] for r in plus)
  both = reading.read_records("toy:sft?n=64&seed=1&ops=+-", split="train")
  assert {"+", "-"} <= {c for r in both for c in r["prompt"]}
  with pytest.raises(config_lib.ConfigError, match="config.data.train_path.*ops"):
    reading.read_records("toy:pairwise?n=4&ops=/", split="train")


def test_simplex_grid_and_search():
  grid = continual.simplex_grid(3, 4)
  assert len(grid) == 15 and all(abs(sum(w) - 1) < 1e-9 for w in grid)
  assert len(set(grid)) == len(grid) and (1.0, 0.0, 0.0) in grid
  best, table = continual.search_weights(lambda w: -abs(w[0] - 0.3), 2, 10)
  assert best == pytest.approx((0.3, 0.7)) and len(table) == 11


def _adapters(seed):
  cfg = transformer.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                n_kv_heads=1, head_dim=8, d_ff=32, max_seq_len=8)
  model = lora.add_adapters(transformer.Transformer(cfg, rngs=nnx.Rngs(0)),
                            lora.LoraConfig(rank=2, targets=("q", "o", "down")), seed=0)
  _, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
  leaves, treedef = jax.tree.flatten(adapters)
  key = jax.random.PRNGKey(seed)
  return base, jax.tree.unflatten(treedef, [
      jax.random.normal(jax.random.fold_in(key, i), x.shape) for i, x in enumerate(leaves)])


def test_combination_of_stored_modules():
  base, a0 = _adapters(1)
  _, a1 = _adapters(2)
  flat = lambda s: {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(s)}
  # One-hot weights give one domain's merged model exactly (docs/losses.md, `ofs_dpo` invariant 6).
  for t, a in enumerate((a0, a1)):
    w = [0.0, 0.0]
    w[t] = 1.0
    got = flat(continual.combined_model(base, [a0, a1], w, scale=2.0))
    want = flat(jax.jit(lora.merge, static_argnames="scale")(base, a, scale=2.0))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Delta space is linear in the weights: W + s (0.3 A0B0 + 0.7 A1B1), per weight.
  got = flat(continual.combined_model(base, [a0, a1], [0.3, 0.7], scale=2.0))
  q = ("layers", 0, "attn", "q")
  d = lambda a: np.asarray(a["layers"][0]["attn"]["q_lora"]["lora_a"][...]
                           @ a["layers"][0]["attn"]["q_lora"]["lora_b"][...])
  want_q = flat(base)[q] + 2.0 * (0.3 * d(a0) + 0.7 * d(a1)).reshape(flat(base)[q].shape)
  np.testing.assert_allclose(got[q], want_q, rtol=1e-5, atol=1e-6)
  # Untargeted weights are the base's.
  np.testing.assert_array_equal(got[("layers", 0, "attn", "k")], flat(base)[("layers", 0,
                                                                              "attn", "k")])


def test_cofs_dpo_over_two_domains(tmp_path):
  """Two domains (addition, subtraction), 2 OFS-DPO steps each: modules stored
  adapter-only, stage 2 starts from stage 1's fast module, weights searched."""
  c = tiny_config(**{"lora.rank": 2, "lora.alpha": 4.0, "reference.mode": "frozen",
                     "total_steps": 2, "checkpoint.every": 2, "optim.warmup_steps": 1,
                     "optim.lr": 1e-2, "mesh.shape": (1, 1, 1)})
  c.loss.name = "ofs_dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, alpha=0.5, swap_interval=1))
  c.data.domains = ("toy:pairwise?n=16&seed=0&ops=+", "toy:pairwise?n=16&seed=1&ops=-")
  c.data.domain_eval_paths = ("toy:pairwise?n=8&seed=7&ops=+",
                              "toy:pairwise?n=8&seed=8&ops=-")
  c.cofs.enabled = True
  c.cofs.grid = 2
  work = str(tmp_path / "cofs")
  result = run.train(c, work, progress=False, devices=jax.devices()[:1])
  assert result.final_step == 2
  for t in range(2):
    assert os.path.isdir(continual.module_dir(work, t))
    assert read_metrics(continual.stage_dir(work, t))[-1]["step"] == 2
  # Stage 1 starts from domain 0's fast module, so its policy is not the base.
  assert read_metrics(continual.stage_dir(work, 0))[0]["loss/dpo_fast"] == pytest.approx(
      np.log(2), abs=1e-7)
  assert abs(read_metrics(continual.stage_dir(work, 1))[0]["loss/dpo_fast"] - np.log(2)) > 1e-7
  record = json.load(open(os.path.join(work, "cofs.json")))
  assert [r["stage"] for r in record] == [0, 1]
  assert record[0]["weights"] == [1.0]
  assert len(record[1]["grid"]) == 3 and abs(sum(record[1]["weights"]) - 1) < 1e-9
  assert max(r["score"] for r in record[1]["grid"]) == next(
      r["score"] for r in record[1]["grid"] if r["weights"] == record[1]["weights"])


def test_continual_config_errors():
  c = tiny_config(**{"lora.rank": 0})
  c.data.domains = ("a", "b")
  with pytest.raises(config_lib.ConfigError, match="config.data.domains"):
    config_lib.validate(c, 8)
  c = tiny_config(**{"lora.rank": 2, "cofs.enabled": True})
  c.data.domains = ("a", "b")
  with pytest.raises(config_lib.ConfigError, match="config.cofs.weights"):
    config_lib.validate(c, 8)
  c.cofs.weights = (1.0,)
  with pytest.raises(config_lib.ConfigError, match="config.cofs.weights"):
    config_lib.validate(c, 8)
