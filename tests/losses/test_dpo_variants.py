"""DPO variants and LN-DPO, tested as properties (docs/losses.md: the `dpo` and `ln_dpo`
invariants, "Compared with which TRL").

Expected numbers are derived from the `dpo` and `ln_dpo` formulas of docs/losses.md; each
test says which invariant it checks. The NumPy transcriptions are written from
those formulas (float64, np.logaddexp), independently of the JAX code.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.dpo import dpo_loss
from jaxalign.losses.ln_dpo import ln_dpo_loss

LOG2 = float(np.log(2.0))
# (variant, label_smoothing, ipo_length_norm): every distinct per-pair form.
CASES = [
    ("sigmoid", 0.0, True),
    ("sigmoid", 0.1, True),   # cDPO
    ("robust", 0.2, True),
    ("hinge", 0.0, True),
    ("ipo", 0.0, True),       # per-token (TRL)
    ("ipo", 0.0, False),      # summed (DPO authors' code)
]
CASE_IDS = [f"{v}-eps{e}-norm{n}" for v, e, n in CASES]


def _loss_fn(variant, eps, norm, **kw):
  return functools.partial(dpo_loss, variant=variant, label_smoothing=eps,
                           ipo_length_norm=norm, **kw)


def _monotone_below(variant, eps, beta):
  """Upper end of the margin range where Inv. 3 holds (from the minimisers of Inv. 5).

  docs/losses.md, `dpo` invariant 3, exempts IPO above 1/(2 tau); cDPO (eps > 0) likewise has a
  minimiser h* = log((1-eps)/eps)/beta (Inv. 5), so it rises again above h*.
  """
  if variant == "ipo":
    return 1.0 / (2.0 * beta)
  if variant == "sigmoid" and eps > 0:
    return float(np.log((1 - eps) / eps) / beta)
  return np.inf


def _random_batch(seed, b=8, lengths=True):
  rng = np.random.default_rng(seed)
  arrays = [jnp.asarray(rng.normal(-20.0, 5.0, size=b), jnp.float32) for _ in range(4)]
  lc = jnp.asarray(rng.integers(1, 17, size=b), jnp.int32)
  lr = jnp.asarray(rng.integers(1, 17, size=b), jnp.int32)
  return (*arrays, lc, lr) if lengths else tuple(arrays)


# ---------------------------------------------------------------- NumPy transcriptions


def _np_logistic(z):
  return np.logaddexp(0.0, -z)  # l(z) = -log sigmoid(z) = log(1 + e^{-z})


def _np_dpo_family(c, r, rc, rr, lc, lr, *, beta, eps, variant, reference_free, norm):
  """The `dpo` formulas of docs/losses.md, one per variant, mean over the batch."""
  c, r, rc, rr, lc, lr = (np.asarray(a, np.float64) for a in (c, r, rc, rr, lc, lr))
  if reference_free:
    rc, rr = np.zeros_like(rc), np.zeros_like(rr)
  h = (c - rc) - (r - rr)
  if variant == "sigmoid":
    per = (1 - eps) * _np_logistic(beta * h) + eps * _np_logistic(-beta * h)
  elif variant == "robust":
    per = ((1 - eps) * _np_logistic(beta * h) - eps * _np_logistic(-beta * h)) / (1 - 2 * eps)
  elif variant == "hinge":
    per = np.maximum(0.0, 1.0 - beta * h)
  elif variant == "ipo":
    if norm:  # TRL: per-token-mean log-ratios
      h = (c - rc) / lc - (r - rr) / lr
    per = (h - 1.0 / (2.0 * beta)) ** 2
  return per.mean()


def _np_ln_dpo(c, r, rc, rr, lc, lr, *, beta):
  """The `ln_dpo` formula of docs/losses.md == TRL sigmoid_norm: l(beta (rho_w/|y_w| - rho_l/|y_l|))."""
  c, r, rc, rr, lc, lr = (np.asarray(a, np.float64) for a in (c, r, rc, rr, lc, lr))
  return _np_logistic(beta * ((c - rc) / lc - (r - rr) / lr)).mean()


@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize("variant,eps,norm", CASES, ids=CASE_IDS)
def test_dpo_family_matches_numpy_transcription(variant, eps, norm, reference_free):
  batch = _random_batch(0)
  for beta in (0.05, 0.5):
    loss, _ = dpo_loss(*batch, beta=beta, label_smoothing=eps, variant=variant,
                       ipo_length_norm=norm, reference_free=reference_free)
    expected = _np_dpo_family(*batch, beta=beta, eps=eps, variant=variant,
                              reference_free=reference_free, norm=norm)
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------- §1(f) invariants


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("variant,eps,norm", CASES + [("robust", 0.45, True)],
                         ids=CASE_IDS + ["robust-eps0.45"])
def test_value_when_policy_equals_reference(variant, eps, norm, beta):
  """Inv. 1 and 7: log 2 (sigmoid, cDPO, robust), 1 (hinge), 1/(4 tau^2) (IPO)."""
  logps = jnp.array([-12.0, -3.5, -40.0])
  lengths = jnp.array([3, 1, 9])
  loss, metrics = dpo_loss(logps, logps, logps, logps, lengths, lengths + 2, beta=beta,
                           label_smoothing=eps, variant=variant, ipo_length_norm=norm)
  expected = {"sigmoid": LOG2, "robust": LOG2, "hinge": 1.0,
              "ipo": 1.0 / (4.0 * beta**2)}[variant]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics["rewards/accuracies"] == 0.0  # strict >
  assert metrics["rewards/margins"] == 0.0


@pytest.mark.parametrize("variant,eps,expected_over_beta", [
    ("sigmoid", 0.0, 0.5),                     # -beta/2
    ("sigmoid", 0.1, (1 - 2 * 0.1) / 2),       # cDPO: -beta (1-2eps)/2
    ("robust", 0.0, 0.5),
    ("robust", 0.2, 1 / (2 * (1 - 2 * 0.2))),  # robust: -beta / (2 (1-2eps))
    ("hinge", 0.0, 1.0),                       # d relu(1 - beta h)/dh = -beta at h = 0
])
def test_gradient_at_zero_margin(variant, eps, expected_over_beta):
  """Inv. 2: d loss / d S(y_w) = -g, d loss / d S(y_l) = +g at h = 0 (per pair, / B)."""
  beta = 0.3
  x = jnp.array([-5.0, -7.0, -1.0, -30.0])
  loss_fn = lambda c, r: dpo_loss(c, r, x, x, beta=beta, label_smoothing=eps,
                                  variant=variant)[0]
  g_c, g_r = jax.grad(loss_fn, argnums=(0, 1))(x, x)
  g = beta * expected_over_beta / x.size
  np.testing.assert_allclose(g_c, -g, rtol=1e-6)
  np.testing.assert_allclose(g_r, +g, rtol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_ipo_gradient_at_zero_margin(norm):
  """Derived from §1(b): d (h - 1/(2tau))^2 / dh = -1/tau at h = 0, times dh/dS = 1/|y|."""
  tau = 0.25
  x = jnp.array([-5.0, -7.0])
  lc, lr = jnp.array([2, 5]), jnp.array([4, 1])
  loss_fn = lambda c, r: dpo_loss(c, r, x, x, lc, lr, beta=tau, variant="ipo",
                                  ipo_length_norm=norm)[0]
  g_c, g_r = jax.grad(loss_fn, argnums=(0, 1))(x, x)
  scale_c = 1.0 / np.asarray(lc) if norm else 1.0
  scale_r = 1.0 / np.asarray(lr) if norm else 1.0
  np.testing.assert_allclose(g_c, -scale_c / tau / x.size, rtol=1e-6)
  np.testing.assert_allclose(g_r, +scale_r / tau / x.size, rtol=1e-6)


@pytest.mark.parametrize("variant,eps,norm", CASES, ids=CASE_IDS)
def test_monotone_in_chosen_and_rejected(variant, eps, norm):
  """Inv. 3: non-increasing in S(y_w), non-decreasing in S(y_l) (IPO while h < 1/(2tau),
  cDPO while h < h*)."""
  beta = 0.1  # IPO optimum at h = 5, cDPO(0.1) at h = 10 log 9 ~ 22
  hi = min(60.0, _monotone_below(variant, eps, beta) - 0.1)
  grid = jnp.linspace(-60.0, hi, 97)
  zero, one = jnp.zeros(1), jnp.ones(1, jnp.int32)
  per = lambda c, r: dpo_loss(c[None], r[None], zero, zero, one, one, beta=beta,
                              label_smoothing=eps, variant=variant,
                              ipo_length_norm=norm)[0]
  in_chosen = jax.vmap(lambda s: per(s, jnp.float32(0.0)))(grid)
  in_rejected = jax.vmap(lambda s: per(jnp.float32(0.0), -s))(grid)  # h = s again
  assert np.all(np.diff(np.asarray(in_chosen)) <= 1e-6)
  assert np.all(np.diff(np.asarray(in_rejected)) <= 1e-6)
  # Gradient signs at random pairs, with h < 5 for IPO and h < 20 < h* for cDPO.
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.uniform(-10.0, 2.0, size=8), jnp.float32)  # rho_w (per token for IPO)
  b = jnp.asarray(rng.uniform(-2.0, 2.0, size=8), jnp.float32)   # rho_l; a - b < 4
  lc = jnp.asarray(rng.integers(1, 17, size=8), jnp.int32)
  lr = jnp.asarray(rng.integers(1, 17, size=8), jnp.int32)
  c, r = (a * lc, b * lr) if (variant == "ipo" and norm) else (a * 5.0, b * 5.0)
  if variant == "ipo" and not norm:
    c, r = a, b
  rc = rr = jnp.zeros_like(c)
  g_c, g_r = jax.grad(lambda c_, r_: dpo_loss(c_, r_, rc, rr, lc, lr, beta=beta,
                                              label_smoothing=eps, variant=variant,
                                              ipo_length_norm=norm)[0],
                      argnums=(0, 1))(c, r)
  assert np.all(np.asarray(g_c) <= 0) and np.all(np.asarray(g_r) >= 0)


def test_zero_smoothing_reduces_to_sigmoid():
  """Inv. 4: eps = 0 makes cDPO and robust equal to sigmoid DPO (loss and gradient)."""
  c, r, rc, rr = _random_batch(4, lengths=False)
  ref_fn = lambda c_: dpo_loss(c_, r, rc, rr, beta=0.2)[0]
  for variant in ("sigmoid", "robust"):
    fn = lambda c_, v=variant: dpo_loss(c_, r, rc, rr, beta=0.2, variant=v,
                                        label_smoothing=0.0)[0]
    np.testing.assert_allclose(fn(c), ref_fn(c), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(fn)(c), jax.grad(ref_fn)(c), rtol=1e-6)


@pytest.mark.parametrize("variant,eps,norm", CASES, ids=CASE_IDS)
def test_reference_free_ignores_the_reference(variant, eps, norm):
  """Inv. 4: reference_free gives the same loss whatever S_ref is (= S_ref = 0)."""
  c, r, rc, rr, lc, lr = _random_batch(5)
  fn = _loss_fn(variant, eps, norm, beta=0.1)
  loss_a, m_a = fn(c, r, rc, rr, lc, lr, reference_free=True)
  loss_b, m_b = fn(c, r, rc * 3.0 - 7.0, -rr, lc, lr, reference_free=True)
  loss_0, m_0 = fn(c, r, jnp.zeros_like(rc), jnp.zeros_like(rr), lc, lr)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  np.testing.assert_allclose(loss_a, loss_0, rtol=1e-6)
  for k in m_a:
    np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(m_a[k], m_0[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_cdpo_minimiser(eps):
  """Inv. 5: cDPO is minimised at h* = log((1-eps)/eps) / beta."""
  beta = 0.5
  h_star = np.log((1 - eps) / eps) / beta
  z = jnp.zeros(1)
  fn = lambda h: dpo_loss(h, z, z, z, beta=beta, label_smoothing=eps)[0]
  h = jnp.array([h_star], jnp.float32)
  np.testing.assert_allclose(jax.grad(fn)(h), 0.0, atol=1e-6)
  assert fn(h) < fn(h - 0.5) and fn(h) < fn(h + 0.5)


@pytest.mark.parametrize("norm", [True, False])
def test_ipo_minimiser(norm):
  """Inv. 5: IPO is minimised (loss 0, gradient 0) at h* = 1/(2 tau)."""
  tau = 0.1
  lc, lr = jnp.array([4, 3]), jnp.array([2, 7])
  per_token_ratio_l = jnp.array([-0.5, 1.0])
  if norm:  # per-token log-ratios differ by exactly 1/(2 tau)
    c = lc * (per_token_ratio_l + 1 / (2 * tau))
    r = lr * per_token_ratio_l
  else:
    c = per_token_ratio_l + 1 / (2 * tau)
    r = per_token_ratio_l
  c, r = c.astype(jnp.float32), r.astype(jnp.float32)
  z = jnp.zeros(2)
  fn = lambda c_: dpo_loss(c_, r, z, z, lc, lr, beta=tau, variant="ipo",
                           ipo_length_norm=norm)[0]
  np.testing.assert_allclose(fn(c), 0.0, atol=1e-9)
  np.testing.assert_allclose(jax.grad(fn)(c), 0.0, atol=1e-6)
  assert fn(c + 0.5) > 0 and fn(c - 0.5) > 0


def test_robust_is_unbounded_below():
  """Inv. 5: robust DPO with eps > 0 is ~ -eps beta h / (1-2eps) for large h (negative)."""
  eps, beta = 0.2, 0.1
  z = jnp.zeros(1)
  fn = lambda h: dpo_loss(jnp.full((1,), h), z, z, z, beta=beta,
                          label_smoothing=eps, variant="robust")[0]
  slope = -eps * beta / (1 - 2 * eps)
  for h in (1e3, 2e3, 1e4):
    np.testing.assert_allclose(fn(h), slope * h, rtol=1e-5)  # l(beta h) ~ e^-100 here
  assert fn(2e3) < fn(1e3) < 0


@pytest.mark.parametrize("variant,eps,norm", CASES, ids=CASE_IDS)
def test_shift_invariance(variant, eps, norm):
  """Inv. 6: a constant added to both policy (or both reference) values changes nothing.

  For per-token IPO the margin is rho_w/|y_w| - rho_l/|y_l|, so the invariant
  holds for a constant per token (k * |y| added to each side), which is what a
  constant added to both S means once each side is divided by its length.
  """
  c, r, rc, rr, lc, lr = _random_batch(6)
  fn = _loss_fn(variant, eps, norm, beta=0.1)
  base, _ = fn(c, r, rc, rr, lc, lr)
  if variant == "ipo" and norm:
    sc, sr = 0.75 * lc, 0.75 * lr
  else:
    sc = sr = 3.0
  np.testing.assert_allclose(fn(c + sc, r + sr, rc, rr, lc, lr)[0], base, rtol=1e-5)
  np.testing.assert_allclose(fn(c, r, rc - sc, rr - sr, lc, lr)[0], base, rtol=1e-5)


@pytest.mark.parametrize("variant,eps,norm", CASES, ids=CASE_IDS)
def test_jit_equals_eager(variant, eps, norm):
  batch = _random_batch(7)
  # reference_free is a Python branch ahead of any array op; one case covers it.
  fn = _loss_fn(variant, eps, norm, beta=0.1, reference_free=variant == "hinge")
  loss, metrics = fn(*batch)
  loss_j, metrics_j = jax.jit(fn)(*batch)
  np.testing.assert_allclose(loss_j, loss, rtol=1e-5)  # XLA may fuse/reorder sums
  assert loss_j.dtype == jnp.float32
  for k in metrics:
    np.testing.assert_allclose(metrics_j[k], metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("variant,eps,norm", CASES, ids=CASE_IDS)
def test_finite_at_extreme_margins(variant, eps, norm):
  """Value and gradients finite at margins of +-1e4; gradient signs where Inv. 3 applies."""
  z, ones = jnp.zeros(2), jnp.ones(2, jnp.int32)
  fn = lambda c, r: _loss_fn(variant, eps, norm, beta=0.1)(c, r, z, z, ones, ones)[0]
  for m in (1e4, -1e4):
    c = z + m
    loss = fn(c, z)
    g_c, g_r = jax.grad(fn, argnums=(0, 1))(c, z)
    assert np.isfinite(loss) and np.all(np.isfinite(g_c)) and np.all(np.isfinite(g_r))
    if m < _monotone_below(variant, eps, 0.1):
      assert np.all(np.asarray(g_c) <= 0) and np.all(np.asarray(g_r) >= 0)


@pytest.mark.parametrize("variant,eps,norm", CASES, ids=CASE_IDS)
def test_weights_drop_padding_rows(variant, eps, norm):
  """Padding rows (weight 0, zero log-probs and zero lengths) change no output."""
  c, r, rc, rr, lc, lr = _random_batch(8, b=3)
  pad = lambda x, v=0: jnp.concatenate([x, jnp.full((2,), v, x.dtype)])
  fn = _loss_fn(variant, eps, norm, beta=0.1, rpo_alpha=0.5)
  full, m_full = fn(c, r, rc, rr, lc, lr)
  padded, m_pad = fn(pad(c), pad(r), pad(rc), pad(rr), pad(lc), pad(lr),
                     weights=jnp.array([1.0, 1.0, 1.0, 0.0, 0.0]))
  np.testing.assert_allclose(padded, full, rtol=1e-6)
  for k in m_full:
    np.testing.assert_allclose(m_pad[k], m_full[k], rtol=1e-6, err_msg=k)


def test_ipo_metrics_are_sum_based():
  """rewards/* are beta * rho on sums for every variant (TRL main), IPO included."""
  c, r, rc, rr, lc, lr = _random_batch(9)
  _, m_sig = dpo_loss(c, r, rc, rr, lc, lr, beta=0.1)
  _, m_ipo = dpo_loss(c, r, rc, rr, lc, lr, beta=0.1, variant="ipo")
  for k in m_sig:
    np.testing.assert_allclose(m_ipo[k], m_sig[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(m_ipo["rewards/chosen"], 0.1 * np.mean(c - rc), rtol=1e-5)


def test_invalid_settings_raise_at_trace_time():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="unknown DPO variant"):
    dpo_loss(x, x, x, x, variant="sppo")
  with pytest.raises(ValueError, match="unknown DPO variant"):
    jax.jit(functools.partial(dpo_loss, variant="simpo"))(x, x, x, x)
  with pytest.raises(ValueError, match="0.5"):
    dpo_loss(x, x, x, x, variant="robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="lengths"):
    dpo_loss(x, x, x, x, variant="ipo")
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo_loss(x, x, x, x, x, x, variant="hinge", label_smoothing=0.1)
  # Summed IPO needs no lengths.
  loss, _ = dpo_loss(x, x, x, x, variant="ipo", ipo_length_norm=False, beta=0.5)
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


# ---------------------------------------------------------------- LN-DPO, §2(f)


def test_ln_dpo_matches_numpy_transcription():
  """`ln_dpo` invariant 4: docs/losses.md's formula is TRL >= 1.4.0 loss_type="sigmoid_norm"."""
  batch = _random_batch(10)
  for beta in (0.5, 2.0, 8.0):
    loss, _ = ln_dpo_loss(*batch, beta=beta)
    np.testing.assert_allclose(loss, _np_ln_dpo(*batch, beta=beta), rtol=2e-5)


def test_ln_dpo_with_unit_lengths_is_sigmoid_dpo():
  c, r, rc, rr = _random_batch(11, lengths=False)
  ones = jnp.ones_like(c, jnp.int32)
  ln = lambda c_: ln_dpo_loss(c_, r, rc, rr, ones, ones, beta=0.3)
  dpo = lambda c_: dpo_loss(c_, r, rc, rr, beta=0.3)
  (l_ln, m_ln), (l_dpo, m_dpo) = ln(c), dpo(c)
  np.testing.assert_allclose(l_ln, l_dpo, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: ln(x)[0])(c), jax.grad(lambda x: dpo(x)[0])(c),
                             rtol=1e-6)
  for k in m_dpo:
    np.testing.assert_allclose(m_ln[k], m_dpo[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("length", [1, 7, 200])
def test_ln_dpo_equal_lengths_is_dpo_at_beta_over_length(length):
  """Inv. 1: |y_w| = |y_l| = L gives L_LN-DPO(beta) = L_DPO(beta / L), value and gradient."""
  beta = 4.0
  c, r, rc, rr = _random_batch(12, lengths=False)
  lengths = jnp.full(c.shape, length, jnp.int32)
  ln = lambda c_, r_: ln_dpo_loss(c_, r_, rc, rr, lengths, lengths, beta=beta)[0]
  dpo = lambda c_, r_: dpo_loss(c_, r_, rc, rr, beta=beta / length)[0]
  np.testing.assert_allclose(ln(c, r), dpo(c, r), rtol=1e-5)
  for g_ln, g_dpo in zip(jax.grad(ln, argnums=(0, 1))(c, r), jax.grad(dpo, argnums=(0, 1))(c, r)):
    np.testing.assert_allclose(g_ln, g_dpo, rtol=1e-5, atol=1e-9)


def test_ln_dpo_at_init():
  """Inv. 2: log 2 at policy = reference; gradient -beta/(2|y_w|), +beta/(2|y_l|) per pair."""
  beta = 2.0
  x = jnp.array([-12.0, -3.5, -40.0])
  lc, lr = jnp.array([3, 1, 9]), jnp.array([5, 2, 1])
  fn = lambda c, r: ln_dpo_loss(c, r, x, x, lc, lr, beta=beta)
  loss, metrics = fn(x, x)
  np.testing.assert_allclose(loss, LOG2, rtol=1e-6)
  assert metrics["rewards/accuracies"] == 0.0 and metrics["rewards/margins"] == 0.0
  g_c, g_r = jax.grad(lambda c, r: fn(c, r)[0], argnums=(0, 1))(x, x)
  np.testing.assert_allclose(g_c, -beta / (2 * np.asarray(lc)) / x.size, rtol=1e-6)
  np.testing.assert_allclose(g_r, +beta / (2 * np.asarray(lr)) / x.size, rtol=1e-6)


def test_ln_dpo_length_invariance():
  """Inv. 3: doubling a response's length at the same per-token log-ratio keeps the loss;
  sum-form DPO doubles that side's contribution instead."""
  beta = 1.0
  z = jnp.zeros(3)
  per_token_w = jnp.array([-0.2, 0.1, 0.3])   # rho(y_w)/|y_w|
  per_token_l = jnp.array([-0.4, 0.2, -0.1])  # rho(y_l)/|y_l|
  lc, lr = jnp.array([5, 12, 3]), jnp.array([4, 6, 9])
  def losses(lc_, lr_):
    c, r = per_token_w * lc_, per_token_l * lr_
    return (ln_dpo_loss(c, r, z, z, lc_, lr_, beta=beta)[0],
            dpo_loss(c, r, z, z, beta=beta)[0])
  ln_base, dpo_base = losses(lc, lr)
  for lc2, lr2 in [(2 * lc, lr), (lc, 2 * lr), (2 * lc, 2 * lr)]:
    ln2, dpo2 = losses(lc2, lr2)
    np.testing.assert_allclose(ln2, ln_base, rtol=1e-6)
    assert not np.isclose(dpo2, dpo_base, rtol=1e-3)


def test_ln_dpo_shift_invariance_per_token():
  """A constant per token added to both sides (k |y| to each S) changes nothing."""
  c, r, rc, rr, lc, lr = _random_batch(13)
  base, _ = ln_dpo_loss(c, r, rc, rr, lc, lr, beta=2.0)
  shifted, _ = ln_dpo_loss(c + 0.5 * lc, r + 0.5 * lr, rc - 1.5 * lc, rr - 1.5 * lr,
                           lc, lr, beta=2.0)
  np.testing.assert_allclose(shifted, base, rtol=1e-5)


def test_ln_dpo_metrics():
  """§2(e): rewards/* in sum form, rewards_per_token/* what the loss sees, length/*."""
  c, r, rc, rr, lc, lr = _random_batch(14)
  beta = 2.0
  _, m = ln_dpo_loss(c, r, rc, rr, lc, lr, beta=beta)
  _, m_dpo = dpo_loss(c, r, rc, rr, beta=beta)
  for k in m_dpo:
    np.testing.assert_allclose(m[k], m_dpo[k], rtol=1e-6, err_msg=k)
  pt_c = beta * (np.asarray(c) - np.asarray(rc)) / np.asarray(lc)
  pt_r = beta * (np.asarray(r) - np.asarray(rr)) / np.asarray(lr)
  np.testing.assert_allclose(m["rewards_per_token/chosen"], pt_c.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rewards_per_token/rejected"], pt_r.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rewards_per_token/margins"], (pt_c - pt_r).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["length/chosen"], np.mean(lc), rtol=1e-6)
  np.testing.assert_allclose(m["length/rejected"], np.mean(lr), rtol=1e-6)


def test_ln_dpo_jit_finite_weights_monotone():
  c, r, rc, rr, lc, lr = _random_batch(15, b=4)
  fn = functools.partial(ln_dpo_loss, beta=2.0)
  loss, metrics = fn(c, r, rc, rr, lc, lr)
  loss_j, metrics_j = jax.jit(fn)(c, r, rc, rr, lc, lr)
  np.testing.assert_allclose(loss_j, loss, rtol=1e-5)
  for k in metrics:
    np.testing.assert_allclose(metrics_j[k], metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Padding rows (zero lengths are clamped to 1, so they stay finite) drop out.
  pad = lambda x: jnp.concatenate([x, jnp.zeros((2,), x.dtype)])
  padded, m_pad = fn(pad(c), pad(r), pad(rc), pad(rr), pad(lc), pad(lr),
                     weights=jnp.array([1.0] * 4 + [0.0] * 2))
  np.testing.assert_allclose(padded, loss, rtol=1e-6)
  for k in metrics:
    np.testing.assert_allclose(m_pad[k], metrics[k], rtol=1e-6, err_msg=k)
  # Finite value and gradient at margins +-1e4, gradient signs as DPO.
  z, ones = jnp.zeros(2), jnp.ones(2, jnp.int32)
  per = lambda c_, r_: fn(c_, r_, z, z, ones, ones)[0]
  for m in (1e4, -1e4):
    value = per(z + m, z)
    g_c, g_r = jax.grad(per, argnums=(0, 1))(z + m, z)
    assert np.isfinite(value) and np.all(np.isfinite(g_c)) and np.all(np.isfinite(g_r))
    assert np.all(np.asarray(g_c) <= 0) and np.all(np.asarray(g_r) >= 0)


def test_ln_dpo_beta_is_required():
  x = jnp.zeros(2)
  with pytest.raises(TypeError, match="beta"):
    ln_dpo_loss(x, x, x, x, x, x)


def test_float64_inputs_keep_near_zero_losses_exact():
  """Log-ratios are taken before the float32 cast: float64 sequence log-probs of about
  -2500 (long responses) with DPO margins of 12 to 16 give per-example losses of 1e-7 to
  1e-5 that match a float64 transcription at rtol 1e-5. Casting first rounds each
  log-prob by up to 1.2e-4 (float32's spacing at 2500), i.e. ~1e-4 relative on the loss."""
  from jaxalign.losses.bco import bco_pair_loss
  rng = np.random.default_rng(11)
  n, beta = 6, 1.0
  ref_c = -2500.0 - rng.uniform(0, 1, n) * np.pi
  ref_r = -2400.0 - rng.uniform(0, 1, n) * np.e
  h_target = rng.uniform(12.0, 16.0, n)
  pol_c = ref_c + 0.5 * h_target
  pol_r = ref_r - 0.5 * h_target
  h = (pol_c - ref_c) - (pol_r - ref_r)
  expected = np.log1p(np.exp(-beta * h))                      # float64, 1e-7 .. 1e-5
  onehot = np.eye(n, dtype=np.float32)
  got = [float(dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta,
                        weights=jnp.asarray(onehot[i]))[0]) for i in range(n)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  f32 = [jnp.asarray(v, jnp.float32) for v in (pol_c, pol_r, ref_c, ref_r)]
  cast_first = [float(dpo_loss(*f32, beta=beta, weights=jnp.asarray(onehot[i]))[0])
                for i in range(n)]
  assert np.max(np.abs(np.asarray(cast_first) / expected - 1.0)) > 2e-5  # the audit finding
  # The same rule in paired BCO: rewards from float64 log-ratios.
  loss, _, _ = bco_pair_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
  rc, rr = 0.1 * (pol_c - ref_c), 0.1 * (pol_r - ref_r)
  np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-rc)) + np.log1p(np.exp(rr))),
                             rtol=1e-5)


# --- float64 inputs: the precision they carry survives to the float32 loss ---------------
# Each test runs twice: NumPy float64 inputs without JAX's x64 mode (a researcher
# calling the loss on host arrays) and JAX float64 arrays with x64 enabled.
_X64_MODES = ["numpy", "x64"]


def _call_f64(mode, fn, *arrays, **kw):
  if mode == "numpy":
    return fn(*[np.asarray(a, np.float64) for a in arrays], **kw)
  with jax.enable_x64(True):
    out = fn(*[jnp.asarray(a, jnp.float64) for a in arrays], **kw)
    return jax.tree.map(lambda v: np.asarray(v, np.float64), out)


@pytest.mark.parametrize("mode", _X64_MODES)
def test_apo_small_losses_match_float64(mode):
  """APO-zero's 1 - sigma(r_w) and APO-down's 1 - sigma(z) near 0 (losses of 1e-6 to
  1e-5): sigma(-x) keeps them to float32 rounding; 1 - sigma(x) in float32 was off by
  up to ~1e-2 relative (issue 30)."""
  beta = 0.1
  rho = np.asarray([110.0, 120.0, 125.0, 130.0])              # r = 11 .. 13
  ref_c, ref_r = np.asarray([-200.0, -90.5, -150.25, -60.0]), np.asarray([-80.0, -300.0, -99.0, -45.5])
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  # apo_zero: r_w = beta rho, r_l = -beta rho.
  c, r = ref_c + rho, ref_r - rho
  loss = _call_f64(mode, functools.partial(dpo_loss, variant="apo_zero", beta=beta),
                   c, r, ref_c, ref_r)[0]
  want = np.mean(sig(-beta * rho) + sig(-beta * rho))
  np.testing.assert_allclose(float(loss), want, rtol=2e-6)
  # apo_down: r_w = -beta rho (small sigma(r_w)), z = beta rho (small 1 - sigma(z)).
  c, r = ref_c - rho, ref_r - 2.0 * rho
  loss = _call_f64(mode, functools.partial(dpo_loss, variant="apo_down", beta=beta),
                   c, r, ref_c, ref_r)[0]
  want = np.mean(sig(-beta * rho) + (1.0 - sig(beta * rho)))
  np.testing.assert_allclose(float(loss), want, rtol=2e-6)


@pytest.mark.parametrize("variant", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("mode", _X64_MODES)
def test_aot_float64_inputs_match_float64_transcription(mode, variant):
  """AOT sorts and subtracts in the inputs' precision, then casts: log-probs of about
  -2500 whose matched differences give losses of 1e-6 to 1e-4 match float64 at rtol
  1e-5. Subtracting the float32-cast log-probs (float32 spacing 2.4e-4 at 2500) was
  off by up to ~1e-3 relative (issue 30: 3.8e-5 on its vectors)."""
  rng = np.random.default_rng(30)
  n, beta = 6, 1.0
  ref_c = -2500.0 - rng.uniform(0.0, 1.0, n) * np.pi
  ref_r = -2450.0 - rng.uniform(0.0, 1.0, n) * np.e
  gain = rng.uniform(5.0, 7.0, n)
  c, r = ref_c + gain, ref_r - gain
  if variant == "aot":
    d = np.sort(c - r) - np.sort(ref_c - ref_r)
  else:
    d = np.sort(c - ref_c) - np.sort(r - ref_r)
  want = np.mean(np.logaddexp(0.0, -beta * d))
  loss = _call_f64(mode, functools.partial(dpo_loss, variant=variant, beta=beta),
                   c, r, ref_c, ref_r)[0]
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


@pytest.mark.parametrize("mode", _X64_MODES)
def test_ld_dpo_float64_tie_stays_a_tie(mode):
  """LD-DPO with the policy equal to the reference, float64 log-probs and tails that
  float32 cannot hold: every reward is exactly 0, no pair counts as won, the loss is
  log 2. The reference tails kept float64 like the policy's (no stop_gradient cast of
  a NumPy array), so both sides round alike (issue 30: the tie flipped accuracies)."""
  rng = np.random.default_rng(7)
  n = 8
  c = -rng.uniform(30.0, 250.0, n) - 1e-9 * rng.uniform(1.0, 2.0, n)
  r = -rng.uniform(30.0, 250.0, n) - 1e-9 * rng.uniform(1.0, 2.0, n)
  tc = c * rng.uniform(0.0, 0.7, n)
  tr = r * rng.uniform(0.0, 0.7, n)
  lengths = rng.integers(5, 100, n).astype(np.float64)
  loss, metrics = _call_f64(mode, functools.partial(dpo_loss, ld_alpha=0.5, beta=0.1),
                            c, r, c, r, lengths, lengths, tc, tr, tc, tr)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert float(metrics[k]) == 0.0, (k, float(metrics[k]))
  np.testing.assert_allclose(float(loss), LOG2, rtol=1e-7)
  # Away from the tie the LD-weighted log-ratios follow float64 too.
  rc, rr = c - rng.uniform(0.0, 2.0, n), r + rng.uniform(0.0, 2.0, n)
  loss = _call_f64(mode, functools.partial(dpo_loss, ld_alpha=0.5, beta=0.1),
                   c, r, rc, rr, lengths, lengths, tc, tr, tc * 0.9, tr * 0.9)[0]
  h = ((c - 0.5 * tc) - (rc - 0.5 * 0.9 * tc)) - ((r - 0.5 * tr) - (rr - 0.5 * 0.9 * tr))
  np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0.0, -0.1 * h)), rtol=1e-6)
