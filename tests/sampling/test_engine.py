"""The generation engine against full-forward references, and its contracts.

Most tests share one model config, M = 8 new tokens and the [4, 8] prompt
bucket, so they reuse compiled programs.
"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import sharding
from jaxalign.models import transformer
from jaxalign.sampling import engine
from jaxalign.sampling.engine import SamplingParams
from tests.sampling import helpers

PROMPTS = [[5, 9, 2, 7], [3], [11, 4, 8, 1, 6, 2, 9], [7, 7]]
M = 8
GREEDY = SamplingParams(max_new_tokens=M, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=M, temperature=1.0, top_p=0.95, n=2)


def _split(model):
  return nnx.split(model, nnx.Param, ...)


def _gen(model, prompts, sp, *, width=None, key=0):
  tokens, mask = helpers.left_pad(prompts, width)
  return engine.generate_model(model, tokens, mask, jax.random.PRNGKey(key), sp)


@pytest.mark.parametrize("config", [helpers.LLAMA, helpers.GEMMA, helpers.QWEN],
                         ids=["llama", "gemma2", "qwen"])
def test_greedy_equals_full_forward_argmax_loop(config):
  model = helpers.make_model(config)
  out = _gen(model, PROMPTS, GREEDY)
  np.testing.assert_array_equal(np.asarray(out.lengths), M)
  assert out.token_lists() == [helpers.reference_greedy(model, p, M) for p in PROMPTS]


def test_greedy_equals_batched_recompute_loop():
  model = helpers.make_model(helpers.GEMMA, seed=1)
  graphdef, params, frozen = _split(model)
  tokens, mask = helpers.left_pad(PROMPTS, width=8)
  out = engine.generate(graphdef, params, frozen, tokens, mask, jax.random.PRNGKey(0), GREEDY)
  ref = helpers.recompute_greedy(params, frozen, jnp.asarray(tokens), jnp.asarray(mask),
                                 graphdef=graphdef, max_new_tokens=M, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref))


def test_padding_and_batch_composition_do_not_change_outputs():
  model = helpers.make_model(helpers.GEMMA, seed=2)
  # Each prompt alone, unpadded (full-forward reference).
  alone = [helpers.reference_greedy(model, p, M) for p in PROMPTS]
  # Other orders, other batch sizes, extra left padding (another length bucket).
  for batch, width in ((PROMPTS[::-1], 8), (PROMPTS[1:3], 8), (PROMPTS, 13)):
    got = _gen(model, batch, GREEDY, width=width).token_lists()
    assert got == [alone[PROMPTS.index(p)] for p in batch]


def test_same_key_same_samples_and_bucket_padding_changes_nothing():
  model = helpers.make_model(helpers.LLAMA, seed=3, scale=1.5)
  base = _gen(model, PROMPTS[:3], SAMPLED, key=7).token_lists()   # 3 prompts: bucket 4
  assert _gen(model, PROMPTS[:3], SAMPLED, key=7).token_lists() == base
  assert _gen(model, PROMPTS[:3], SAMPLED, key=8).token_lists() != base
  more = PROMPTS[:3] + [[1, 2]] * 3                                 # 6 prompts: bucket 8
  assert _gen(model, more, SAMPLED, key=7).token_lists()[:6] == base


def test_stop_tokens_end_rows_and_the_loop_exits_early():
  model = helpers.make_model(helpers.LLAMA)
  refs = [helpers.reference_greedy(model, p, M) for p in PROMPTS]
  stop = refs[0][2]
  out = _gen(model, PROMPTS, SamplingParams(max_new_tokens=M, temperature=0.0,
                                            stop_tokens=(stop,)))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for ref, row, length in zip(refs, tokens, lengths):
    want = ref[:ref.index(stop) + 1] if stop in ref else ref
    assert length == len(want)
    assert list(row[:length]) == want
    assert not row[length:].any()                                   # pad 0 after the stop
  assert int(out.decode_steps) == lengths.max()
  # Every row's first token a stop token: one step, then the loop ends.
  first = tuple({r[0] for r in refs})
  out = _gen(model, PROMPTS, SamplingParams(max_new_tokens=M, temperature=0.0,
                                            stop_tokens=first))
  assert int(out.decode_steps) == 1
  np.testing.assert_array_equal(np.asarray(out.lengths), 1)
  assert [r[0] for r in out.token_lists()] == [r[0] for r in refs]


def test_n_samples_per_prompt_are_prompt_major():
  model = helpers.make_model(helpers.LLAMA, seed=6, scale=1.0)
  out = _gen(model, PROMPTS[:3], SAMPLED)
  assert out.tokens.shape == (6, M)
  np.testing.assert_array_equal(np.asarray(out.prompt_index), [0, 0, 1, 1, 2, 2])
  rows = out.token_lists()
  assert all(rows[2 * i] != rows[2 * i + 1] for i in range(3))
  # Greedy: the n copies of a prompt equal the prompt generated once.
  twice = _gen(model, PROMPTS, SamplingParams(max_new_tokens=M, temperature=0.0, n=2))
  once = _gen(model, PROMPTS, GREEDY).token_lists()
  assert twice.token_lists() == [r for r in once for _ in range(2)]


def _chi2_critical(df: int, z: float = 3.090) -> float:
  """Upper 0.999 quantile of chi-square(df): Wilson-Hilferty, z = Phi^-1(0.999)."""
  a = 2.0 / (9.0 * df)
  return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _assert_matches(counts: collections.Counter, probs: np.ndarray):
  """Pearson chi-square goodness of fit; cells expecting < 5 pooled into one."""
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
  """Top-k, renormalize, then the shortest most-likely prefix with mass >= top_p."""
  order = np.argsort(-p, kind="stable")[:top_k or len(p)]
  q = np.zeros_like(p)
  q[order] = p[order] / p[order].sum()
  keep, mass = [], 0.0
  for v in order:
    if mass >= top_p:
      break
    keep.append(v)
    mass += q[v]
  out = np.zeros_like(p)
  out[keep] = q[keep] / q[keep].sum()
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 0, 0.8),
                                                     (1.0, 6, 0.9)])
def test_sample_frequencies_match_the_softmax(temperature, top_k, top_p):
  config = transformer.ModelConfig(vocab_size=12, d_model=16, n_layers=1, n_heads=2,
                                   n_kv_heads=1, head_dim=8, d_ff=32)
  model = helpers.make_model(config, seed=7, scale=2.5)
  prompt = [3, 1, 4]
  sp = SamplingParams(max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p,
                      n=3000)
  rows = _gen(model, [prompt], sp).token_lists()
  # First token: from the prefill's logits.
  firsts = collections.Counter(r[0] for r in rows)
  _assert_matches(firsts, _nucleus(helpers.reference_probs(model, prompt, temperature),
                                   top_k, top_p))
  # Second token after the most frequent first one: through a cached decode step.
  first = firsts.most_common(1)[0][0]
  p1 = _nucleus(helpers.reference_probs(model, prompt + [first], temperature), top_k, top_p)
  _assert_matches(collections.Counter(r[1] for r in rows if r[0] == first), p1)


def test_filter_logits_support():
  p = np.array([0.15, 0.5, 0.05, 0.3])
  logits = jnp.log(jnp.asarray(p, jnp.float32))[None]

  def kept(**kw):
    return set(np.flatnonzero(np.isfinite(np.asarray(engine.filter_logits(logits, **kw))[0])))
  assert kept(top_k=2, top_p=1.0, use_top_p=False) == {1, 3}
  assert kept(top_k=1, top_p=1.0, use_top_p=False) == {1}
  assert kept(top_k=0, top_p=0.7, use_top_p=True) == {1, 3}        # 0.5 < 0.7 <= 0.8
  assert kept(top_k=0, top_p=0.5, use_top_p=True) == {1}           # 0.5 reaches 0.5
  assert kept(top_k=0, top_p=0.81, use_top_p=True) == {0, 1, 3}
  assert kept(top_k=2, top_p=0.99, use_top_p=True) == {1, 3}       # top-k first
  tie = jnp.asarray([[1.0, 2.0, 2.0, 0.0]])                        # ties at the cut stay
  assert set(np.flatnonzero(np.isfinite(np.asarray(
      engine.filter_logits(tie, top_k=1, top_p=1.0, use_top_p=False))[0]))) == {1, 2}


def test_sharded_on_the_training_mesh_equals_one_device():
  rules = sharding.DEFAULT_RULES
  mesh = sharding.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, params, frozen = _split(helpers.make_model(helpers.LLAMA, seed=3, scale=1.5))
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(params)
  params = jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)),
                        params, specs)
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
  local = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), (params, frozen))
  tokens, mask = helpers.left_pad(PROMPTS[:3])
  key = jax.random.PRNGKey(3)
  sharded = engine.generate(graphdef, params, frozen, tokens, mask, key, SAMPLED)
  single = engine.generate(graphdef, *local, tokens, mask, key, SAMPLED)
  assert len(sharded.tokens.sharding.device_set) == 8
  assert len(single.tokens.sharding.device_set) == 1
  assert sharded.token_lists() == single.token_lists()


def test_one_compile_per_bucket():
  model = helpers.make_model(helpers.LLAMA, seed=9)
  before = engine._jit_generate._cache_size()
  for batch, width, stops in ((PROMPTS, 7, ()), (PROMPTS[:3], 7, (3,)), (PROMPTS[1:], 8, (1, 2))):
    tokens, mask = helpers.left_pad(batch, width)
    engine.generate_model(model, tokens, mask, jax.random.PRNGKey(0),
                          SamplingParams(max_new_tokens=5, temperature=0.0, stop_tokens=stops))
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
                          GREEDY)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(max_new_tokens=2, top_k=-1), "top_k"),
    (dict(max_new_tokens=2, n=0), "n must"),
    (dict(max_new_tokens=2, stop_tokens=(-3,)), "stop_tokens"),
])
def test_bad_sampling_params_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_stop_token_outside_vocabulary_is_named():
  model = helpers.make_model(helpers.LLAMA)
  with pytest.raises(ValueError, match=r"stop_tokens \[99\] outside the vocabulary"):
    _gen(model, PROMPTS, SamplingParams(max_new_tokens=2, stop_tokens=(99,)))
