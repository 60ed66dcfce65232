"""D^2O loss (docs/losses.md, `d2o`): NumPy transcription and its invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.d2o import d2o_loss
from jaxalign.losses.dpo import dpo_loss


def _np_d2o_row(s, s_ref, neg, neg_ref, beta, alpha):
  """Eq. 3 for one prompt with its K valid samples (no padding), float64:
  -log sigmoid((beta/K) sum_i (s_i - s_ref_i) - alpha (neg - neg_ref))."""
  s, s_ref = np.float64(s), np.float64(s_ref)
  z = beta / s.size * np.sum(s - s_ref) - alpha * (np.float64(neg) - np.float64(neg_ref))
  return np.logaddexp(0.0, -z), z


def _ragged(seed, b=5, k_max=6):
  rng = np.random.default_rng(seed)
  ks = rng.integers(1, k_max + 1, size=b)
  ks[0] = k_max
  mask = np.arange(k_max)[None, :] < ks[:, None]
  g = rng.normal(-40, 10, size=(b, k_max)).astype(np.float32)
  g_ref = (g + rng.normal(0, 8, size=(b, k_max))).astype(np.float32)
  # Padded slots hold garbage, which must not matter.
  g = np.where(mask, g, np.nan).astype(np.float32)
  g_ref = np.where(mask, g_ref, 1e30).astype(np.float32)
  neg = rng.normal(-50, 10, size=b).astype(np.float32)
  neg_ref = (neg + rng.normal(0, 8, size=b)).astype(np.float32)
  return g, g_ref, mask, neg, neg_ref


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.1), (0.05, 0.3), (1.0, 0.01)])
def test_matches_unpadded_numpy_transcription(beta, alpha):
  g, g_ref, mask, neg, neg_ref = _ragged(int(beta * 100 + alpha * 1000))
  loss, metrics = d2o_loss(g, g_ref, mask, neg, neg_ref, beta=beta, alpha=alpha)
  rows = [_np_d2o_row(g[i, mask[i]], g_ref[i, mask[i]], neg[i], neg_ref[i], beta, alpha)
          for i in range(len(neg))]
  np.testing.assert_allclose(loss, np.mean([r[0] for r in rows]), rtol=1e-5)
  z = np.array([r[1] for r in rows])
  self_r = np.array([beta * np.mean(np.float64(g[i, mask[i]]) - g_ref[i, mask[i]])
                     for i in range(len(neg))])
  neg_r = alpha * (np.float64(neg) - neg_ref)
  np.testing.assert_allclose(metrics["rewards/self"], self_r.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/negative"], neg_r.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/margins"], z.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/accuracies"], (z > 0).mean())
  np.testing.assert_allclose(metrics["kl/self"], self_r.mean() / beta, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["logps/self_mean"],
      np.mean([np.float64(g[i, mask[i]]).mean() for i in range(len(neg))]), rtol=1e-5)
  np.testing.assert_allclose(metrics["logps/negative"], np.float64(neg).mean(), rtol=1e-5)
  assert all(np.isfinite(np.asarray(v)) for v in metrics.values())


def test_length_norm_uses_per_token_ratios():
  g, g_ref, mask, neg, neg_ref = _ragged(1)
  rng = np.random.default_rng(2)
  lengths = rng.integers(1, 30, size=g.shape)
  neg_lengths = rng.integers(1, 30, size=neg.shape)
  loss, _ = d2o_loss(g, g_ref, mask, neg, neg_ref, lengths, neg_lengths, length_norm=True)
  want = np.mean([
      _np_d2o_row(g[i, mask[i]] / lengths[i, mask[i]], g_ref[i, mask[i]] / lengths[i, mask[i]],
                  neg[i] / neg_lengths[i], neg_ref[i] / neg_lengths[i], 0.1, 0.1)[0]
      for i in range(len(neg))])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  with pytest.raises(ValueError, match="length_norm"):
    d2o_loss(g, g_ref, mask, neg, neg_ref, length_norm=True)


def test_separate_reference_slots():
  """pi_r^- scores the samples, pi_r^+ the negative: each reference array is used
  only in its own term."""
  g, g_ref, mask, neg, neg_ref = _ragged(3)
  base, _ = d2o_loss(g, g_ref, mask, neg, neg_ref)
  # Lowering the samples' reference by 5 raises z by beta*5; lowering the
  # negative's reference by 5 lowers z by alpha*5; with alpha = beta they cancel.
  shifted, _ = d2o_loss(g, g_ref - 5.0, mask, neg, neg_ref - 5.0)
  np.testing.assert_allclose(shifted, base, rtol=1e-5)
  changed, _ = d2o_loss(g, g_ref, mask, neg, neg_ref + 5.0)
  assert changed < base   # higher negative reference => lower ratio => larger z


# ------------------------------------------------------------ invariants (f)


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.1), (0.5, 0.02)])
def test_inv1_policy_equals_reference_gives_log2(beta, alpha):
  g, _, mask, neg, _ = _ragged(4)
  g = np.where(mask, g, 0.0)
  loss, metrics = d2o_loss(g, g, mask, neg, neg, beta=beta, alpha=alpha)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_inv2_k1_equal_temperatures_is_dpo(beta):
  rng = np.random.default_rng(5)
  c, r, rc, rr = (rng.normal(-20, 6, size=7).astype(np.float32) for _ in range(4))
  loss, metrics = d2o_loss(c[:, None], rc[:, None], None, r, rr, beta=beta, alpha=beta)
  dpo, dpo_metrics = dpo_loss(c, r, rc, rr, beta=beta)
  np.testing.assert_allclose(loss, dpo, rtol=1e-6)
  np.testing.assert_allclose(metrics["rewards/margins"], dpo_metrics["rewards/margins"],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["rewards/accuracies"], dpo_metrics["rewards/accuracies"])


def test_inv3_permutation_duplication_and_masked_slots():
  g, g_ref, mask, neg, neg_ref = _ragged(6)
  base, base_m = d2o_loss(g, g_ref, mask, neg, neg_ref)
  # Permute the slots of every row (mask travels with them).
  perm = np.random.default_rng(7).permutation(g.shape[1])
  permuted, _ = d2o_loss(g[:, perm], g_ref[:, perm], mask[:, perm], neg, neg_ref)
  np.testing.assert_allclose(permuted, base, rtol=1e-6)
  # Duplicate every sample: K -> 2K, the same set.
  dup = lambda x: np.concatenate([x, x], axis=1)
  doubled, doubled_m = d2o_loss(dup(g), dup(g_ref), dup(mask), neg, neg_ref)
  np.testing.assert_allclose(doubled, base, rtol=1e-6)
  for k in base_m:
    np.testing.assert_allclose(doubled_m[k], base_m[k], rtol=1e-5, err_msg=k)
  # Extra masked slots with any values change nothing (value or gradient).
  pad = lambda x, v: np.concatenate([x, np.full((x.shape[0], 3), v, x.dtype)], 1)
  more_mask = pad(mask, False)
  padded, _ = d2o_loss(pad(g, 1e4), pad(g_ref, -np.inf), more_mask, neg, neg_ref)
  np.testing.assert_allclose(padded, base, rtol=1e-6)
  grad = jax.grad(lambda x: d2o_loss(x, pad(g_ref, -np.inf), more_mask, neg, neg_ref)[0])(
      jnp.asarray(pad(g, np.nan)))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[~more_mask], 0.0)


def test_inv4_gradients_push_samples_up_and_negative_down():
  beta, alpha = 0.2, 0.05
  g, g_ref, mask, neg, neg_ref = _ragged(8)
  grad_g, grad_n = jax.grad(
      lambda x, y: d2o_loss(x, g_ref, mask, y, neg_ref, beta=beta, alpha=alpha)[0],
      argnums=(0, 1))(jnp.asarray(g), jnp.asarray(neg))
  b = len(neg)
  k = mask.sum(1)
  z = np.array([_np_d2o_row(g[i, mask[i]], g_ref[i, mask[i]], neg[i], neg_ref[i],
                            beta, alpha)[1] for i in range(b)])
  sig_neg_z = 1 / (1 + np.exp(z))
  want_g = np.where(mask, -(beta / k * sig_neg_z)[:, None] / b, 0.0)
  np.testing.assert_allclose(grad_g, want_g, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(grad_n, alpha * sig_neg_z / b, rtol=1e-5)
  assert np.all(np.asarray(grad_g)[mask] < 0) and np.all(np.asarray(grad_n) > 0)
  # References get nothing.
  g_ref_grad = jax.grad(lambda x: d2o_loss(g, x, mask, neg, neg_ref)[0])(jnp.asarray(g_ref))
  np.testing.assert_array_equal(g_ref_grad, 0.0)


def test_inv4_gradient_at_init_is_beta_over_2k_and_alpha_over_2():
  beta, alpha = 0.1, 0.3
  g = jnp.full((3, 4), -10.0)
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  neg = jnp.full((3,), -12.0)
  grad_g, grad_n = jax.grad(lambda x, y: d2o_loss(x, g, mask, y, neg, beta=beta,
                                                  alpha=alpha)[0], argnums=(0, 1))(g, neg)
  k = np.array([4.0, 2.0, 1.0])
  np.testing.assert_allclose(grad_g, np.where(mask, -(beta / (2 * k))[:, None] / 3, 0.0),
                             rtol=1e-6)
  np.testing.assert_allclose(grad_n, alpha / 2 / 3, rtol=1e-6)


# ------------------------------------------------------------ edge cases


def test_weights_and_rows_without_samples_are_left_out():
  g, g_ref, mask, neg, neg_ref = _ragged(9)
  base, base_m = d2o_loss(g, g_ref, mask, neg, neg_ref)
  extra = lambda x, v: np.concatenate([x, np.full((2,) + x.shape[1:], v, x.dtype)])
  # Row 1: padding by weight; row 2: no valid sample at all (mask all False).
  mask2 = extra(mask, False)
  mask2[-2, :2] = True
  weights = np.r_[np.ones(len(neg)), 0.0, 1.0]
  loss, metrics = d2o_loss(extra(g, 3.0), extra(g_ref, -3.0), mask2, extra(neg, 100.0),
                           extra(neg_ref, 0.0), weights=weights)
  np.testing.assert_allclose(loss, base, rtol=1e-6)
  for k in base_m:
    np.testing.assert_allclose(metrics[k], base_m[k], rtol=1e-5, err_msg=k)


def test_jit_equals_eager():
  g, g_ref, mask, neg, neg_ref = _ragged(10)
  eager = d2o_loss(g, g_ref, mask, neg, neg_ref, beta=0.3, alpha=0.2)
  jitted = jax.jit(functools.partial(d2o_loss, beta=0.3, alpha=0.2))(g, g_ref, mask, neg,
                                                                      neg_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, jitted)


@pytest.mark.parametrize("m", [1e4, -1e4])
def test_finite_at_extreme_inputs(m):
  g = jnp.full((2, 3), m)
  z = jnp.zeros((2, 3))
  neg = jnp.array([-m, m])
  f = lambda x, y: d2o_loss(x, z, None, y, jnp.zeros(2), beta=1.0, alpha=1.0)
  loss, metrics = f(g, neg)
  grads = jax.grad(lambda x, y: f(x, y)[0], argnums=(0, 1))(g, neg)
  assert np.isfinite(loss) and all(np.all(np.isfinite(x)) for x in grads)
  assert all(np.isfinite(np.asarray(v)) for v in metrics.values())
