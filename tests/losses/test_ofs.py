"""OFS-DPO / COFS-DPO, tested from the `ofs_dpo` invariants of docs/losses.md and a NumPy transcription.

Section 7's formulation is a secondary source plus reconstructions: these tests
pin jaxalign's documented choices, not the paper's behaviour.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.dpo import dpo_loss
from jaxalign.models.lora import cofs_combine, lora_delta
from jaxalign.losses.ofs import (OfsState, ofs_dpo_loss,
                                 ofs_fs_terms, ofs_init_state, ofs_module_loss,
                                 ofs_update_state)

LOG2 = np.log(2.0)


# One XLA compile per (shape, static option) instead of op-by-op dispatch;
# test_jit_equals_eager compares it with the plain function. Backend
# optimisation level 0 roughly halves CPU compile time for these tiny graphs.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnames=("swap_interval", "detach_other"),
                   compiler_options=_FAST_COMPILE)
def _compiled(logps, ref_chosen, ref_rejected, state, alpha, beta, fs_beta, weights,
              swap_interval, detach_other):
  def f(fc, fr, sc, sr):
    loss, metrics, new_state = ofs_dpo_loss(
        fc, fr, sc, sr, ref_chosen, ref_rejected, state=state, alpha=alpha,
        swap_interval=swap_interval, beta=beta, fs_beta=fs_beta,
        detach_other=detach_other, weights=weights)
    return loss, (metrics, new_state)
  (loss, (metrics, new_state)), grads = jax.value_and_grad(
      f, argnums=(0, 1, 2, 3), has_aux=True)(*logps)
  return loss, metrics, new_state, grads


def _run(fast_c, fast_r, slow_c, slow_r, ref_c, ref_r, *, state=None, alpha=0.5, beta=0.1,
         fs_beta=None, weights=None, swap_interval=2, detach_other=True):
  """ofs_dpo_loss's (loss, metrics, new_state, grads w.r.t. fast_c, fast_r, slow_c, slow_r)."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  state = ofs_init_state() if state is None else state
  weights = np.ones(len(fast_c)) if weights is None else weights
  return _compiled(tuple(map(f32, (fast_c, fast_r, slow_c, slow_r))), f32(ref_c), f32(ref_r),
                   state, f32(alpha), f32(beta), f32(beta if fs_beta is None else fs_beta),
                   f32(weights), swap_interval=swap_interval, detach_other=detach_other)


def _leader_state(fast_is_leader):
  return ofs_init_state()._replace(fast_is_leader=jnp.asarray(fast_is_leader))


def _numpy_ofs(fc, fr, sc, sr, rc, rr, fast_is_leader, alpha, beta, fs_beta, w):
  """Independent transcription (float64) of L_fast + L_slow with the roles given.

  leader: l(beta h) + alpha l(fs_beta (m_self - m_other));
  chaser: l(beta h) - alpha l(fs_beta (m_other - m_self)); l(z) = log(1 + e^-z).
  """
  ell = lambda z: np.logaddexp(0.0, -z)
  mean = lambda x: np.sum(w * x) / max(np.sum(w), 1.0)
  m_fast, m_slow = fc - fr, sc - sr
  m_ref = rc - rr

  def objective(m_self, m_other, leads):
    dpo = mean(ell(beta * (m_self - m_ref)))
    if leads:
      return dpo + alpha * mean(ell(fs_beta * (m_self - m_other)))
    return dpo - alpha * mean(ell(fs_beta * (m_other - m_self)))

  fast = objective(m_fast, m_slow, fast_is_leader)
  slow = objective(m_slow, m_fast, not fast_is_leader)
  return fast + slow, fast, slow


def _random_logps(seed, b=6):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(-20, 4, size=b).astype(np.float32) for _ in range(6))


def test_fs_term_is_log2_when_modules_are_equal():
  # (f)1: theta_F = theta_S -> L_FS = log 2 whatever the data.
  c, r, *_ = _random_logps(0)
  for fs_beta in [0.1, 1.0, 7.0]:
    leader, chaser = ofs_fs_terms(c, r, c, r, fs_beta=fs_beta)
    np.testing.assert_allclose(leader, LOG2, rtol=1e-6)
    np.testing.assert_allclose(chaser, LOG2, rtol=1e-6)
  _, m, _, _ = _run(c, r, c, r, *_random_logps(1)[:2])
  np.testing.assert_allclose([m["loss/fs_leader"], m["loss/fs_chaser"]], LOG2, rtol=1e-6)


@pytest.mark.parametrize("fast_is_leader", [True, False])
def test_gradient_at_the_reference_is_the_same_for_both_roles(fast_is_leader):
  # (f)2 with fs_beta = beta: d/dS(y_w) = -(1 + alpha) beta / 2, d/dS(y_l) the opposite
  # (per pair; the batch mean divides by B).
  x = np.array([-5.0, -7.0, -3.0, -1.0, -12.0, -4.0], np.float32)
  y = np.array([-6.0, -2.0, -9.0, -1.5, -30.0, -4.0], np.float32)
  alpha, beta = 0.3, 0.2
  _, _, _, (g_fc, g_fr, g_sc, g_sr) = _run(x, y, x, y, x, y, alpha=alpha, beta=beta,
                                           state=_leader_state(fast_is_leader))
  expected = (1 + alpha) * beta / 2 / len(x)
  for g_c, g_r in [(g_fc, g_fr), (g_sc, g_sr)]:
    np.testing.assert_allclose(g_c, -expected, rtol=1e-6)
    np.testing.assert_allclose(g_r, +expected, rtol=1e-6)


def test_alpha_zero_is_two_independent_dpo_runs():
  # (f)3: no coupling; each adapter gets exactly its own DPO gradient.
  fc, fr, sc, sr, rc, rr = _random_logps(2)
  loss, m, _, (g_fc, g_fr, g_sc, g_sr) = _run(fc, fr, sc, sr, rc, rr, alpha=0.0, beta=0.1)
  dpo = jax.jit(jax.value_and_grad(lambda c, r: dpo_loss(c, r, rc, rr, beta=0.1)[0],
                                   argnums=(0, 1)))
  dpo_fast, dpo_fast_grads = dpo(fc, fr)
  dpo_slow, dpo_slow_grads = dpo(sc, sr)
  np.testing.assert_allclose(loss, dpo_fast + dpo_slow, rtol=1e-6)
  np.testing.assert_allclose(m["loss/dpo_fast"], dpo_fast, rtol=1e-6)
  for got, want in zip((g_fc, g_fr, g_sc, g_sr), dpo_fast_grads + dpo_slow_grads):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_zero_adapters_start_every_dpo_term_at_log2():
  # (f)4: both adapters at zero (LoRA B = 0) give the reference's log-probs.
  _, _, _, _, rc, rr = _random_logps(3)
  alpha = 0.5
  loss, m, _, _ = _run(rc, rr, rc, rr, rc, rr, alpha=alpha)
  for key in ["loss/dpo_fast", "loss/dpo_slow", "loss/fs_leader", "loss/fs_chaser"]:
    np.testing.assert_allclose(m[key], LOG2, rtol=1e-6)
  np.testing.assert_allclose(m["loss/fast"], (1 + alpha) * LOG2, rtol=1e-6)  # leader
  np.testing.assert_allclose(m["loss/slow"], (1 - alpha) * LOG2, rtol=1e-6)  # chaser
  np.testing.assert_allclose(loss, 2 * LOG2, rtol=1e-6)


def test_chaser_objective_is_unbounded_below():
  # (f)5: once the chaser overtakes by d, its objective ~ L_DPO - alpha beta d.
  z = np.zeros(6, np.float32)
  alpha, beta = 0.5, 0.1
  for d in [1e3, 1e4]:
    slow_c = z + d   # m_S - m_F = d
    _, m, _, grads = _run(z, z, slow_c, z, z, z, alpha=alpha, beta=beta)
    dpo_slow = float(m["loss/dpo_slow"])
    np.testing.assert_allclose(m["loss/slow"], dpo_slow - alpha * beta * d, rtol=1e-5)
    assert m["loss/slow"] < 0
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("fast_is_leader", [True, False])
def test_matches_numpy_transcription(fast_is_leader):
  fc, fr, sc, sr, rc, rr = _random_logps(4)
  w = np.array([1, 1, 0, 1, 1, 0], np.float32)
  for alpha, beta, fs_beta in [(0.5, 0.1, None), (2.0, 0.3, 0.05)]:
    loss, m, _, _ = _run(fc, fr, sc, sr, rc, rr, alpha=alpha, beta=beta, fs_beta=fs_beta,
                         weights=w, state=_leader_state(fast_is_leader))
    want, want_fast, want_slow = _numpy_ofs(
        *(x.astype(np.float64) for x in (fc, fr, sc, sr, rc, rr)), fast_is_leader, alpha,
        beta, beta if fs_beta is None else fs_beta, w)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["loss/fast"], want_fast, rtol=1e-5)
    np.testing.assert_allclose(m["loss/slow"], want_slow, rtol=1e-5)
    assert m["role/fast_is_leader"] == float(fast_is_leader)


@pytest.mark.parametrize("fast_is_leader", [True, False])
def test_each_adapter_gets_only_its_own_objective_gradient(fast_is_leader):
  fc, fr, sc, sr, rc, rr = _random_logps(5)
  kw = dict(alpha=0.7, beta=0.2)
  _, _, _, (g_fc, g_fr, g_sc, g_sr) = _run(fc, fr, sc, sr, rc, rr,
                                           state=_leader_state(fast_is_leader), **kw)
  own = jax.jit(jax.grad(lambda c, r, oc, orr, leads: ofs_module_loss(
      c, r, oc, orr, rc, rr, is_leader=leads, **kw)[0], argnums=(0, 1)))
  own_fast = own(fc, fr, sc, sr, fast_is_leader)
  own_slow = own(sc, sr, fc, fr, not fast_is_leader)
  for got, want in zip((g_fc, g_fr, g_sc, g_sr), own_fast + own_slow):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # detach_other=False couples them: the gradients change.
  _, _, _, coupled = _run(fc, fr, sc, sr, rc, rr, state=_leader_state(fast_is_leader),
                          detach_other=False, **kw)
  assert not np.allclose(coupled[0], g_fc)


def test_swap_rule_transitions():
  state = ofs_init_state()
  assert bool(state.fast_is_leader) and int(state.count) == 0
  update = jax.jit(functools.partial(ofs_update_state, swap_interval=3))
  # Interval 1: slow has the lower mean, but roles only move on the 3rd step.
  for step, (f, s) in enumerate([(1.0, 0.5), (1.0, 0.5), (0.9, 0.5)], start=1):
    state = update(state, f, s)
    if step < 3:
      assert bool(state.fast_is_leader) and int(state.count) == step
  assert not bool(state.fast_is_leader)
  assert int(state.count) == 0 and float(state.fast_loss_sum) == 0.0
  assert float(state.slow_loss_sum) == 0.0
  # Interval 2: fast lower on the mean (not on every step) -> fast leads again.
  for f, s in [(0.2, 0.6), (0.9, 0.6), (0.2, 0.6)]:
    state = update(state, f, s)
  assert bool(state.fast_is_leader)
  # Interval 3: a tie keeps (gives) the leader role to the fast adapter.
  state = state._replace(fast_is_leader=jnp.asarray(False))
  for f, s in [(0.5, 0.5)] * 3:
    state = update(state, f, s)
  assert bool(state.fast_is_leader)
  # swap_interval = 1 re-decides every step.
  state = ofs_update_state(ofs_init_state(), 2.0, 1.0, swap_interval=1)
  assert not bool(state.fast_is_leader) and int(state.count) == 0


def test_loss_threads_the_state_through_steps():
  # The state is a pytree (checkpointable, jit-able) and ofs_dpo_loss's new_state
  # is ofs_update_state on its own base DPO losses; roles act from the next step.
  assert len(jax.tree.leaves(ofs_init_state())) == 4
  fc, fr, sc, sr, rc, rr = _random_logps(6)
  state = ofs_init_state()
  # The slow module is better (larger margins): after 2 steps it leads.
  for step in range(2):
    _, m, new_state, _ = _run(fc, fr, fc + 5.0, fr, rc, rr, state=state, swap_interval=2)
    want = ofs_update_state(state, m["loss/dpo_fast"], m["loss/dpo_slow"], swap_interval=2)
    for got, ref in zip(new_state, want):
      np.testing.assert_array_equal(got, ref)
    assert m["role/fast_is_leader"] == 1.0   # roles used in this step
    state = new_state
  assert isinstance(state, OfsState) and not bool(state.fast_is_leader)
  _, m, _, _ = _run(fc, fr, fc + 5.0, fr, rc, rr, state=state, swap_interval=2)
  assert m["role/fast_is_leader"] == 0.0
  np.testing.assert_allclose(m["loss/fs_leader"], m["loss/fs_chaser"], rtol=1e-6)


def test_jit_equals_eager():
  fc, fr, sc, sr, rc, rr = _random_logps(7)
  state = _leader_state(False)
  eager = ofs_dpo_loss(fc, fr, sc, sr, rc, rr, state=state, alpha=0.5, swap_interval=2)
  jitted = _run(fc, fr, sc, sr, rc, rr, state=state, alpha=0.5, swap_interval=2)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  assert set(jitted[1]) == set(eager[1])
  for key in eager[1]:
    np.testing.assert_allclose(jitted[1][key], eager[1][key], rtol=1e-6)
  for got, want in zip(jitted[2], eager[2]):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_finite_at_extreme_inputs():
  z = np.zeros(6, np.float32)
  for big in [1e4, -1e4]:
    for state in [_leader_state(True), _leader_state(False)]:
      loss, m, _, grads = _run(z + big, z, z, z + big, z, z - big, state=state, alpha=0.5)
      assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)


def test_bad_swap_interval_raises():
  args = _random_logps(8)
  for bad in [0, -1, 2.0, True]:
    with pytest.raises(ValueError, match="swap_interval"):
      ofs_dpo_loss(*args, state=ofs_init_state(), alpha=0.1, swap_interval=bad)


def _adapters(num_domains=3, seed=0):
  rng = np.random.default_rng(seed)
  def one():
    return {
        "layers": {
            "attn": {"lora_a": jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32),  # scanned
                     "lora_b": jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)},
            "mlp": {"lora_a": jnp.asarray(rng.normal(size=(8, 2)), jnp.bfloat16),
                    "lora_b": jnp.asarray(rng.normal(size=(2, 8)), jnp.bfloat16),
                    "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
        },
    }
  return [one() for _ in range(num_domains)]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("space", ["delta", "factors"])
def test_cofs_one_hot_weights_return_that_adapter_exactly(space):
  # (f)6, bit for bit, bfloat16 leaves included.
  adapters = _adapters()
  for t in range(len(adapters)):
    combined = cofs_combine(adapters, np.eye(len(adapters))[t], space=space)
    want = lora_delta(adapters[t]) if space == "delta" else adapters[t]
    _assert_trees_equal(combined, want)


def test_cofs_delta_space_is_linear_in_each_adapters_delta():
  adapters = _adapters(seed=1)
  w = np.array([0.5, 0.3, 0.2], np.float32)
  combined = cofs_combine(adapters, w)
  deltas = [lora_delta(a) for a in adapters]
  attn = sum(w[t] * np.asarray(d["layers"]["attn"]["delta"]) for t, d in enumerate(deltas))
  np.testing.assert_allclose(combined["layers"]["attn"]["delta"], attn, rtol=1e-5, atol=1e-5)
  a0 = adapters[0]["layers"]["attn"]
  np.testing.assert_allclose(deltas[0]["layers"]["attn"]["delta"],
                             np.einsum("lir,lro->lio", a0["lora_a"], a0["lora_b"]),
                             rtol=1e-5, atol=1e-5)
  bias = sum(w[t] * np.asarray(a["layers"]["mlp"]["bias"]) for t, a in enumerate(adapters))
  np.testing.assert_allclose(combined["layers"]["mlp"]["bias"], bias, rtol=1e-6)
  # Factor space is leafwise, so its product is bilinear in w: not the same delta.
  factors = cofs_combine(adapters, w, space="factors")
  f = factors["layers"]["attn"]
  np.testing.assert_allclose(f["lora_a"], sum(w[t] * np.asarray(a["layers"]["attn"]["lora_a"])
                                              for t, a in enumerate(adapters)), rtol=1e-6)
  assert not np.allclose(np.matmul(f["lora_a"], f["lora_b"]), attn, atol=1e-3)


def test_cofs_bad_arguments_raise():
  adapters = _adapters(2)
  with pytest.raises(ValueError, match="shape"):
    cofs_combine(adapters, [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="space"):
    cofs_combine(adapters, [1.0, 0.0], space="ba")
  with pytest.raises(ValueError, match="at least one"):
    cofs_combine([], [])
