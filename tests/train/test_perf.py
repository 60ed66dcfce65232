"""The host loop's throughput metrics: model FLOPs of the real tokens over step time
only (the first step's compilation and held-out evaluation logged on their own), and
the layout's fill."""
import jax
import numpy as np

from jaxalign import config as config_lib
from jaxalign import flops
from tests.train.helpers import read_metrics, tiny_config, train_loop


def test_rates_count_step_time_only_and_the_fill_is_logged(tmp_path):
  cfg = tiny_config(total_steps=3, eval_every=2, **{"data.packing": True,
                                                   "data.pack_length": 16})
  cfg.data.eval_path = "toy:pairwise?n=8&seed=7"
  train_loop(cfg, str(tmp_path), progress=False)
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3]
  # Step 1 is mostly compilation: its time is logged alone, no rate is made of it.
  assert rows[0]["time/first_step_seconds"] > 0 and "tokens_per_sec" not in rows[0]
  assert all("time/first_step_seconds" not in r for r in rows[1:])
  assert rows[1]["eval/seconds"] > 0 and rows[2]["eval/seconds"] > 0   # eval steps: 2 and 3
  mc = config_lib.model_config(cfg)
  n = flops.matmul_params(mc)
  T = cfg.data.max_length
  # Same window, same wall time: (FLOP/s x devices) / (real tokens/s) is the model
  # FLOPs per real token, 6N plus 3x attention over at most (T + 1) / 2 keys each.
  most = 6 * n + 3 * 4 * mc.n_heads * mc.head_dim * mc.n_layers * (T + 1) / 2
  for row in rows[1:]:
    per_token = row["perf/model_tflops_per_sec_per_device"] * 1e12 * jax.device_count() / row[
        "tokens_per_sec"]
    assert 6 * n < per_token < most
    assert "perf/mfu" not in row          # CPU: no known peak, so no MFU
    # Packed rows of 16: the real tokens among the computed positions.
    assert 0 < row["tokens/fill"] <= 1
    np.testing.assert_allclose(row["tokens/fill"] + row["tokens/padding_share"], 1.0)


def test_the_fill_of_each_layout_counts_a_shared_prompt_once():
  from jaxalign.data import packing
  rng = np.random.default_rng(0)
  B, S, T = 4, 2, 12
  tokens = rng.integers(4, 32, size=(B, S, T)).astype(np.int32)
  attention = np.ones((B, S, T), np.int32)
  attention[..., -3:] = 0                                  # 9 real tokens a sequence
  loss = attention.copy()
  loss[..., :4] = 0                                        # a 4-token prompt
  tokens[:, 1, :4] = tokens[:, 0, :4]                      # one prompt for both responses
  batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}
  assert packing.computed_tokens(batch) == (B * S * T, B * S * 9)
  shared = packing.share_prompt_batch(batch, prompt_length=4, response_step=1, max_response=8)
  computed, real = packing.computed_tokens(shared)
  assert real == B * (4 + 2 * 5)                           # the prompt once per example
  assert computed == shared["shared_prompt"].size + shared["shared_response"].size
