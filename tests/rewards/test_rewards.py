"""Rewards: exact-match checkers, the registry and batch checks, the reward-model head."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxalign import config as config_lib
from jaxalign import rewards
from jaxalign.data import toy
from jaxalign.models import transformer
from jaxalign.rewards import model as rm
from jaxalign.rewards import verifiable


def length_reward(prompt, completion, reference, *, scale=1.0):
  """A per-example reward importable as "tests.rewards.test_rewards:length_reward"."""
  del prompt, reference
  return scale * len(completion)


@pytest.mark.parametrize("completion,expected", [
    ("85", 1.0), (" 85 ", 1.0), ("85 and more", 1.0), ("85<eos>7", 1.0),
    ("085", 0.0), ("8", 0.0), ("", 0.0), ("86", 0.0)])
def test_exact_match_compares_the_first_word_with_the_reference(completion, expected):
  assert verifiable.exact_match("37+48=", completion, "85") == expected


def test_exact_match_values_and_missing_reference():
  assert verifiable.exact_match("p", "7", "7", correct=0.0, wrong=-1.0) == 0.0
  assert verifiable.exact_match("p", "8", "7", correct=0.0, wrong=-1.0) == -1.0
  assert verifiable.exact_match("p", "7", None) == 0.0


def test_arithmetic_uses_the_task_checker_not_the_reference():
  task = toy.ArithmeticTask()
  for p in task.problems(20, seed=3):
    assert verifiable.arithmetic(p.prompt, p.answer, "wrong reference") == 1.0
    assert verifiable.arithmetic(p.prompt, "0" + p.answer, p.answer) == 0.0
  assert verifiable.arithmetic("not a problem", "1", "1") == 0.0


def test_registry_gives_batched_functions_with_options():
  fn = rewards.get("exact_match", correct=0.0, wrong=-1.0)
  values = rewards.score(fn, ["a", "b", "c"], ["1", "2", "x"], ["1", "3", None])
  np.testing.assert_array_equal(values, np.array([0.0, -1.0, -1.0], np.float32))
  assert values.dtype == np.float32
  assert set(rewards.option_names("exact_match")) == {"correct", "wrong"}
  assert set(rewards.option_names("reward_model")) == {"path", "batch_size", "max_length"}


@rewards.batched_reward
def batched_length(prompts, completions, references, *, offset=0.0):
  del prompts, references
  return np.array([len(c) + offset for c in completions])


def test_module_function_rewards_and_registration():
  name = "tests.rewards.test_rewards:length_reward"
  fn = rewards.get(name, scale=2.0)
  np.testing.assert_array_equal(rewards.score(fn, ["p", "p"], ["ab", "abcd"], [None, None]),
                                [4.0, 8.0])
  batched = rewards.get("tests.rewards.test_rewards:batched_length", offset=0.5)
  np.testing.assert_array_equal(rewards.score(batched, ["p", "p"], ["a", "abc"], [None] * 2),
                                [1.5, 3.5])
  assert rewards.option_names("tests.rewards.test_rewards:batched_length") == ("offset",)
  rewards.register("test_len", rewards.per_example(length_reward))
  assert rewards.score(rewards.get("test_len"), ["p"], ["abc"], [None])[0] == 3.0
  with pytest.raises(KeyError, match="unknown reward 'nope'"):
    rewards.get("nope")
  with pytest.raises(KeyError, match="cannot import reward"):
    rewards.get("tests.rewards.test_rewards:missing")


def test_score_rejects_bad_reward_output():
  with pytest.raises(rewards.RewardError, match="one float each"):
    rewards.score(lambda p, c, r: [1.0], ["a", "b"], ["x", "y"], [None, None])
  with pytest.raises(rewards.RewardError, match="not finite.*completion 'y'"):
    rewards.score(lambda p, c, r: [0.0, float("nan")], ["a", "b"], ["x", "y"], [None, None])
  with pytest.raises(rewards.RewardError, match="not finite in float32"):
    rewards.score(lambda p, c, r: [1e300], ["a"], ["x"], [None])


def _online_config(**reward):
  c = config_lib.defaults()
  c.loss.name = "grao"
  c.loss.hparams = ml_collections.ConfigDict()
  c.online.enabled = True
  c.data.max_length, c.data.max_prompt_length, c.sampling.max_new_tokens = 64, 32, 16
  c.reward.name = reward.get("name", "")
  c.reward.options = ml_collections.ConfigDict(reward.get("options", {}))
  return c


@pytest.mark.parametrize("reward,key", [
    (dict(name=""), "config.reward.name: online grao needs a reward"),
    (dict(name="bogus"), "config.reward.name: unknown reward 'bogus'"),
    (dict(name="exact_match", options=dict(corect=1.0)), "config.reward.options.corect"),
    (dict(name="reward_model", options=dict(path="/nonexistent")),
     "config.reward.options.path: '/nonexistent' is not a saved reward model"),
])
def test_config_names_the_bad_reward_key(reward, key):
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(_online_config(**reward), 8)


# --- reward model -----------------------------------------------------------

CFG = transformer.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                              head_dim=8, d_ff=64, max_seq_len=16)


@nnx.jit
def _call(model, tokens, mask):
  return model(tokens, mask)


@nnx.jit
def _hidden(model, tokens, mask):
  return model.backbone(tokens, mask)


def test_reward_model_scores_the_last_real_token_whatever_the_padding():
  model = rm.RewardModel(CFG, rngs=nnx.Rngs(0))
  seqs = [[1, 5, 6, 7], [1, 9, 10], [1, 4, 4, 4, 4, 12]]
  t = 8
  right = np.zeros((3, t), np.int32)
  left = np.zeros((3, t), np.int32)
  rmask, lmask = np.zeros_like(right), np.zeros_like(left)
  for i, s in enumerate(seqs):
    right[i, :len(s)], rmask[i, :len(s)] = s, 1
    left[i, t - len(s):], lmask[i, t - len(s):] = s, 1
  values = _call(model, jnp.asarray(right), jnp.asarray(rmask))
  assert values.shape == (3,) and values.dtype == jnp.float32
  np.testing.assert_allclose(_call(model, jnp.asarray(left), jnp.asarray(lmask)), values,
                             atol=1e-5)
  # The value is the head on the hidden state of the last real token.
  hidden = _hidden(model, jnp.asarray(right), jnp.asarray(rmask))
  last = np.array([len(s) - 1 for s in seqs])
  expected = hidden[np.arange(3), last] @ model.head[...] + model.bias[...]
  np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
  # Padding content after the last real token does not matter; different texts differ.
  noisy = np.where(rmask == 1, right, 17)
  np.testing.assert_allclose(_call(model, jnp.asarray(noisy), jnp.asarray(rmask)), values,
                             atol=1e-6)
  assert len(set(np.round(np.asarray(values), 5))) == 3


def test_reward_model_saves_loads_and_scores_in_fixed_size_batches(tmp_path):
  model = rm.RewardModel(CFG, rngs=nnx.Rngs(1))
  rm.save_reward_model(model, str(tmp_path / "rm"))
  loaded = rm.load_reward_model(str(tmp_path / "rm"))
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(a, b)
  tok = toy.build_tokenizer()
  prompts = ["1+2=", "37+48=", "5+5=", "9+0=", "12+1="]
  completions = ["3", "85", "10", "9", "13"]
  by3 = rewards.get("reward_model", tokenizer=tok, path=str(tmp_path / "rm"), batch_size=3,
                    max_length=12)
  by8 = rewards.get("reward_model", tokenizer=tok, path=str(tmp_path / "rm"), batch_size=8,
                    max_length=12)
  v3 = rewards.score(by3, prompts, completions, [None] * 5)
  v8 = rewards.score(by8, prompts, completions, [None] * 5)
  np.testing.assert_allclose(v3, v8, rtol=1e-5, atol=1e-6)
  # Row i is the model on bos + prompt + completion + eos.
  rows = [[tok.bos_token_id] + tok.encode(prompts[i] + completions[i], add_special_tokens=False)
          + [tok.eos_token_id] for i in (0, 1)]
  tokens = np.zeros((2, 12), np.int32)
  mask = np.zeros((2, 12), np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  np.testing.assert_allclose(v3[:2], _call(model, jnp.asarray(tokens), jnp.asarray(mask)),
                             rtol=1e-5, atol=1e-6)
