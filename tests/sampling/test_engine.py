"""The generation engine against full-forward references, and its contracts."""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import config as config_lib, sharding
from jaxalign.models import transformer
from jaxalign.sampling import engine
from jaxalign.sampling.engine import SamplingParams
from jaxalign.train import eval as eval_lib
from tests.sampling import helpers

PROMPTS = [[5, 9, 2, 7], [3], [11, 4, 8, 1, 6, 2, 9], [7, 7]]


def _split(model):
  return nnx.split(model, nnx.Param, ...)


def _rows(out) -> list[list[int]]:
  return out.token_lists()


@pytest.mark.parametrize("config", [helpers.LLAMA, helpers.GEMMA, helpers.QWEN],
                         ids=["llama", "gemma2", "qwen"])
def test_greedy_equals_full_forward_argmax_loop(config):
  model = helpers.make_model(config)
  tokens, mask = helpers.left_pad(PROMPTS)
  out = engine.generate_model(model, tokens, mask, jax.random.PRNGKey(0),
                              SamplingParams(max_new_tokens=12, temperature=0.0))
  for prompt, row, length in zip(PROMPTS, np.asarray(out.tokens), np.asarray(out.lengths)):
    assert length == 12
    assert list(row) == helpers.reference_greedy(model, prompt, 12)


def test_greedy_equals_eval_recompute_loop():
  model = helpers.make_model(helpers.GEMMA, seed=1)
  graphdef, params, frozen = _split(model)
  tokens, mask = helpers.left_pad(PROMPTS, width=9)
  out = engine.generate(graphdef, params, frozen, tokens, mask, jax.random.PRNGKey(0),
                        SamplingParams(max_new_tokens=10, temperature=0.0))
  ref = eval_lib._decode(params, frozen, jnp.asarray(tokens), jnp.asarray(mask),
                         jax.random.PRNGKey(0), graphdef=graphdef, max_new_tokens=10,
                         eos_id=-1, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref))


def test_padding_and_batch_composition_do_not_change_outputs():
  model = helpers.make_model(helpers.GEMMA, seed=2)
  sp = SamplingParams(max_new_tokens=8, temperature=0.0)
  key = jax.random.PRNGKey(0)
  alone = []
  for p in PROMPTS:
    t, m = helpers.left_pad([p])
    alone.append(_rows(engine.generate_model(model, t, m, key, sp))[0])
  # Extra left padding (another prompt-length bucket) and other batch sizes.
  for batch, width in ((PROMPTS, 7), (PROMPTS[::-1], 20), (PROMPTS[1:3], 11)):
    t, m = helpers.left_pad(batch, width)
    got = _rows(engine.generate_model(model, t, m, key, sp))
    assert got == [alone[PROMPTS.index(p)] for p in batch]


def test_sampled_rows_do_not_depend_on_bucket_padding():
  model = helpers.make_model(helpers.LLAMA, seed=3, scale=1.5)
  sp = SamplingParams(max_new_tokens=8, temperature=1.0, n=2)
  key = jax.random.PRNGKey(7)
  t, m = helpers.left_pad(PROMPTS[:3])
  base = _rows(engine.generate_model(model, t, m, key, sp))        # 3 prompts: bucket 4
  t2, m2 = helpers.left_pad(PROMPTS[:3], width=30)                  # length bucket 32
  assert _rows(engine.generate_model(model, t2, m2, key, sp)) == base
  t3, m3 = helpers.left_pad(PROMPTS[:3] + [[1, 2]] * 3)            # 6 prompts: bucket 8
  assert _rows(engine.generate_model(model, t3, m3, key, sp))[:6] == base


def test_same_key_same_output_other_key_other_output():
  model = helpers.make_model(helpers.QWEN, seed=4, scale=1.0)
  t, m = helpers.left_pad(PROMPTS)
  sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95)
  a = _rows(engine.generate_model(model, t, m, jax.random.PRNGKey(1), sp))
  b = _rows(engine.generate_model(model, t, m, jax.random.PRNGKey(1), sp))
  c = _rows(engine.generate_model(model, t, m, jax.random.PRNGKey(2), sp))
  assert a == b
  assert a != c


def test_stop_tokens_end_rows_and_the_loop_exits_early():
  model = helpers.make_model(helpers.LLAMA, seed=5)
  refs = [helpers.reference_greedy(model, p, 12) for p in PROMPTS]
  # Stop at the token row 0 produces third: row 0 stops at step 2 (or earlier
  # if it appears before); other rows stop wherever they produce it.
  stop = refs[0][2]
  t, m = helpers.left_pad(PROMPTS)
  out = engine.generate_model(model, t, m, jax.random.PRNGKey(0),
                              SamplingParams(max_new_tokens=12, temperature=0.0,
                                             stop_tokens=(stop,)))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for ref, row, length in zip(refs, tokens, lengths):
    want = ref[:ref.index(stop) + 1] if stop in ref else ref
    assert length == len(want)
    assert list(row[:length]) == want
    assert not row[length:].any()        # pad 0 after the stop token
  steps = int(out.decode_steps)
  assert steps == max(lengths)
  if all(stop in r for r in refs):
    assert steps < 12


def test_early_exit_when_every_row_stops():
  model = helpers.make_model(helpers.LLAMA, seed=5)
  t, m = helpers.left_pad(PROMPTS)
  first = [helpers.reference_greedy(model, p, 1)[0] for p in PROMPTS]
  out = engine.generate_model(model, t, m, jax.random.PRNGKey(0),
                              SamplingParams(max_new_tokens=50, temperature=0.0,
                                             stop_tokens=tuple(set(first))))
  assert int(out.decode_steps) == 1
  np.testing.assert_array_equal(np.asarray(out.lengths), 1)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], first)


def test_n_samples_per_prompt_are_prompt_major():
  model = helpers.make_model(helpers.LLAMA, seed=6, scale=1.0)
  t, m = helpers.left_pad(PROMPTS[:3])
  out = engine.generate_model(model, t, m, jax.random.PRNGKey(0),
                              SamplingParams(max_new_tokens=6, temperature=1.0, n=4))
  assert out.tokens.shape == (12, 6)
  np.testing.assert_array_equal(np.asarray(out.prompt_index), np.repeat(np.arange(3), 4))
  rows = _rows(out)
  assert all(len({tuple(r) for r in rows[4 * i:4 * i + 4]}) > 1 for i in range(3))
  # Greedy: the n copies of a prompt agree with the prompt generated once.
  greedy = SamplingParams(max_new_tokens=6, temperature=0.0, n=3)
  g = _rows(engine.generate_model(model, t, m, jax.random.PRNGKey(0), greedy))
  one = _rows(engine.generate_model(model, t, m, jax.random.PRNGKey(0),
                                    SamplingParams(max_new_tokens=6, temperature=0.0)))
  assert g == [r for r in one for _ in range(3)]


def _chi2_critical(df: int, z: float = 3.090) -> float:
  """Upper 0.999 quantile of chi-square(df), Wilson-Hilferty approximation (z = Phi^-1(0.999))."""
  a = 2.0 / (9.0 * df)
  return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _assert_matches(counts: collections.Counter, probs: np.ndarray):
  """Pearson chi-square goodness of fit, cells with expectation < 5 pooled."""
  total = sum(counts.values())
  observed = np.array([counts.get(v, 0) for v in range(len(probs))], np.float64)
  assert observed[probs == 0].sum() == 0, "sampled a token outside the support"
  expected = probs * total
  big = expected >= 5
  obs = np.append(observed[big], observed[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
  df = int(keep.sum()) - 1
  assert stat < _chi2_critical(df), (stat, df)


def _nucleus(p: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Independent transcription: top-k, renormalize, smallest prefix with mass >= top_p."""
  order = np.argsort(-p, kind="stable")
  keep = np.zeros_like(p, bool)
  keep[order[:top_k or len(p)]] = True
  q = np.where(keep, p, 0.0)
  q /= q.sum()
  mass = 0.0
  nucleus = np.zeros_like(keep)
  for v in order:
    if not keep[v] or mass >= top_p:
      break
    nucleus[v] = True
    mass += q[v]
  q = np.where(nucleus, q, 0.0)
  return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 4, 1.0),
                                                     (1.3, 0, 0.8), (1.0, 6, 0.9)])
def test_sample_frequencies_match_the_softmax(temperature, top_k, top_p):
  config = transformer.ModelConfig(vocab_size=12, d_model=16, n_layers=1, n_heads=2,
                                   n_kv_heads=1, head_dim=8, d_ff=32)
  model = helpers.make_model(config, seed=7, scale=2.5)
  prompt = [3, 1, 4]
  t, m = helpers.left_pad([prompt])
  sp = SamplingParams(max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p,
                      n=4000)
  rows = _rows(engine.generate_model(model, t, m, jax.random.PRNGKey(0), sp))
  # First token: from the prefill's logits.
  p0 = _nucleus(helpers.reference_probs(model, prompt, temperature), top_k, top_p)
  _assert_matches(collections.Counter(r[0] for r in rows), p0)
  # Second token given the most frequent first: through the cached decode step.
  first = collections.Counter(r[0] for r in rows).most_common(1)[0][0]
  p1 = _nucleus(helpers.reference_probs(model, prompt + [first], temperature), top_k, top_p)
  _assert_matches(collections.Counter(r[1] for r in rows if r[0] == first), p1)


def test_filter_logits_support():
  # Probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled order).
  p = np.array([0.15, 0.5, 0.05, 0.3])
  logits = jnp.log(jnp.asarray(p, jnp.float32))[None]
  kept = lambda **kw: set(np.flatnonzero(np.isfinite(np.asarray(
      engine.filter_logits(logits, **kw))[0])))
  assert kept(top_k=2, top_p=1.0, use_top_p=False) == {1, 3}
  assert kept(top_k=0, top_p=0.7, use_top_p=True) == {1, 3}        # 0.5 < 0.7 <= 0.8
  assert kept(top_k=0, top_p=0.5, use_top_p=True) == {1}           # 0.5 already reaches it
  assert kept(top_k=0, top_p=0.81, use_top_p=True) == {0, 1, 3}
  assert kept(top_k=3, top_p=0.99, use_top_p=True) == {0, 1, 3}    # top-k first
  assert kept(top_k=1, top_p=1.0, use_top_p=False) == {1}
  # Ties at the cut are kept.
  tie = jnp.asarray([[1.0, 2.0, 2.0, 0.0]])
  assert set(np.flatnonzero(np.isfinite(np.asarray(
      engine.filter_logits(tie, top_k=1, top_p=1.0, use_top_p=False))[0]))) == {1, 2}


def test_sharded_on_the_training_mesh_equals_one_device():
  config = helpers.GEMMA
  rules = config_lib.DEFAULT_RULES
  mesh = sharding.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = helpers.make_model(config, seed=8, scale=2.0)
    graphdef, params, frozen = _split(model)
  spec = nnx.get_partition_spec
  with nnx.logical_axis_rules(rules):
    specs = spec(params)
  params = jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)),
                        params, specs)
  assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(params))
  local = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), (params, frozen))
  t, m = helpers.left_pad(PROMPTS[:3])
  for sp in (SamplingParams(max_new_tokens=8, temperature=0.0, n=2),
             SamplingParams(max_new_tokens=8, temperature=1.0, top_k=8, n=2)):
    key = jax.random.PRNGKey(3)
    sharded = engine.generate(graphdef, params, frozen, t, m, key, sp)
    single = engine.generate(graphdef, *local, t, m, key, sp)
    assert len(sharded.tokens.sharding.device_set) == 8
    assert _rows(sharded) == _rows(single)


def test_one_compile_per_bucket():
  model = helpers.make_model(helpers.LLAMA, seed=9)
  sp = SamplingParams(max_new_tokens=4, temperature=0.0)
  before = engine._jit_generate._cache_size()
  for batch, width in ((PROMPTS, 7), (PROMPTS[:3], 7), (PROMPTS[1:], 8)):
    t, m = helpers.left_pad(batch, width)
    engine.generate_model(model, t, m, jax.random.PRNGKey(0), sp)
  assert engine._jit_generate._cache_size() == before + 1


@pytest.mark.parametrize("tokens,mask,match", [
    ([[1, 2]], [[0, 0]], "row 0 has no real token"),
    ([[1, 2], [3, 4]], [[1, 1], [1, 0]], "row 1 is not left-padded"),
    ([[1, 40]], [[1, 1]], "column 1: token 40 outside the vocabulary"),
    ([[1, 2]], [[1, 1, 1]], "differ"),
])
def test_bad_prompts_are_named(tokens, mask, match):
  model = helpers.make_model(helpers.LLAMA)
  with pytest.raises(ValueError, match=match):
    engine.generate_model(model, np.asarray(tokens), np.asarray(mask), jax.random.PRNGKey(0),
                          SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(max_new_tokens=2, top_k=-1), "top_k"),
    (dict(max_new_tokens=2, n=0), "n must"),
])
def test_bad_sampling_params_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)
