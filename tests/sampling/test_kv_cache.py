"""Transformer.decode (the KV-cache path) against the training forward."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.sampling import helpers


@pytest.mark.parametrize("config", [helpers.GEMMA, helpers.GEMMA3], ids=["gemma2", "gemma3"])
def test_prefill_then_steps_equal_one_full_forward(config):
  # Gemma2's sliding window (3 < the 13 tokens), softcaps and norms all on;
  # Gemma3's per-layer-type rope.
  model = helpers.make_model(config, seed=11, scale=1.0)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 32, n).tolist() for n in (5, 2, 7)]
  tokens, mask = helpers.left_pad(prompts, width=8)               # [3, 8]
  cont = rng.integers(1, 32, (3, 5)).astype(np.int32)             # 5 more tokens per row
  full_tokens = np.concatenate([tokens, cont], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(cont)], axis=1)
  want = np.asarray(nnx.jit(lambda m, t, k: m(t, k))(model, full_tokens, full_mask))

  decode = nnx.jit(lambda m, t, k, c: m.decode(t, k, c))
  cache = model.init_cache(3, 16)
  h0, cache = decode(model, tokens, mask, cache)                   # prefill
  h1, cache = decode(model, cont[:, :1], np.ones((3, 1), np.int32), cache)
  h2, cache = decode(model, cont[:, 1:3], np.ones((3, 2), np.int32), cache)  # 2-token chunks
  h3, cache = decode(model, cont[:, 3:], np.ones((3, 2), np.int32), cache)
  got = np.concatenate([np.asarray(h) for h in (h0, h1, h2, h3)], axis=1)
  real = full_mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
  assert int(cache.index) == 13
  np.testing.assert_array_equal(np.asarray(cache.mask)[:, :13], real)
  assert not np.asarray(cache.mask)[:, 13:].any()


def test_logits_of_next_token_equal_the_full_logits():
  for config in (helpers.GEMMA, helpers.LLAMA):                    # tied and untied heads
    model = helpers.make_model(config, seed=12, scale=1.0)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (3, config.d_model))
    np.testing.assert_allclose(np.asarray(model.next_token_logits(hidden)),
                               np.asarray(model.logits(hidden[:, None]))[:, 0],
                               rtol=1e-6, atol=1e-6)
