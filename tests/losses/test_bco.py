"""BCO loss, running reward moments and UDM classifier (docs/losses.md, `bco`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign.losses.bco import (
    BcoState, bco_loss, bco_pair_loss, density_ratio_weights, fit_udm_classifier,
    init_bco_state, mean_pool, predict_desirable_prob, reward_batch_sums,
    udm_weights, update_bco_state)
from jaxalign.losses.dpo import dpo_loss


# ---------------------------------------------------------------- NumPy oracles


def _np_logistic(z):
  """-log sigmoid(z), float64."""
  return np.logaddexp(0.0, -np.asarray(z, np.float64))


class _NpRunningMoments:
  """Transcription of TRL RunningMoments.update (trl/experimental/bco), float64."""

  def __init__(self):
    self.mean, self.var, self.count = 0.0, 1.0, 1e-24

  def update(self, xs):
    xs = np.asarray(xs, np.float64)
    n = xs.size
    xs_mean, xs_var = xs.mean(), xs.var()
    delta = xs_mean - self.mean
    tot = self.count + n
    old_sum = self.var * self.count + delta**2 * self.count * n / tot
    self.mean += delta * n / tot
    self.var = (old_sum + xs_var * n) / tot
    self.count = tot


def _np_bco(logps, ref_logps, labels, running, beta, udm=None, update=True):
  """TRL BCOTrainer.bco_loss + nanmean, on the valid rows only (float64)."""
  logps, ref_logps = np.float64(logps), np.float64(ref_logps)
  labels = np.asarray(labels, bool)
  r = beta * (logps - ref_logps)
  r_w, r_l = r[labels], r[~labels]
  if update:
    running.update(np.concatenate([r_w, r_l]))
  delta = running.mean
  chosen = _np_logistic(r_w - delta)
  rejected = _np_logistic(-(r_l - delta))
  if udm is not None:
    w = np.clip(np.asarray(udm, np.float64)[~labels], 0.5, 10.0)
    rejected = w * rejected
  return np.concatenate([chosen, rejected]).mean(), delta, r_w, r_l


def _state_of(running):
  return BcoState(mean=jnp.float32(running.mean), var=jnp.float32(running.var),
                  count=jnp.float32(running.count))


def _batch(seed, b=8):
  rng = np.random.default_rng(seed)
  logps = rng.normal(-30.0, 8.0, size=b).astype(np.float32)
  ref = (logps + rng.normal(0.0, 6.0, size=b)).astype(np.float32)
  labels = rng.random(b) < 0.5
  labels[0], labels[1] = True, False   # both sets non-empty
  return jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(labels)


# ------------------------------------------------------- loss vs transcription


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("use_udm", [False, True])
def test_bco_matches_numpy_transcription_over_steps(beta, use_udm):
  running = _NpRunningMoments()
  state = init_bco_state()
  for step in range(3):   # delta carries over: compare after each of 3 steps
    logps, ref, labels = _batch(10 * step + int(use_udm), b=8 + step)
    udm = (jnp.asarray(np.random.default_rng(step).uniform(0.1, 20.0, logps.shape),
                       jnp.float32) if use_udm else None)
    loss, metrics, state = bco_loss(logps, ref, labels, udm, state=state, beta=beta)
    want, delta, r_w, r_l = _np_bco(logps, ref, labels, running, beta, udm)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["delta"], delta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.mean, running.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, running.var, rtol=1e-4)
    np.testing.assert_allclose(metrics["rewards/chosen"], r_w.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], r_l.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margins"], r_w.mean() - r_l.mean(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen_sum"], r_w.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/rejected"],
                               np.asarray(logps)[~np.asarray(labels)].mean(), rtol=1e-5)
    assert metrics["count/chosen"] == r_w.size and metrics["count/rejected"] == r_l.size
    assert "rewards/accuracies" not in metrics   # TRL BCO logs none
    assert ("udm/weight_mean" in metrics) == use_udm


def test_padding_rows_enter_neither_loss_nor_moments():
  logps, ref, labels = _batch(3, b=6)
  pad = lambda x, v: jnp.concatenate([x, jnp.full((3,), v, x.dtype)])
  weights = jnp.array([1.0] * 6 + [0.0] * 3)
  full, m_full, s_full = bco_loss(logps, ref, labels, state=init_bco_state())
  padded, m_pad, s_pad = bco_loss(pad(logps, 50.0), pad(ref, -50.0), pad(labels, True),
                                  state=init_bco_state(), weights=weights)
  np.testing.assert_allclose(full, padded, rtol=1e-6)
  for k in m_full:
    np.testing.assert_allclose(m_full[k], m_pad[k], rtol=1e-6, atol=1e-7, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s_full, s_pad)


# --------------------------------------------------------------- invariants (f)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_inv1_policy_equals_reference_gives_log2_and_zero_delta(beta):
  logps = jnp.array([-12.0, -3.5, -40.0, -7.0])
  labels = jnp.array([True, False, False, True])
  loss, metrics, state = bco_loss(logps, logps, labels, state=init_bco_state(), beta=beta)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert metrics["delta"] == 0.0 and state.mean == 0.0
  np.testing.assert_allclose(state.count, 4.0)


def test_inv2_paired_bce_upper_bounds_dpo_for_any_delta():
  rng = np.random.default_rng(0)
  beta = 0.1
  c, r, rc, rr = (jnp.asarray(rng.normal(-20, 15, size=64), jnp.float32) for _ in range(4))
  for delta in [-5.0, -0.3, 0.0, 0.7, 4.0]:
    state = BcoState(mean=jnp.float32(delta), var=jnp.float32(1.0), count=jnp.float32(10.0))

    def per_pair(c, r, rc, rr, state=state):
      return bco_pair_loss(c[None], r[None], rc[None], rr[None], state=state, beta=beta,
                           update_state=False)[0]

    def per_pair_unpaired(c, r, rc, rr, state=state):
      # The same pair split into one desirable and one undesirable example.
      loss, _, _ = bco_loss(jnp.stack([c, r]), jnp.stack([rc, rr]), jnp.array([True, False]),
                            state=state, beta=beta, update_state=False)
      return 2.0 * loss

    dpo = jax.vmap(lambda c, r, rc, rr: dpo_loss(c[None], r[None], rc[None], rr[None],
                                                 beta=beta)[0])(c, r, rc, rr)
    paired = jax.vmap(per_pair)(c, r, rc, rr)
    np.testing.assert_allclose(jax.vmap(per_pair_unpaired)(c, r, rc, rr), paired, rtol=1e-5)
    assert np.all(np.asarray(paired) >= np.asarray(dpo) - 1e-6)


@pytest.mark.parametrize("sizes", [(3, 5), (1, 7, 2), (6,)])
def test_inv3_delta_is_mean_of_all_rewards_however_batched(sizes):
  rng = np.random.default_rng(sum(sizes))
  rewards = rng.normal(0.4, 2.0, size=sum(sizes)).astype(np.float32)
  state = init_bco_state()
  for chunk in np.split(rewards, np.cumsum(sizes)[:-1]):
    state = update_bco_state(state, *reward_batch_sums(jnp.asarray(chunk)))
  one_shot = update_bco_state(init_bco_state(), *reward_batch_sums(jnp.asarray(rewards)))
  np.testing.assert_allclose(state.mean, rewards.astype(np.float64).mean(), rtol=1e-5)
  np.testing.assert_allclose(state.var, rewards.astype(np.float64).var(), rtol=1e-4)
  np.testing.assert_allclose(state.count, rewards.size, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), state, one_shot)


def test_inv3_two_loss_batches_equal_one_batch_of_both():
  l1, r1, y1 = _batch(5, b=5)
  l2, r2, y2 = _batch(6, b=7)
  _, _, s = bco_loss(l1, r1, y1, state=init_bco_state())
  _, _, s = bco_loss(l2, r2, y2, state=s)
  _, _, both = bco_loss(jnp.concatenate([l1, l2]), jnp.concatenate([r1, r2]),
                        jnp.concatenate([y1, y2]), state=init_bco_state())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), s, both)
  rewards = 0.1 * np.concatenate([l1 - r1, l2 - r2]).astype(np.float64)
  np.testing.assert_allclose(s.mean, rewards.mean(), rtol=1e-5)


def test_inv3_update_before_use_and_eval_does_not_update():
  logps, ref, labels = _batch(7)
  prior = BcoState(mean=jnp.float32(2.0), var=jnp.float32(0.5), count=jnp.float32(24.0))
  _, m_train, s_train = bco_loss(logps, ref, labels, state=prior)
  r = 0.1 * (np.asarray(logps, np.float64) - np.asarray(ref, np.float64))
  want = (2.0 * 24.0 + r.sum()) / (24.0 + r.size)
  np.testing.assert_allclose(m_train["delta"], want, rtol=1e-5)   # this batch included
  np.testing.assert_allclose(s_train.mean, want, rtol=1e-5)
  loss_eval, m_eval, s_eval = bco_loss(logps, ref, labels, state=prior, update_state=False)
  assert s_eval is prior and m_eval["delta"] == 2.0
  want_eval, _, _, _ = _np_bco(logps, ref, labels, _mk_running(2.0, 0.5, 24.0), 0.1,
                               update=False)
  np.testing.assert_allclose(loss_eval, want_eval, rtol=1e-5)


def _mk_running(mean, var, count):
  running = _NpRunningMoments()
  running.mean, running.var, running.count = mean, var, count
  return running


def test_inv3_empty_batch_leaves_state_unchanged():
  prior = BcoState(mean=jnp.float32(1.5), var=jnp.float32(0.3), count=jnp.float32(8.0))
  same = update_bco_state(prior, *reward_batch_sums(jnp.ones(4) * 9.0, jnp.zeros(4)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7), prior, same)
  fresh = update_bco_state(init_bco_state(), 0.0, 0.0, 0.0)
  assert all(np.isfinite(np.asarray(x)) for x in jax.tree.leaves(fresh))


def test_inv3_sharded_sums_psum_to_the_global_update():
  """Per-shard sums, psum'd inside shard_map, equal the unsharded update; under
  plain jit with a sharded batch the loss's own .sum() is already global."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  rng = np.random.default_rng(11)
  rewards = jnp.asarray(rng.normal(0, 1, size=32), jnp.float32)
  weights = jnp.asarray(rng.random(32) < 0.8, jnp.float32)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
  def global_sums(r, w):
    return jax.lax.psum(reward_batch_sums(r, w), "data")

  sharded = update_bco_state(init_bco_state(), *global_sums(put(rewards), put(weights)))
  plain = update_bco_state(init_bco_state(), *reward_batch_sums(rewards, weights))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), sharded, plain)

  logps, ref, labels = _batch(12, b=32)
  f = jax.jit(functools.partial(bco_loss, state=init_bco_state()))
  loss_s, m_s, s_s = f(put(logps), put(ref), put(labels))
  loss_u, m_u, s_u = bco_loss(logps, ref, labels, state=init_bco_state())
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  np.testing.assert_allclose(m_s["delta"], m_u["delta"], rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), s_s, s_u)


@pytest.mark.parametrize("use_udm", [False, True])
def test_inv4_gradient_per_unit_logp(use_udm):
  beta = 0.3
  logps, ref, labels = _batch(8)
  udm = jnp.linspace(0.5, 10.0, logps.size) if use_udm else None
  prior = BcoState(mean=jnp.float32(-0.2), var=jnp.float32(1.0), count=jnp.float32(5.0))
  # Gradient through the whole call: delta depends on logps via the update,
  # but is detached, so the gradient is the formula at the updated delta.
  grad = jax.grad(lambda x: bco_loss(x, ref, labels, udm, state=prior, beta=beta)[0])(logps)
  _, metrics, _ = bco_loss(logps, ref, labels, udm, state=prior, beta=beta)
  z = beta * (np.asarray(logps, np.float64) - np.asarray(ref, np.float64)) - float(metrics["delta"])
  sig = lambda t: 1.0 / (1.0 + np.exp(-t))
  w = np.ones(z.size) if udm is None else np.asarray(udm, np.float64)
  want = np.where(np.asarray(labels), -beta * sig(-z), w * beta * sig(z)) / z.size
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)
  # The reference gets no gradient, nor does the state.
  g_ref = jax.grad(lambda x: bco_loss(logps, x, labels, state=prior)[0])(ref)
  np.testing.assert_array_equal(g_ref, 0.0)
  g_state = jax.grad(lambda s: bco_loss(logps, ref, labels, state=s)[0])(prior)
  assert all(float(x) == 0.0 for x in jax.tree.leaves(g_state))


def test_inv5_udm_weights_bounds_and_half_probability():
  p = jnp.array([0.0, 1e-6, 0.2, 1 / 3, 0.5, 0.8, 0.95, 1.0 - 1e-7, 1.0])
  w = density_ratio_weights(p)
  assert np.all(np.isfinite(w)) and np.all((w >= 0.5) & (w <= 10.0))
  np.testing.assert_allclose(w, np.clip(np.float64(p) / (1 - np.float64(p) + 1e-8), 0.5, 10),
                             rtol=1e-5)
  np.testing.assert_allclose(density_ratio_weights(jnp.full((3,), 0.5)), 1.0, atol=1e-7)
  np.testing.assert_allclose(density_ratio_weights(p, min_density_ratio=0.1,
                                                   max_density_ratio=3.0).min(), 0.1)


def test_inv5_udm_weights_apply_to_undesirable_only():
  logps, ref, labels = _batch(9)
  desirable = np.asarray(labels)
  udm = jnp.asarray(np.where(desirable, 1.0, 3.0), jnp.float32)
  loss1, m1, _ = bco_loss(logps, ref, labels, udm, state=init_bco_state())
  # Changing the weights on desirable rows changes nothing.
  udm2 = jnp.asarray(np.where(desirable, 7.0, 3.0), jnp.float32)
  loss2, _, _ = bco_loss(logps, ref, labels, udm2, state=init_bco_state())
  np.testing.assert_allclose(loss1, loss2, rtol=1e-7)
  # All-desirable batch: UDM weights ignored entirely.
  all_d = jnp.ones_like(labels)
  a, _, _ = bco_loss(logps, ref, all_d, udm2 * 1.3, state=init_bco_state())
  b, _, _ = bco_loss(logps, ref, all_d, state=init_bco_state())
  np.testing.assert_allclose(a, b, rtol=1e-7)
  # Clipped inside the loss; metrics over undesirable rows only.
  huge = jnp.asarray(np.where(desirable, 0.01, 50.0), jnp.float32)
  _, m_huge, _ = bco_loss(logps, ref, labels, huge, state=init_bco_state())
  np.testing.assert_allclose(m_huge["udm/weight_mean"], 10.0)
  np.testing.assert_allclose(m_huge["udm/weight_clip_frac"], 1.0)
  np.testing.assert_allclose(m1["udm/weight_mean"], 3.0)
  assert m1["udm/weight_clip_frac"] == 0.0


# ------------------------------------------------------------ edge cases


@pytest.mark.parametrize("which", ["no_desirable", "no_undesirable"])
def test_empty_class_gives_finite_loss_and_grads(which):
  logps, ref, _ = _batch(4)
  labels = jnp.zeros_like(logps, bool) if which == "no_desirable" else jnp.ones_like(logps, bool)
  udm = jnp.full(logps.shape, 2.0)
  f = lambda x: bco_loss(x, ref, labels, udm, state=init_bco_state())
  loss, metrics, state = f(logps)
  grad = jax.grad(lambda x: f(x)[0])(logps)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  assert all(np.isfinite(np.asarray(v)) for v in metrics.values())
  assert all(np.isfinite(np.asarray(v)) for v in jax.tree.leaves(state))
  want, _, _, _ = _np_bco(logps, ref, labels, _NpRunningMoments(), 0.1, udm)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  empty = "chosen" if which == "no_desirable" else "rejected"
  assert metrics[f"count/{empty}"] == 0 and metrics[f"rewards/{empty}"] == 0.0


def test_all_padding_batch_is_finite_and_a_no_op():
  logps, ref, labels = _batch(2)
  prior = BcoState(mean=jnp.float32(0.7), var=jnp.float32(2.0), count=jnp.float32(3.0))
  loss, metrics, state = bco_loss(logps, ref, labels, jnp.ones_like(logps), state=prior,
                                  weights=jnp.zeros_like(logps))
  assert loss == 0.0 and all(np.isfinite(np.asarray(v)) for v in metrics.values())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7), prior, state)


def test_jit_equals_eager():
  logps, ref, labels = _batch(13)
  udm = jnp.linspace(0.3, 12.0, logps.size)
  state = BcoState(mean=jnp.float32(0.1), var=jnp.float32(1.0), count=jnp.float32(4.0))
  eager = bco_loss(logps, ref, labels, udm, state=state, beta=0.2)
  jitted = jax.jit(functools.partial(bco_loss, beta=0.2))(logps, ref, labels, udm, state=state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               eager, jitted)
  pair_e = bco_pair_loss(logps, ref, labels * 1.0, ref, state=state)
  pair_j = jax.jit(bco_pair_loss)(logps, ref, labels * 1.0, ref, state=state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               pair_e, pair_j)


@pytest.mark.parametrize("m", [1e4, -1e4])
def test_finite_at_extreme_inputs(m):
  labels = jnp.array([True, False, True, False])
  logps = jnp.array([m, m, -m, -m], jnp.float32)
  ref = jnp.zeros(4)
  udm = jnp.full((4,), 10.0)
  for state in [init_bco_state(),
                BcoState(mean=jnp.float32(-m), var=jnp.float32(1.0), count=jnp.float32(1e6))]:
    loss, metrics, new_state = bco_loss(logps, ref, labels, udm, state=state, beta=1.0)
    grad = jax.grad(lambda x, s=state: bco_loss(x, ref, labels, udm, state=s, beta=1.0)[0])(logps)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert all(np.isfinite(np.asarray(v)) for v in metrics.values())
    assert all(np.isfinite(np.asarray(v)) for v in jax.tree.leaves(new_state))


# ------------------------------------------------------------ bco_pair


def test_bco_pair_without_state_is_trl_029_form():
  rng = np.random.default_rng(21)
  c, r, rc, rr = (rng.normal(-20, 6, size=8).astype(np.float32) for _ in range(4))
  loss, metrics, state = bco_pair_loss(c, r, rc, rr, beta=0.2)
  rw, rl = 0.2 * (np.float64(c) - rc), 0.2 * (np.float64(r) - rr)
  np.testing.assert_allclose(loss, (_np_logistic(rw) + _np_logistic(-rl)).mean(), rtol=1e-5)
  assert state is None and metrics["delta"] == 0.0


def test_bco_pair_with_state_is_trl_028_form_and_twice_unpaired():
  running = _NpRunningMoments()
  state = init_bco_state()
  state_u = init_bco_state()
  for step in range(3):   # equal batch sizes: TRL's scalar-mean update gives the same delta
    rng = np.random.default_rng(30 + step)
    c, r, rc, rr = (rng.normal(-20, 6, size=6).astype(np.float32) for _ in range(4))
    loss, metrics, state = bco_pair_loss(c, r, rc, rr, state=state, beta=0.1)
    rw, rl = 0.1 * (np.float64(c) - rc), 0.1 * (np.float64(r) - rr)
    running.update(np.array([np.concatenate([rw, rl]).mean()]))   # TRL <= 0.28: scalar mean
    want = (_np_logistic(rw - running.mean) + _np_logistic(-(rl - running.mean))).mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["delta"], running.mean, rtol=1e-5, atol=1e-6)
    # Same pairs as 2B unpaired examples: same delta, loss halved (mean over 2B).
    unpaired, _, state_u = bco_loss(jnp.concatenate([c, r]), jnp.concatenate([rc, rr]),
                                    jnp.arange(12) < 6, state=state_u, beta=0.1)
    np.testing.assert_allclose(2.0 * unpaired, loss, rtol=1e-5)


# ------------------------------------------------------------ UDM classifier


def test_mean_pool_matches_numpy():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
  got = mean_pool(jnp.asarray(hidden), jnp.asarray(mask))
  np.testing.assert_allclose(got[0], hidden[0, :3].mean(0), rtol=1e-6)
  np.testing.assert_allclose(got[1], hidden[1, 0], rtol=1e-6)
  np.testing.assert_array_equal(got[2], 0.0)


def _blobs(seed, n_pos, n_neg, e=4, shift=3.0):
  rng = np.random.default_rng(seed)
  x_pos = rng.normal(size=(n_pos, e)) + shift
  x_neg = rng.normal(size=(n_neg, e)) - shift
  x = np.concatenate([x_pos, x_neg]).astype(np.float32)
  y = np.concatenate([np.ones(n_pos, bool), np.zeros(n_neg, bool)])
  return jnp.asarray(x), jnp.asarray(y)


def test_classifier_separates_a_separable_set():
  x, y = _blobs(0, 40, 24)   # unbalanced on purpose: class_weight="balanced"
  params = fit_udm_classifier(x, y)
  p = predict_desirable_prob(params, x)
  np.testing.assert_array_equal(np.asarray(p) > 0.5, np.asarray(y))
  w = udm_weights(params, x)
  assert np.all((w >= 0.5) & (w <= 10.0))
  # Undesirable-looking prompts get the lower bound, desirable-looking the upper.
  np.testing.assert_allclose(np.asarray(w)[~np.asarray(y)], 0.5)
  np.testing.assert_allclose(np.asarray(w)[np.asarray(y)], 10.0)


def _np_balanced_logreg(x, y, l2):
  """Float64 Newton on sum_i s_i logloss_i + l2/2 |coef|^2 (intercept free), with
  s_i = N / (2 N_class): sklearn LogisticRegression(C=1/l2, class_weight="balanced")."""
  x, y = np.float64(x), np.asarray(y, np.float64)
  n, e = x.shape
  s = np.where(y > 0, n / (2 * y.sum()), n / (2 * (n - y.sum())))
  xb = np.concatenate([x, np.ones((n, 1))], axis=1)
  pen = np.r_[np.full(e, l2), 0.0]
  theta = np.zeros(e + 1)
  for _ in range(50):
    p = 1 / (1 + np.exp(-xb @ theta))
    grad = xb.T @ (s * (p - y)) + pen * theta
    hess = (xb.T * (s * p * (1 - p))) @ xb + np.diag(pen)
    theta -= np.linalg.solve(hess, grad)
  assert np.abs(grad).max() < 1e-10
  return theta[:e], theta[e]


def test_classifier_is_the_regularised_optimum_and_deterministic():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(64, 4)) + 0.3, jnp.float32)
  y = jnp.asarray(rng.random(64) < 0.3)   # overlapping, unbalanced classes
  params = fit_udm_classifier(x, y, l2=0.5)
  coef, intercept = _np_balanced_logreg(x, y, 0.5)
  np.testing.assert_allclose(params.coef, coef, atol=1e-4)
  np.testing.assert_allclose(params.intercept, intercept, atol=1e-4)
  again = fit_udm_classifier(x, y, l2=0.5)
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_classifier_weights_are_one_for_identical_prompt_distributions():
  rng = np.random.default_rng(5)
  # Exactly the same prompts on both sides: the optimum is coef = 0, p = 0.5.
  x = rng.normal(size=(32, 4)).astype(np.float32)
  same = fit_udm_classifier(jnp.concatenate([x, x]), jnp.arange(64) < 32)
  np.testing.assert_allclose(udm_weights(same, jnp.asarray(x)), 1.0, atol=1e-4)
  # Independent draws from one distribution: weights close to 1.
  x2 = jnp.asarray(rng.normal(size=(2000, 4)), jnp.float32)
  params = fit_udm_classifier(x2, jnp.arange(2000) < 700)
  w = np.asarray(udm_weights(params, x2))
  np.testing.assert_allclose(w.mean(), 1.0, atol=0.05)
  assert np.quantile(np.abs(w - 1.0), 0.9) < 0.2   # finite-sample fit noise only
