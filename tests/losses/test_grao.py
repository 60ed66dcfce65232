"""GRAO loss math, tested from the `grao` invariants of docs/losses.md and a NumPy transcription."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.grao import grao_advantages, grao_loss


# Compiled helpers: one XLA compile per (shape, static option) instead of
# op-by-op dispatch; test_jit_equals_eager_and_metrics checks them against the
# plain function. beta and lam are traced so varying them does not recompile.
# Backend optimisation level 0 roughly halves CPU compile time for these tiny
# graphs (results are compared at float32 tolerances).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_STATIC = ("group_includes_reference", "reference_reward", "zero_std")
_STATIC_DEFAULTS = dict(group_includes_reference=True, reference_reward="zero",
                        zero_std="eps", terms=False)
_TERMS = ("loss", "loss/exploration", "loss/imitation", "loss/alignment")
_advantages = jax.jit(grao_advantages, static_argnames=("group_includes_reference",))


@functools.partial(jax.jit, static_argnames=_STATIC + ("terms",),
                   compiler_options=_FAST_COMPILE)
def _compiled(logps, lengths, mask, rewards, answer_logps, answer_lengths, answer_rewards,
              weights, beta, lam, terms=False, **static):
  names = _TERMS if terms else _TERMS[:1]

  def f(x, y):
    loss, metrics = grao_loss(x, lengths, mask, rewards, y, answer_lengths, answer_rewards,
                              beta=beta, lam=lam, weights=weights, **static)
    return jnp.stack([loss] + [metrics[k] for k in names[1:]]), (loss, metrics)
  jac, (loss, metrics) = jax.jacrev(f, argnums=(0, 1), has_aux=True)(logps, answer_logps)
  return loss, metrics, {k: (jac[0][i], jac[1][i]) for i, k in enumerate(names)}


def _run(logps, lengths, mask, rewards, answer_logps, answer_lengths, answer_rewards=None,
         weights=None, beta=0.5, lam=0.6, **static):
  """grao_loss's value and metrics, and gradients.

  Returns (loss, metrics, grads) with grads[name] = (d name / d group_logps,
  d name / d answer_logps) for name "loss", and with terms=True also for each
  term loss/{exploration,imitation,alignment}.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  b = len(answer_logps)
  answer_rewards = jnp.zeros(b) if answer_rewards is None else answer_rewards
  weights = jnp.ones(b) if weights is None else weights
  # Spell every static option out: jit's cache keys on the keywords as passed.
  static = {**_STATIC_DEFAULTS, **static}
  return _compiled(f32(logps), f32(lengths), jnp.asarray(mask, bool), f32(rewards),
                   f32(answer_logps), f32(answer_lengths), f32(answer_rewards), f32(weights),
                   f32(beta), f32(lam), **static)


def _all_finite(*xs):
  return all(np.all(np.isfinite(np.asarray(x))) for x in xs)


def _numpy_grao(logps, lengths, mask, rewards, answer_logps, answer_lengths,
                answer_rewards, beta, lam, incl, eps, zero_std="eps"):
  """Independent transcription of Eq. 2-4, one unpadded group at a time (float64).

  J = (1/G) sum_i [A_i S^(o_i) + beta A_y S^(y) + lam A_i (S^(o_i) - S^(y))],
  A = (R - mu) / (sigma + eps), population std, y in the set when incl; A = 0 for
  a set whose rewards are all equal.
  Returns the loss (mean of -J) and per-row (exploration, imitation, alignment).
  """
  rows = []
  for b in range(len(answer_logps)):
    keep = np.asarray(mask[b], bool)
    r = np.asarray(rewards[b], np.float64)[keep]
    s = np.asarray(logps[b], np.float64)[keep] / np.asarray(lengths[b], np.float64)[keep]
    s_y = float(answer_logps[b]) / float(answer_lengths[b])
    r_y = float(answer_rewards[b])
    pool = np.append(r, r_y) if incl else r
    mu, sigma = pool.mean(), pool.std()
    # sigma == 0 (all rewards of the set equal): no relative signal, every A is 0;
    # under "eps" with y in the set that is already (r - mu) = 0 exactly.
    if sigma == 0:
      adv, adv_y = np.zeros_like(r), 0.0
    else:
      adv, adv_y = (r - mu) / (sigma + eps), (r_y - mu) / (sigma + eps)
    g = len(r)
    exploration = np.sum(adv * s) / g
    imitation = beta * adv_y * s_y
    alignment = lam * np.sum(adv * (s - s_y)) / g
    rows.append((exploration, imitation, alignment))
  rows = np.array(rows)
  return -rows.sum(-1).mean(), rows


def _random_batch(seed, b=5, g=6, ternary=True, ragged=True):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 12, size=(b, g)).astype(np.float32)
  logps = (-rng.uniform(0.2, 3.0, size=(b, g)) * lengths).astype(np.float32)
  if ternary:
    rewards = rng.integers(-1, 2, size=(b, g)).astype(np.float32)
  else:
    rewards = rng.normal(0, 2, size=(b, g)).astype(np.float32)
  mask = np.ones((b, g), bool)
  if ragged:
    sizes = rng.integers(2, g + 1, size=b)
    sizes[0] = g
    mask = np.arange(g)[None, :] < sizes[:, None]
  answer_lengths = rng.integers(1, 12, size=b).astype(np.float32)
  answer_logps = (-rng.uniform(0.2, 3.0, size=b) * answer_lengths).astype(np.float32)
  answer_rewards = rng.normal(0, 1, size=b).astype(np.float32)
  return logps, lengths, mask, rewards, answer_logps, answer_lengths, answer_rewards


def _garbage_in_padding(logps, lengths, mask, rewards):
  """Padding slots hold NaN log-probs and rewards and 0 lengths: must not leak."""
  return (np.where(mask, logps, np.nan).astype(np.float32), np.where(mask, lengths, 0),
          np.where(mask, rewards, np.nan).astype(np.float32))



@pytest.mark.parametrize("incl", [True, False])
@pytest.mark.parametrize("reference_reward", ["zero", "judge"])
def test_matches_numpy_transcription_on_ragged_groups(incl, reference_reward):
  for seed, ternary, beta, lam in [(3, True, 0.5, 0.6), (4, False, 0.2, 1.5)]:
    logps, lengths, mask, rewards, a_logps, a_lengths, a_rewards = _random_batch(
        seed, ternary=ternary)
    ref_r = a_rewards if reference_reward == "judge" else np.zeros_like(a_rewards)
    expected, rows = _numpy_grao(logps, lengths, mask, rewards, a_logps, a_lengths, ref_r,
                                 beta, lam, incl, 1e-6)
    p_logps, p_lengths, p_rewards = _garbage_in_padding(logps, lengths, mask, rewards)
    loss, metrics, grads = _run(p_logps, p_lengths, mask, p_rewards, a_logps, a_lengths,
                                a_rewards, beta=beta, lam=lam, group_includes_reference=incl,
                                reference_reward=reference_reward)
    np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)
    for i, name in enumerate(["exploration", "imitation", "alignment"]):
      np.testing.assert_allclose(metrics[f"loss/{name}"], -rows[:, i].mean(),
                                 rtol=1e-4, atol=1e-5)
    assert _all_finite(*grads["loss"])
    assert np.all(np.asarray(grads["loss"][0])[~mask] == 0)


def test_ragged_mask_equals_unpadded_rows():
  logps, lengths, mask, rewards, a_logps, a_lengths, _ = _random_batch(7)
  sizes = np.array([6, 4, 6, 4, 4])   # two size classes: two unpadded calls
  mask = np.arange(6)[None, :] < sizes[:, None]
  p_logps, p_lengths, p_rewards = _garbage_in_padding(logps, lengths, mask, rewards)
  loss, _, grads = _run(p_logps, p_lengths, mask, p_rewards, a_logps, a_lengths)
  total = 0.0
  for size in [6, 4]:
    rows = sizes == size
    row_loss, _, row_grads = _run(logps[rows, :size], lengths[rows, :size],
                                  np.ones((rows.sum(), size), bool), rewards[rows, :size],
                                  a_logps[rows], a_lengths[rows])
    total += float(row_loss) * rows.sum()
    # Per-row gradients scale with 1 / (rows in the batch).
    np.testing.assert_allclose(np.asarray(grads["loss"][0])[rows, :size] * len(sizes),
                               np.asarray(row_grads["loss"][0]) * rows.sum(),
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, total / len(sizes), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, -1.0, 0.1, 1e3])
def test_equal_rewards_give_zero_loss_and_zero_gradient(value):
  # (f)1: G+1, every reward (the answer's too) equal -> every A = 0. 0.1 is not
  # representable, so a naive mean would leave rounding noise / (sigma + eps).
  logps, lengths, mask, _, a_logps, a_lengths, _ = _random_batch(1)
  rewards = np.full(mask.shape, value, np.float32)
  a_rewards = np.full(a_logps.shape, value, np.float32)
  loss, metrics, grads = _run(logps, lengths, mask, rewards, a_logps, a_lengths, a_rewards,
                              reference_reward="judge")
  assert loss == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in grads["loss"])
  assert metrics["frac_zero_std_groups"] == 1.0
  assert metrics["adv/ref"] == 0.0


@pytest.mark.parametrize("zero_std", ["eps", "zero"])
def test_zero_variance_groups_in_group_only_mode_are_finite(zero_std):
  logps, lengths, mask, _, a_logps, a_lengths, _ = _random_batch(2)
  rewards = -np.ones(mask.shape, np.float32)  # every sample loses, R(y, y) = 0
  loss, metrics, grads = _run(logps, lengths, mask, rewards, a_logps, a_lengths,
                              group_includes_reference=False, zero_std=zero_std)
  assert _all_finite(loss, *grads["loss"])
  assert metrics["frac_zero_std_groups"] == 1.0
  assert np.all(np.asarray(grads["loss"][0]) == 0)  # no sample beats another
  # Both guards drop the group: with the eps guard Eq. 4 read literally would give
  # A_y = (0 - (-1)) / 1e-6 = 1e6 (an audit finding); an equal-reward group has no
  # relative signal, so A_y is 0 too and the answer's imitation term gets no weight.
  assert metrics["adv/ref"] == 0.0
  assert loss == 0.0 and np.all(np.asarray(grads["loss"][1]) == 0)


def test_group_only_advantages_are_zero_for_equal_rewards_with_small_eps():
  # The audit case directly on grao_advantages: G-only, default std_eps, the answer
  # differs from the (constant) samples; nothing may come out near 1 / std_eps.
  rewards = jnp.asarray([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
  mask = jnp.ones((2, 3), bool)
  answer = jnp.asarray([0.0, 0.0])
  adv, adv_y, _, sigma = grao_advantages(rewards, mask, answer,
                                         group_includes_reference=False)
  assert float(sigma[0]) == 0.0
  assert np.all(np.asarray(adv[0]) == 0) and float(adv_y[0]) == 0.0
  # A group with spread keeps Eq. 4's A_y = (R_y - mu) / (sigma + eps).
  mu, sd = 2.0 / 3.0, np.std([0.0, 1.0, 1.0])
  np.testing.assert_allclose(float(adv_y[1]), (0.0 - mu) / (sd + 1e-6), rtol=1e-5)


def test_beta_lam_zero_is_group_normalised_reinforce():
  # (f)2: loss = -(1/G) sum_i A_i S^(o_i), y's reward 0 in the group.
  logps, lengths, mask, rewards, a_logps, a_lengths, _ = _random_batch(4, ternary=False)
  loss, _, _ = _run(logps, lengths, mask, rewards, a_logps, a_lengths, beta=0.0, lam=0.0)
  expected = []
  for b in range(len(a_logps)):
    r, s = rewards[b][mask[b]], (logps / lengths)[b][mask[b]]
    pool = np.append(r, 0.0)
    expected.append(-np.mean((r - pool.mean()) / (pool.std() + 1e-6) * s))
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)


def test_group_only_alignment_gradient_is_lam_times_exploration():
  # (f)3: with sum_i A_i = 0 the -lam A_i S^(y) part cancels.
  args = _random_batch(5, ternary=False)
  lam = 0.6
  _, _, grads = _run(*args[:6], lam=lam, group_includes_reference=False, terms=True)
  g_align, g_expl = grads["loss/alignment"], grads["loss/exploration"]
  np.testing.assert_allclose(g_align[0], lam * np.asarray(g_expl[0]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_align[1], 0.0, atol=1e-6)
  assert np.all(np.asarray(g_expl[1]) == 0)
  # Under G+1 it does not: the regulariser also moves the answer.
  _, _, grads = _run(*args[:6], lam=lam, terms=True)
  assert np.any(np.abs(np.asarray(grads["loss/alignment"][1])) > 1e-3)


@pytest.mark.parametrize("incl", [True, False])
def test_reward_affine_invariance(incl):
  # (f)4: the answer's reward transforms with the samples' (reference_reward="judge").
  logps, lengths, mask, rewards, a_logps, a_lengths, a_rewards = _random_batch(
      6, ternary=False)
  kw = dict(group_includes_reference=incl, reference_reward="judge")
  base, m0, _ = _run(logps, lengths, mask, rewards, a_logps, a_lengths, a_rewards, **kw)
  for scale, shift in [(3.0, 0.0), (0.25, 0.0), (1.0, 5.0), (2.0, -7.0)]:
    moved, m1, _ = _run(logps, lengths, mask, scale * rewards + shift, a_logps, a_lengths,
                        scale * a_rewards + shift, **kw)
    np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m1["adv/ref"], m0["adv/ref"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("incl", [True, False])
def test_gradient_signs_follow_the_advantages(incl):
  # (f)5: descent raises S^ of a sample with A > 0, and of y iff A_y > 0.
  logps, lengths, mask, rewards, a_logps, a_lengths, a_rewards = _random_batch(
      8, ternary=False, ragged=False)
  a_rewards[:2] = 10.0    # the answer beats its group: A_y > 0
  a_rewards[2:] = -10.0   # loses: A_y < 0
  pool = np.concatenate([rewards, a_rewards[:, None]], -1) if incl else rewards
  mu, sigma = pool.mean(-1), pool.std(-1)
  adv = (rewards - mu[:, None]) / sigma[:, None]
  adv_y = (a_rewards - mu) / sigma
  _, metrics, grads = _run(logps, lengths, mask, rewards, a_logps, a_lengths, a_rewards,
                           group_includes_reference=incl, reference_reward="judge")
  g_s, g_y = grads["loss"]
  np.testing.assert_array_equal(np.sign(g_s), -np.sign(adv))
  np.testing.assert_array_equal(np.sign(g_y), -np.sign(adv_y))
  np.testing.assert_allclose(metrics["adv/ref"], adv_y.mean(), rtol=1e-4)


def test_all_lose_and_all_win_closed_forms():
  # (f)6: G = 8, answer reward 0, G+1: all lose gives A_y = sqrt(G) = 2.8284...,
  # A_o = -1/sqrt(G) = -0.35355...; all win the opposite; sum_i A_o = -A_y.
  g = 8
  rewards = np.array([[-1.0] * g, [1.0] * g], np.float32)
  adv, adv_y, _, sigma = _advantages(rewards, np.ones((2, g), bool), np.zeros(2))
  sign = np.array([1.0, -1.0])
  np.testing.assert_allclose(adv_y, sign * np.sqrt(g), rtol=1e-5)
  np.testing.assert_allclose(adv, -sign[:, None] / np.sqrt(g) * np.ones((2, g)), rtol=1e-5)
  np.testing.assert_allclose(np.sum(adv, -1), -np.asarray(adv_y), rtol=1e-5)
  assert np.all(np.asarray(sigma) > 0)


def test_jit_equals_eager_and_metrics():
  args = _random_batch(9)
  eager = grao_loss(*args, reference_reward="judge")
  jitted = _run(*args, reference_reward="judge")
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  assert set(jitted[1]) == set(eager[1])
  for key in eager[1]:
    np.testing.assert_allclose(jitted[1][key], eager[1][key], rtol=1e-6, atol=1e-7)
  logps, lengths, mask, rewards, *_ = args
  metrics = eager[1]
  np.testing.assert_allclose(metrics["reward/mean"], rewards[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["completion_length/mean"], lengths[mask].mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["reward/win_rate"], (rewards[mask] > 0).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["reward/ref"], args[6].mean(), rtol=1e-6)
  np.testing.assert_allclose(
      eager[0], metrics["loss/exploration"] + metrics["loss/imitation"]
      + metrics["loss/alignment"], rtol=1e-5)


def test_finite_at_extreme_inputs():
  logps, lengths, mask, rewards, a_logps, a_lengths, a_rewards = _random_batch(10)
  for magnitude in [1e4, -1e4]:
    loss, _, grads = _run(np.full_like(logps, magnitude), lengths, mask, 1e4 * rewards,
                          np.full_like(a_logps, magnitude), a_lengths, 1e4 * a_rewards,
                          reference_reward="judge")
    assert _all_finite(loss, *[g for pair in grads.values() for g in pair])


@pytest.mark.parametrize("incl", [True, False])
def test_weights_drop_padding_rows_and_empty_groups_are_finite(incl):
  logps, lengths, mask, rewards, a_logps, a_lengths, _ = _random_batch(11)
  expected, _ = _numpy_grao(logps[:3], lengths[:3], mask[:3], rewards[:3], a_logps[:3],
                            a_lengths[:3], np.zeros(3), 0.5, 0.6, incl, 1e-6)
  mask_pad = mask.copy()
  mask_pad[3:] = False  # padding rows: no sample at all
  w = np.array([1, 1, 1, 0, 0], np.float32)
  padded, m_pad, grads = _run(logps, lengths, mask_pad, rewards, a_logps, a_lengths,
                              weights=w, group_includes_reference=incl)
  assert _all_finite(padded, *grads["loss"])
  np.testing.assert_allclose(padded, expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m_pad["reward/mean"], rewards[:3][mask[:3]].mean(), rtol=1e-6)
  # An empty group with weight 1 contributes exactly 0 and no gradient.
  w_empty = np.array([0, 0, 0, 1, 1], np.float32)
  only_empty, m, grads = _run(logps, lengths, mask_pad, rewards, a_logps, a_lengths,
                              weights=w_empty, group_includes_reference=incl)
  assert only_empty == 0.0 and m["adv/ref"] == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in grads["loss"])


def test_bad_options_raise():
  args = _random_batch(12)
  with pytest.raises(ValueError, match="answer_rewards"):
    grao_loss(*args[:6], reference_reward="judge")
  with pytest.raises(ValueError, match="reference_reward"):
    grao_loss(*args, reference_reward="model")
  with pytest.raises(ValueError, match="zero_std"):
    grao_loss(*args, zero_std="nan")


@pytest.mark.parametrize("zero_std", ["eps", "zero"])
def test_near_equal_rewards_are_a_tie_group(zero_std):
  # Issue 30: rewards [1, 1, 1, 1 + 1e-7] (float32: one ulp apart) with R(y, y) = 0
  # under G-only gave A_y of about -9.5e5. Any set whose std is at most
  # STD_FLOOR * max(1, max |R|) is a tie: every advantage 0, the answer's too.
  rewards = jnp.asarray([[1.0, 1.0, 1.0, 1.0 + 1e-7],
                         [1e3, 1e3, 1e3 + 0.003, 1e3],     # within 1e-5 of the scale 1e3
                         [1.0, 1.0, 1.0, 1.01]], jnp.float32)  # a real spread
  mask = jnp.ones((3, 4), bool)
  answer = jnp.zeros(3)
  for incl in (False, True):
    adv, adv_y, _, sigma = grao_advantages(rewards, mask, answer, group_includes_reference=incl,
                                           zero_std=zero_std)
    assert _all_finite(adv, adv_y)
    if not incl:   # with y's 0 in the set, rows 0 and 1 have a real spread
      assert np.all(np.asarray(adv[:2]) == 0) and np.all(np.asarray(adv_y[:2]) == 0)
      assert np.all(np.asarray(sigma[:2]) == 0)
  # The row above the floor keeps Eq. 4 (G-only): A = (R - mu) / (sigma + eps).
  adv, adv_y, _, sigma = grao_advantages(rewards, mask, answer, group_includes_reference=False,
                                         zero_std=zero_std)
  r = np.asarray([1.0, 1.0, 1.0, np.float32(1.01)], np.float64)
  eps = 1e-6 if zero_std == "eps" else 0.0
  np.testing.assert_allclose(np.asarray(adv[2]), (r - r.mean()) / (r.std() + eps), rtol=1e-3)
  np.testing.assert_allclose(float(adv_y[2]), (0.0 - r.mean()) / (r.std() + eps), rtol=1e-3)
  # std_floor=0: only exactly equal rewards are a tie (the old rule), so row 0's
  # answer gets the huge advantage the floor guards against.
  _, adv_y, _, _ = grao_advantages(rewards, mask, answer, group_includes_reference=False,
                                   zero_std=zero_std, std_floor=0.0)
  assert abs(float(adv_y[0])) > 1e5
  from jaxalign.losses.grao import STD_FLOOR
  assert STD_FLOOR == 1e-5   # the value docs/losses.md states
  # Through the loss: finite, and the tie rows count as zero-std groups.
  logps, lengths, _, _, a_logps, a_lengths, _ = _random_batch(3)
  loss, metrics, grads = _run(logps[:3, :4], lengths[:3, :4], np.ones((3, 4), bool),
                              np.asarray(rewards), a_logps[:3], a_lengths[:3],
                              group_includes_reference=False, zero_std=zero_std)
  assert _all_finite(loss, *grads["loss"])
  np.testing.assert_allclose(float(metrics["frac_zero_std_groups"]), 2.0 / 3.0, rtol=1e-6)
