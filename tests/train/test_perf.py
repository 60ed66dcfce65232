"""The host loop's utilization metrics: model FLOPs of the real tokens over wall time."""
import jax

from jaxalign import config as config_lib
from jaxalign import flops
from tests.train.helpers import read_metrics, tiny_config, train_loop


def test_loop_logs_model_tflops_per_sec_per_device_of_real_tokens(tmp_path):
  cfg = tiny_config(total_steps=2)
  train_loop(cfg, str(tmp_path), progress=False)
  rows = read_metrics(str(tmp_path))
  assert len(rows) == 2
  mc = config_lib.model_config(cfg)
  n = flops.matmul_params(mc)
  T = cfg.data.max_length
  # Same window, same wall time: (FLOP/s x devices) / (real tokens/s) is the model
  # FLOPs per real token, 6N plus 3x attention over at most (T + 1) / 2 keys each.
  most = 6 * n + 3 * 4 * mc.n_heads * mc.head_dim * mc.n_layers * (T + 1) / 2
  for row in rows:
    per_token = row["perf/model_tflops_per_sec_per_device"] * 1e12 * jax.device_count() / row[
        "tokens_per_sec"]
    assert 6 * n < per_token < most
    assert "perf/mfu" not in row          # CPU: no known peak, so no MFU
