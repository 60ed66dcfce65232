"""OFS-DPO and COFS-DPO (Qi et al., arXiv 2406.05534): fast/slow chasing modules.

Only the abstract is the paper's; the formulation here follows a secondary
source and reconstructions (docs/losses.md, `ofs_dpo`), every choice exposed:
two LoRA modules, a fast one and a slow one (different learning rates), each
trained with DPO against the frozen reference plus a cross-module regulariser
in which the *other* module plays the reference. One module holds the leader
(F) role and widens its lead, the other chases it; roles are re-decided every
`swap_interval` optimiser steps from each module's mean DPO loss, as an
explicit state transition (`OfsState`, `ofs_update_state`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign.losses.dpo import dpo_loss
from jaxalign.losses.registry import register

class OfsState(NamedTuple):
  """Role flag and role-check accumulators; checkpointed with the train state.

  Attributes:
    fast_is_leader: [] bool, the fast adapter holds the F (leader) role.
    fast_loss_sum: [] float32, the fast module's base DPO loss summed over the
      steps of the current interval.
    slow_loss_sum: [] float32, same for the slow module.
    count: [] int32, optimiser steps accumulated in the current interval.
  """
  fast_is_leader: jax.Array
  fast_loss_sum: jax.Array
  slow_loss_sum: jax.Array
  count: jax.Array


def ofs_init_state() -> OfsState:
  """The start state: the fast adapter leads, empty accumulators."""
  return OfsState(fast_is_leader=jnp.asarray(True),
                  fast_loss_sum=jnp.zeros((), jnp.float32),
                  slow_loss_sum=jnp.zeros((), jnp.float32),
                  count=jnp.zeros((), jnp.int32))


def ofs_update_state(
    state: OfsState,
    fast_dpo_loss: jax.Array,
    slow_dpo_loss: jax.Array,
    *,
    swap_interval: int,
) -> OfsState:
  """One optimiser step of the role-swap ("chasing") rule.

  Adds this step's base DPO losses to the accumulators; on the step that
  completes an interval of `swap_interval` steps, the module with the lower
  mean loss takes the leader role for the next interval (a tie keeps the fast
  adapter as leader) and the accumulators restart. Call it once per optimiser
  step, not per micro-batch.

  Args:
    state: the current OfsState.
    fast_dpo_loss: [] this step's L_DPO of the fast module (batch mean).
    slow_dpo_loss: [] same for the slow module.
    swap_interval: T >= 1, optimiser steps between role checks.

  Returns:
    the next OfsState.
  """
  _check_swap_interval(swap_interval)
  as_f32 = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  fast_sum = state.fast_loss_sum + as_f32(fast_dpo_loss)
  slow_sum = state.slow_loss_sum + as_f32(slow_dpo_loss)
  count = state.count + 1
  is_check = count >= swap_interval
  # Both sums cover the same steps, so comparing sums compares means.
  fast_is_leader = jnp.where(is_check, fast_sum <= slow_sum, state.fast_is_leader)
  zero = jnp.zeros((), jnp.float32)
  return OfsState(fast_is_leader=fast_is_leader,
                  fast_loss_sum=jnp.where(is_check, zero, fast_sum),
                  slow_loss_sum=jnp.where(is_check, zero, slow_sum),
                  count=jnp.where(is_check, 0, count).astype(jnp.int32))


def ofs_fs_terms(
    leader_chosen_logps: jax.Array,
    leader_rejected_logps: jax.Array,
    chaser_chosen_logps: jax.Array,
    chaser_rejected_logps: jax.Array,
    *,
    fs_beta: float = 0.1,
    detach_other: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """The cross-module regulariser L_DPO-FS ("Eq 6"): DPO with the other module as reference.

  With raw margins m = S(y_w) - S(y_l) (the frozen reference cancels):
    L_FS^F = l(fs_beta (m_F - sg[m_S])),   L_FS^S = l(fs_beta (sg[m_F] - m_S)).
  Equal values, different gradients: each role's copy moves only its own module.

  Args:
    leader_chosen_logps: [B] S_F(y_w), the F (leader) module's summed log-probs.
    leader_rejected_logps: [B] S_F(y_l).
    chaser_chosen_logps: [B] S_S(y_w), the S (chaser) module's.
    chaser_rejected_logps: [B] S_S(y_l).
    fs_beta: inverse temperature of the regulariser.
    detach_other: stop-gradient on the other module's margin (default;
      reconstruction). False lets each copy reach both modules.

  Returns:
    leader_term: [B] L_FS^F per pair.
    chaser_term: [B] L_FS^S per pair.
  """
  m_leader = (leader_chosen_logps.astype(jnp.float32)
              - leader_rejected_logps.astype(jnp.float32))               # [B]
  m_chaser = (chaser_chosen_logps.astype(jnp.float32)
              - chaser_rejected_logps.astype(jnp.float32))               # [B]
  sg = jax.lax.stop_gradient if detach_other else (lambda x: x)
  # softplus(-z) == -log_sigmoid(z), finite for large |z|.
  leader_term = jax.nn.softplus(-fs_beta * (m_leader - sg(m_chaser)))
  chaser_term = jax.nn.softplus(-fs_beta * (sg(m_leader) - m_chaser))
  return leader_term, chaser_term


def ofs_module_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    other_chosen_logps: jax.Array,
    other_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    is_leader: jax.Array | bool,
    alpha: float,
    beta: float = 0.1,
    fs_beta: float | None = None,
    detach_other: bool = True,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The OFS-DPO objective of one module ("Eq 3, Eq 4").

  Leader (F): L_DPO + alpha L_FS^F, widening its lead over the other module.
  Chaser (S): L_DPO - alpha L_FS^S, pushing its margin up towards the leader's;
  unbounded below (~ -alpha fs_beta (m_S - m_F) once it overtakes), so a
  negative chaser loss is legitimate.

  Args:
    chosen_logps: [B] S(y_w) under this module (base + its adapter).
    rejected_logps: [B] S(y_l) under this module.
    other_chosen_logps: [B] S(y_w) under the other module (its reference here).
    other_rejected_logps: [B] S(y_l) under the other module.
    ref_chosen_logps: [B] S_ref(y_w) (base, adapters off); constant.
    ref_rejected_logps: [B] S_ref(y_l); constant.
    is_leader: [] bool (may be traced): this module holds the F role.
    alpha: regulariser weight (no established value).
    beta: DPO inverse temperature against the frozen reference.
    fs_beta: inverse temperature of the regulariser; None means beta.
    detach_other: stop-gradient on the other module's margin (default).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar, the module's objective (weighted mean over the B pairs).
    metrics: rewards/{chosen,rejected,margins,accuracies}, logps/* (as
      dpo_loss), loss/dpo, loss/fs (this role's L_FS value).
  """
  fs_beta = beta if fs_beta is None else fs_beta
  dpo, metrics = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                          ref_rejected_logps, beta=beta, weights=weights)
  as_leader, _ = ofs_fs_terms(chosen_logps, rejected_logps, other_chosen_logps,
                              other_rejected_logps, fs_beta=fs_beta,
                              detach_other=detach_other)
  _, as_chaser = ofs_fs_terms(other_chosen_logps, other_rejected_logps, chosen_logps,
                              rejected_logps, fs_beta=fs_beta, detach_other=detach_other)
  w = (jnp.ones_like(as_leader) if weights is None else weights.astype(jnp.float32))
  mean = lambda x: (w * x).sum() / jnp.maximum(w.sum(), 1.0)
  is_leader = jnp.asarray(is_leader, bool)
  fs = jnp.where(is_leader, mean(as_leader), mean(as_chaser))
  sign = jnp.where(is_leader, 1.0, -1.0)
  metrics = dict(metrics, **{"loss/dpo": dpo, "loss/fs": fs})
  return dpo + sign * alpha * fs, metrics


@register(data="pairwise", needs_ref=True, name="ofs_dpo", init_state=ofs_init_state,
          modules=("fast", "slow"),
          ranges={"beta": "(0, inf)", "fs_beta": "(0, inf)", "alpha": "[0, inf)",
                  "swap_interval": "[1, inf)"})
def ofs_dpo_loss(
    fast_chosen_logps: jax.Array,
    fast_rejected_logps: jax.Array,
    slow_chosen_logps: jax.Array,
    slow_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    state: OfsState,
    alpha: float,
    swap_interval: int,
    beta: float = 0.1,
    fs_beta: float | None = None,
    detach_other: bool = True,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], OfsState]:
  """OFS-DPO for both modules in one backward pass, plus the role-swap step.

  loss = L_fast + L_slow, each `ofs_module_loss` in the role `state` gives it.
  The two adapters' parameters are disjoint and the other module enters each
  objective under stop-gradient, so the gradient of the sum w.r.t. one adapter
  is the gradient of that adapter's own objective; each adapter then steps
  with its own optimiser and learning rate (the step's business).

  Args:
    fast_chosen_logps: [B] S(y_w) under base + fast adapter.
    fast_rejected_logps: [B] S(y_l) under base + fast adapter.
    slow_chosen_logps: [B] S(y_w) under base + slow adapter.
    slow_rejected_logps: [B] S(y_l) under base + slow adapter.
    ref_chosen_logps: [B] S_ref(y_w) (adapters off); constant.
    ref_rejected_logps: [B] S_ref(y_l); constant.
    state: OfsState before this optimiser step (its roles are used here).
    alpha: regulariser weight; no default (no established value).
    swap_interval: optimiser steps between role checks; no default.
    beta: DPO inverse temperature (as DPO).
    fs_beta: regulariser inverse temperature; None means beta.
    detach_other: stop-gradient on the other module's margin (default).
    weights: optional [B] row weights (0 for padding rows).

  Returns:
    loss: scalar L_fast + L_slow.
    metrics: {fast,slow}/rewards/{chosen,rejected,margins,accuracies},
      loss/{dpo_fast,dpo_slow,fs_leader,fs_chaser,fs,fast,slow},
      role/fast_is_leader (the roles used in this step).
    new_state: `ofs_update_state(state, L_DPO(fast), L_DPO(slow))`.
  """
  _check_swap_interval(swap_interval)
  fast_is_leader = jnp.asarray(state.fast_is_leader, bool)
  kw = dict(alpha=alpha, beta=beta, fs_beta=fs_beta, detach_other=detach_other,
            weights=weights)
  fast_loss, fast_m = ofs_module_loss(
      fast_chosen_logps, fast_rejected_logps, slow_chosen_logps, slow_rejected_logps,
      ref_chosen_logps, ref_rejected_logps, is_leader=fast_is_leader, **kw)
  slow_loss, slow_m = ofs_module_loss(
      slow_chosen_logps, slow_rejected_logps, fast_chosen_logps, fast_rejected_logps,
      ref_chosen_logps, ref_rejected_logps, is_leader=~fast_is_leader, **kw)

  metrics = {}
  for name, m in (("fast", fast_m), ("slow", slow_m)):
    for key in ("chosen", "rejected", "margins", "accuracies"):
      metrics[f"{name}/rewards/{key}"] = m[f"rewards/{key}"]
  metrics.update({
      "loss/dpo_fast": fast_m["loss/dpo"],
      "loss/dpo_slow": slow_m["loss/dpo"],
      "loss/fs_leader": jnp.where(fast_is_leader, fast_m["loss/fs"], slow_m["loss/fs"]),
      "loss/fs_chaser": jnp.where(fast_is_leader, slow_m["loss/fs"], fast_m["loss/fs"]),
      # L_FS = l(fs_beta (m_F - m_S)): the two roles' copies share this value.
      "loss/fs": jnp.where(fast_is_leader, fast_m["loss/fs"], slow_m["loss/fs"]),
      "loss/fast": fast_loss,
      "loss/slow": slow_loss,
      "role/fast_is_leader": fast_is_leader.astype(jnp.float32),
  })
  new_state = ofs_update_state(state, fast_m["loss/dpo"], slow_m["loss/dpo"],
                               swap_interval=swap_interval)
  return fast_loss + slow_loss, metrics, new_state


def _check_swap_interval(swap_interval) -> None:
  if isinstance(swap_interval, bool) or not isinstance(swap_interval, int) or swap_interval < 1:
    raise ValueError(f"swap_interval must be an int >= 1, got {swap_interval!r}")
