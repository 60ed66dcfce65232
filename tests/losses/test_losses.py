"""Loss math, tested as properties (docs/losses.md, the `dpo` invariants)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses
from jaxalign.losses.dpo import dpo_loss
from jaxalign.losses.sft import sft_loss


def _numpy_dpo(c, r, rc, rr, beta, eps):
  """Independent transcription of cDPO: (1-eps) l(beta h) + eps l(-beta h)."""
  h = (c - rc) - (r - rr)
  logistic = lambda z: np.log1p(np.exp(-z))  # -log sigmoid(z)
  return np.mean((1 - eps) * logistic(beta * h) + eps * logistic(-beta * h))


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_dpo_is_log2_when_policy_equals_reference(beta):
  logps = jnp.array([-12.0, -3.5, -40.0])
  loss, metrics = dpo_loss(logps, logps, logps, logps, beta=beta)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert metrics["rewards/accuracies"] == 0.0
  assert metrics["rewards/margins"] == 0.0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_gradient_at_equality(eps):
  x = jnp.array([-5.0, -7.0])
  g_c, g_r = jax.grad(lambda c, r: dpo_loss(c, r, x, x, beta=0.1, label_smoothing=eps)[0],
                      argnums=(0, 1))(x, x)
  np.testing.assert_allclose(g_c, -0.1 * (1 - 2 * eps) / 2 / x.size, rtol=1e-6)
  np.testing.assert_allclose(g_r, +0.1 * (1 - 2 * eps) / 2 / x.size, rtol=1e-6)


def test_dpo_matches_numpy_transcription():
  rng = np.random.default_rng(0)
  c, r, rc, rr = (rng.normal(-20, 5, size=16).astype(np.float32) for _ in range(4))
  for beta, eps in [(0.1, 0.0), (0.5, 0.2), (2.0, 0.05)]:
    loss, _ = dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)
    np.testing.assert_allclose(loss, _numpy_dpo(c, r, rc, rr, beta, eps), rtol=1e-5)


def test_dpo_shift_invariance_and_jit():
  rng = np.random.default_rng(1)
  c, r, rc, rr = (jnp.asarray(rng.normal(-20, 5, size=8), jnp.float32) for _ in range(4))
  base, _ = dpo_loss(c, r, rc, rr)
  shifted, _ = dpo_loss(c + 3.0, r + 3.0, rc - 7.0, rr - 7.0)
  np.testing.assert_allclose(base, shifted, rtol=1e-5)
  jitted, _ = jax.jit(dpo_loss)(c, r, rc, rr)
  np.testing.assert_allclose(base, jitted, rtol=1e-6)


def test_dpo_monotone_and_finite_at_extremes():
  z = jnp.zeros(2)
  for m in [1e4, -1e4]:
    loss, _ = dpo_loss(z + m, z, z, z)
    grad = jax.grad(lambda c: dpo_loss(c, z, z, z)[0])(z + m)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad) <= 0)  # non-increasing in chosen log-prob


def test_dpo_weights_drop_padding_rows():
  c, r = jnp.array([-1.0, -2.0, 0.0]), jnp.array([-3.0, -1.0, 5.0])
  z = jnp.zeros(3)
  full, m_full = dpo_loss(c[:2], r[:2], z[:2], z[:2])
  padded, m_pad = dpo_loss(c, r, z, z, weights=jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(full, padded, rtol=1e-6)
  np.testing.assert_allclose(m_full["rewards/accuracies"], m_pad["rewards/accuracies"])


def test_sft_is_token_mean_nll():
  logps = jnp.array([-3.0, -8.0])
  lengths = jnp.array([1, 4])
  loss, metrics = sft_loss(logps, lengths)
  np.testing.assert_allclose(loss, 11.0 / 5.0, rtol=1e-6)
  assert metrics["tokens/scored"] == 5


def test_registry_specs():
  assert losses.get("dpo").needs_ref and losses.get("dpo").data == "pairwise"
  assert not losses.get("sft").needs_ref
  assert set(losses.get("dpo").hparam_names()) == {
      "beta", "label_smoothing", "rpo_alpha", "variant", "reference_free", "ipo_length_norm",
      "loss_weights", "ld_alpha", "use_weighting", "discopop_tau"}
  # The reference-free pairwise losses: no reference forward, no precomputed table.
  for name in ("cpo", "simpo", "orpo"):
    assert not losses.get(name).needs_ref and losses.get(name).data == "pairwise"
  assert losses.get("bco_pair").init_state is not None
  # The step computes LD-DPO's / WPO's columns only when asked for.
  dpo_spec = losses.get("dpo")
  assert dpo_spec.column_names({"beta": 0.1}) == ()
  assert dpo_spec.column_names({"ld_alpha": 0.5, "use_weighting": True}) == (
      "tail_logps", "wpo_logps")
  with pytest.raises(KeyError, match="known"):
    losses.get("nope")


def test_rpo_alpha_adds_the_chosen_token_mean_nll():
  c, r = jnp.array([-4.0, -6.0]), jnp.array([-5.0, -1.0])
  lengths = jnp.array([2, 3])
  plain, _ = dpo_loss(c, r, c, r)
  with_nll, metrics = dpo_loss(c, r, c, r, lengths, lengths, rpo_alpha=0.5)
  np.testing.assert_allclose(metrics["nll_loss"], 10.0 / 5.0, rtol=1e-6)
  np.testing.assert_allclose(with_nll, plain + 0.5 * 2.0, rtol=1e-6)
  with pytest.raises(ValueError, match="chosen_lengths"):
    dpo_loss(c, r, c, r, rpo_alpha=1.0)
