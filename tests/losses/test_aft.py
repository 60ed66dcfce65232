"""AFT constraint alignment loss: the `aft` invariants of docs/losses.md and a NumPy transcription."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.aft import aft_loss

_VARIANTS = ["none", "detached", "boundary", "ranking"]


# One XLA compile per (shape, constraint) instead of op-by-op dispatch;
# test_jit_equals_eager compares it with the plain function. boundary_margin and
# vft_weight are traced, so varying them does not recompile. Backend
# optimisation level 0 roughly halves CPU compile time for these tiny graphs.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnames=("constraint", "detach_boundary"),
                   compiler_options=_FAST_COMPILE)
def _compiled(logps, lengths, mask, is_positive, answer_logps, answer_lengths, ranks,
              weights, boundary_margin, vft_weight, **static):
  def f(x, y):
    return aft_loss(x, lengths, mask, is_positive, y, answer_lengths, ranks,
                    boundary_margin=boundary_margin, vft_weight=vft_weight,
                    weights=weights, **static)
  (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      logps, answer_logps)
  return loss, metrics, grads


_SHAPE = (4, 6)


def _run(logps, lengths, mask, is_positive, answer_logps=None, answer_lengths=None,
         ranks=None, *, weights=None, boundary_margin=0.5, vft_weight=0.0,
         constraint="detached", detach_boundary=True, pad=True):
  """aft_loss's (loss, metrics, (d/d group_logps, d/d answer_logps)); VFT off by default.

  With pad=True a smaller [b, g] problem is embedded in one fixed [4, 6] batch
  (masked slots, weight-0 rows) so that every test shares one compile per
  constraint; weight-0 rows and masked slots change nothing (tested below), and
  gradients come back cut to [b, g].
  """
  logps = np.asarray(logps, np.float32)
  b, g = logps.shape
  shape = _SHAPE if pad else (b, g)

  def fit(x, fill, dtype, rows_only=False):
    x = np.asarray(x, dtype)
    out = np.full(shape[:1] if rows_only else shape, fill, dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return jnp.asarray(out)

  f32 = np.float32
  loss, metrics, (g_logps, g_answer) = _compiled(
      fit(logps, 0.0, f32), fit(lengths, 1.0, f32), fit(mask, False, bool),
      fit(is_positive, False, bool),
      fit(np.full(b, -1.0) if answer_logps is None else answer_logps, -1.0, f32, True),
      fit(np.ones(b) if answer_lengths is None else answer_lengths, 1.0, f32, True),
      fit(np.zeros((b, g)) if ranks is None else ranks, 0, np.int32),
      fit(np.ones(b) if weights is None else weights, 0.0, f32, True),
      jnp.float32(boundary_margin), jnp.float32(vft_weight),
      constraint=constraint, detach_boundary=detach_boundary)
  return loss, metrics, (np.asarray(g_logps)[:b, :g], np.asarray(g_answer)[:b])


def _numpy_aft(logps, lengths, mask, is_positive, answer_logps, answer_lengths, ranks,
               constraint, margin, vft_weight):
  """Independent transcription (float64), one question at a time, explicit pair loops.

  L_A = log(1 + sum_{p,n} exp(s_n - s_p)); BC adds exp(T_p - s_n) per pair with
  T_p = 2 B - s_p, B = min_p s_p - margin; ranking: pairs i > j, B_j from the
  candidates ranked above j. Detaching does not change values.
  """
  rows = []
  for b in range(len(logps)):
    s = np.asarray(logps[b], np.float64) / np.asarray(lengths[b], np.float64)
    valid = [i for i in range(len(s)) if mask[b][i]]
    if constraint == "ranking":
      pairs = [(i, j) for i in valid for j in valid if ranks[b][i] < ranks[b][j]]
    else:
      pos = [i for i in valid if is_positive[b][i]]
      neg = [i for i in valid if not is_positive[b][i]]
      pairs = list(itertools.product(pos, neg))
    total = 1.0
    for i, j in pairs:
      total += np.exp(s[j] - s[i])
      if constraint in ("boundary", "ranking"):
        boundary = min(s[k] for k, jj in pairs if jj == j) - margin
        total += np.exp(2 * boundary - s[i] - s[j])
    rows.append(np.log(total))
  vft = -np.sum(answer_logps) / np.sum(answer_lengths)
  return vft_weight * vft + np.mean(rows), np.array(rows)


def _random_batch(seed, b=4, g=6, ragged=True):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 10, size=(b, g)).astype(np.float32)
  logps = (-rng.uniform(0.1, 2.0, size=(b, g)) * lengths).astype(np.float32)
  is_positive = rng.random((b, g)) < 0.5
  is_positive[:, 0], is_positive[:, 1] = True, False   # both sets non-empty
  mask = np.ones((b, g), bool)
  if ragged:
    mask = np.arange(g)[None, :] < rng.integers(2, g + 1, size=b)[:, None]
  ranks = np.stack([rng.permutation(g) // 2 for _ in range(b)])   # ties included
  answer_lengths = rng.integers(1, 10, size=b).astype(np.float32)
  answer_logps = (-rng.uniform(0.1, 2.0, size=b) * answer_lengths).astype(np.float32)
  return logps, lengths, mask, is_positive, answer_logps, answer_lengths, ranks


def _all_finite(*xs):
  return all(np.all(np.isfinite(np.asarray(x))) for x in xs)


@pytest.mark.parametrize("constraint", _VARIANTS)
def test_matches_numpy_transcription_on_ragged_groups(constraint):
  for seed, margin, vft_weight in [(0, 0.5, 1.0), (1, 2.0, 0.3)]:
    logps, lengths, mask, pos, a_logps, a_lengths, ranks = _random_batch(seed)
    expected, rows = _numpy_aft(logps, lengths, mask, pos, a_logps, a_lengths, ranks,
                                constraint, margin, vft_weight)
    # Padding slots hold NaN log-probs and 0 lengths: they must not leak.
    p_logps = np.where(mask, logps, np.nan)
    p_lengths = np.where(mask, lengths, 0)
    loss, metrics, grads = _run(p_logps, p_lengths, mask, pos, a_logps, a_lengths, ranks,
                                boundary_margin=margin, vft_weight=vft_weight,
                                constraint=constraint)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/align"], rows.mean(), rtol=1e-5)
    assert _all_finite(*grads)
    assert np.all(np.asarray(grads[0])[~mask] == 0)


def test_ragged_mask_equals_unpadded_rows():
  logps, lengths, _, pos, a_logps, a_lengths, _ = _random_batch(2)
  sizes = np.array([6, 4, 4, 6])
  mask = np.arange(6)[None, :] < sizes[:, None]
  for constraint in ["boundary"]:   # the most mask-sensitive variant (masked min)
    loss, _, _ = _run(np.where(mask, logps, 7.0), lengths, mask, pos, a_logps, a_lengths,
                      constraint=constraint, vft_weight=1.0, pad=False)
    # Unpadded: each size class on its own; VFT is a token mean over all rows.
    align = 0.0
    for size in [6, 4]:
      rows = sizes == size
      _, m, _ = _run(logps[rows, :size], lengths[rows, :size],
                     np.ones((rows.sum(), size), bool), pos[rows, :size],
                     constraint=constraint, pad=False)
      align += float(m["loss/align"]) * rows.sum()
    vft = -a_logps.sum() / a_lengths.sum()
    np.testing.assert_allclose(loss, vft + align / len(sizes), rtol=1e-5)


def test_one_pair_is_logistic_with_half_gradients():
  # (f)1: L_A = l(s_p - s_n); at equal scores log 2 and -+1/2; DC gives s_n no gradient.
  one = np.ones((1, 2), np.float32)
  pos = np.array([[True, False]])
  for constraint, g_neg in [("none", 0.5), ("detached", 0.0)]:
    loss, _, (g, _) = _run(np.array([[-3.0, -3.0]]), one, one, pos, constraint=constraint)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(g, [[-0.5, g_neg]], rtol=1e-6, atol=1e-8)
    loss, _, _ = _run(np.array([[-1.0, -4.5]]), one, one, pos, constraint=constraint)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-3.5)), rtol=1e-6)


def test_alignment_is_permutation_and_shift_invariant_and_monotone():
  # (f)2 for L_A ("none"): scores enter only as differences s_n - s_p.
  logps, lengths, mask, pos, *_ = _random_batch(3, ragged=False)
  base, _, (g, _) = _run(logps, lengths, mask, pos, constraint="none")
  perm = np.random.default_rng(0).permutation(logps.shape[1])
  permuted, _, _ = _run(logps[:, perm], lengths[:, perm], mask, pos[:, perm],
                        constraint="none")
  np.testing.assert_allclose(permuted, base, rtol=1e-6)
  shifted, _, _ = _run(logps + 2.5 * lengths, lengths, mask, pos, constraint="none")
  np.testing.assert_allclose(shifted, base, rtol=1e-5)
  g = np.asarray(g)
  assert np.all(g[pos] < 0) and np.all(g[~pos] > 0)


@pytest.mark.parametrize("constraint", _VARIANTS)
def test_empty_positive_or_negative_set_is_zero_with_zero_gradient(constraint):
  # (f)3: no pair -> log 1 = 0 (the question is skipped), never NaN.
  logps, lengths, mask, _, *_ = _random_batch(4, ragged=False)
  for is_positive in [np.ones_like(mask), np.zeros_like(mask)]:
    ranks = np.zeros(mask.shape, np.int32)  # all tied: no ranked pair either
    loss, metrics, grads = _run(logps, lengths, mask, is_positive, ranks=ranks,
                                constraint=constraint)
    assert loss == 0.0 and _all_finite(*metrics.values())
    assert np.all(np.asarray(grads[0]) == 0)
  # Rows with one empty set next to a row with pairs: only that row counts.
  pos = np.zeros(mask.shape, bool)
  pos[0, 0] = True
  ranks = np.where(pos, 0, 1)
  loss, _, grads = _run(logps, lengths, mask, pos, ranks=ranks, constraint=constraint)
  expected, _ = _numpy_aft(logps, lengths, mask, pos, [0], [1], ranks,
                           constraint, 0.5, 0.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert np.all(np.asarray(grads[0])[1:] == 0) and _all_finite(*grads)


def test_detached_constraint_value_and_gradients():
  # (f)4: same value as L_A, no gradient to negatives, the same to positives.
  logps, lengths, mask, pos, *_ = _random_batch(5)
  plain, _, (g_plain, _) = _run(logps, lengths, mask, pos, constraint="none")
  dc, _, (g_dc, _) = _run(logps, lengths, mask, pos, constraint="detached")
  np.testing.assert_allclose(dc, plain, rtol=1e-6)
  g_plain, g_dc = np.asarray(g_plain), np.asarray(g_dc)
  assert np.all(g_dc[~pos] == 0)
  np.testing.assert_allclose(g_dc[pos], g_plain[pos], rtol=1e-6)


def test_boundary_gradient_changes_sign_at_the_boundary():
  # (f)5: d L_BC / d s(n) is 0 at s(n) = B, > 0 above, < 0 below; checked
  # against central finite differences of the value (detached T_p).
  margin = 0.7
  s_pos = [-1.0, -2.0]
  boundary = min(s_pos) - margin
  one = np.ones((1, 3), np.float32)
  pos = np.array([[True, True, False]])
  for offset, sign in [(0.0, 0), (0.4, 1), (-0.4, -1)]:
    s_n = boundary + offset
    _, m, (g, _) = _run(np.array([s_pos + [s_n]], np.float32), one, one, pos,
                        boundary_margin=margin, constraint="boundary")
    g_n = float(np.asarray(g)[0, 2])
    if sign == 0:
      np.testing.assert_allclose(g_n, 0.0, atol=1e-6)
    else:
      assert np.sign(g_n) == sign
    # T_p detached: s(n) is the only argument it touches.
    h = 1e-2
    f = lambda x: _numpy_aft(np.array([s_pos + [x]]), one, one, pos, [0], [1], None,
                             "boundary", margin, 0.0)[0]
    np.testing.assert_allclose(g_n, (f(s_n + h) - f(s_n - h)) / (2 * h), atol=1e-4)
    np.testing.assert_allclose(m["scores/boundary"], boundary, rtol=1e-6)
    assert m["constraint/below_boundary_frac"] == (1.0 if sign < 0 else 0.0)


@pytest.mark.parametrize("margin", [0.0, 0.3, 1.5])
def test_boundary_closed_forms_at_equal_scores(margin):
  # (f)6: one pair: log(2 + e^{-2 b}), d/ds(n) = (1 - e^{-2 b})/(2 + e^{-2 b}),
  # d/ds(p) = -1/(2 + e^{-2 b}); P x N equal: log(1 + P N (1 + e^{-2 b})).
  e = np.exp(-2 * margin)
  one = np.ones((1, 2), np.float32)
  loss, _, (g, _) = _run(np.array([[-2.0, -2.0]]), one, one, np.array([[True, False]]),
                         boundary_margin=margin, constraint="boundary")
  np.testing.assert_allclose(loss, np.log(2 + e), rtol=1e-6)
  np.testing.assert_allclose(g, [[-1 / (2 + e), (1 - e) / (2 + e)]], rtol=1e-5, atol=1e-7)
  ones = np.ones((1, 5), np.float32)
  pos = np.array([[True, True, False, False, False]])   # P = 2, N = 3
  loss, _, _ = _run(np.full((1, 5), -2.0), ones, ones, pos, boundary_margin=margin,
                    constraint="boundary")
  np.testing.assert_allclose(loss, np.log(1 + 6 * (1 + e)), rtol=1e-6)


def test_large_margin_recovers_plain_alignment():
  # (f)7: beta_B -> inf makes T_p -> -inf, so L_BC -> L_A (value and gradients).
  logps, lengths, mask, pos, *_ = _random_batch(6)
  plain, _, (g_plain, _) = _run(logps, lengths, mask, pos, constraint="none")
  bc, m, (g_bc, _) = _run(logps, lengths, mask, pos, boundary_margin=40.0,
                          constraint="boundary")
  np.testing.assert_allclose(bc, plain, rtol=1e-6)
  np.testing.assert_allclose(g_bc, g_plain, rtol=1e-5, atol=1e-8)
  assert m["loss/constraint"] < 1e-12


def test_ranking_with_two_tiers_is_the_binary_boundary_loss():
  logps, lengths, mask, pos, *_ = _random_batch(7)
  ranks = np.where(pos, 1, 2)
  bc, _, (g_bc, _) = _run(logps, lengths, mask, pos, constraint="boundary")
  rbc, _, (g_rbc, _) = _run(logps, lengths, mask, ~pos, ranks=ranks, constraint="ranking")
  np.testing.assert_allclose(rbc, bc, rtol=1e-6)
  np.testing.assert_allclose(g_rbc, g_bc, rtol=1e-6)


def test_boundary_without_detach_moves_the_weakest_positive():
  logps = np.array([[-1.0, -2.0, -2.5]], np.float32)
  one = np.ones((1, 3), np.float32)
  pos = np.array([[True, True, False]])
  _, _, (g_on, _) = _run(logps, one, one, pos, constraint="boundary")
  _, _, (g_off, _) = _run(logps, one, one, pos, constraint="boundary", detach_boundary=False)
  np.testing.assert_allclose(g_on[0, 2], g_off[0, 2], rtol=1e-6)   # s(n): same
  assert g_off[0, 1] > g_on[0, 1]   # without the detach, the min positive is pushed down


def test_vft_term_weights_and_metrics():
  logps, lengths, mask, pos, a_logps, a_lengths, _ = _random_batch(8)
  w = np.array([1, 1, 0, 0], np.float32)
  # Rows with weight 0 hold finite junk (the pipeline's padding), as for dpo_loss.
  loss, m, (_, g_answer) = _run(np.where(w[:, None] > 0, logps, 50.0), lengths, mask,
                                pos, a_logps, a_lengths, weights=w, vft_weight=0.5,
                                constraint="boundary")
  expected, _ = _numpy_aft(logps[:2], lengths[:2], mask[:2], pos[:2], a_logps[:2],
                           a_lengths[:2], None, "boundary", 0.5, 0.5)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(m["loss/vft"], -a_logps[:2].sum() / a_lengths[:2].sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(g_answer, -0.5 * w / a_lengths[:2].sum(), rtol=1e-6)
  # Metrics against a direct computation over the two real rows.
  s = logps[:2] / lengths[:2]
  p, n = mask[:2] & pos[:2], mask[:2] & ~pos[:2]
  np.testing.assert_allclose(m["scores/pos_mean"], s[p].mean(), rtol=1e-6)
  np.testing.assert_allclose(m["scores/neg_mean"], s[n].mean(), rtol=1e-6)
  margins = [s[b][p[b]].min() - s[b][n[b]].max() for b in range(2)]
  np.testing.assert_allclose(m["scores/margin"], np.mean(margins), rtol=1e-6)
  pairs = [(s[b][i] > s[b][j]) for b in range(2) for i in np.flatnonzero(p[b])
           for j in np.flatnonzero(n[b])]
  np.testing.assert_allclose(m["scores/pair_accuracy"], np.mean(pairs), rtol=1e-6)
  below = [s[b][j] < s[b][p[b]].min() - 0.5 for b in range(2) for j in np.flatnonzero(n[b])]
  np.testing.assert_allclose(m["constraint/below_boundary_frac"], np.mean(below), rtol=1e-6)


def test_jit_equals_eager():
  logps, lengths, mask, pos, a_logps, a_lengths, ranks = _random_batch(9)
  for constraint in ["ranking"]:   # BC's code path, with ranked pairs
    eager = aft_loss(logps, lengths, mask, pos, a_logps, a_lengths, ranks,
                     constraint=constraint, boundary_margin=0.5)
    jitted = _run(logps, lengths, mask, pos, a_logps, a_lengths, ranks, vft_weight=1.0,
                  constraint=constraint)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    assert set(jitted[1]) == set(eager[1])
    for key in eager[1]:
      np.testing.assert_allclose(jitted[1][key], eager[1][key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("constraint", _VARIANTS)
def test_finite_at_extreme_inputs(constraint):
  one = np.ones((2, 4), np.float32)
  pos = np.array([[True, False, True, False]] * 2)
  ranks = np.array([[0, 1, 2, 3]] * 2)
  for logps in [np.array([[1e4, -1e4, -1e4, 1e4], [-1e4, 1e4, 0.0, 0.0]], np.float32),
                np.full((2, 4), -1e4, np.float32)]:
    loss, metrics, grads = _run(logps, one, one, pos, ranks=ranks, vft_weight=1.0,
                                boundary_margin=1e4, constraint=constraint)
    assert _all_finite(loss, *grads)


def test_bad_options_raise():
  args = _random_batch(10)
  with pytest.raises(ValueError, match="boundary_margin"):
    aft_loss(*args, constraint="boundary")
  with pytest.raises(ValueError, match="boundary_margin"):
    aft_loss(*args, constraint="ranking")
  with pytest.raises(ValueError, match="ranks"):
    aft_loss(*args[:6], constraint="ranking", boundary_margin=1.0)
  with pytest.raises(ValueError, match="constraint"):
    aft_loss(*args, constraint="hinge")
