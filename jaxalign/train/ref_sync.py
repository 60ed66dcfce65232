"""TR-DPO reference sync (Gorbatovski et al., arXiv 2404.09656; TRL `sync_ref_model`).

Every `every` optimizer updates the reference moves toward the policy:

  ref <- alpha * policy + (1 - alpha) * ref      (soft; alpha = 1: hard, ref <- policy)

after update number k (1-based) with k % every == 0, from the just-updated
policy, as TRL's `SyncRefModelCallback.on_step_end` (global_step % tau == 0,
`ref.mul_(1 - alpha).add_(policy, alpha=alpha)`). It runs inside the jitted
step on `state.ref_params`, so it is sharded like the parameters and
checkpointed with the state: a resumed run syncs exactly as an uninterrupted one.

With LoRA the reference of a synced run is the frozen base plus a reference
copy of the adapters (starting equal to the policy's fresh adapters, whose B
factor is zero, so the reference starts as the base with adapters off). The
sync mixes the adapter factors A and B: exact TR-DPO for a hard update
(alpha = 1); for alpha < 1 it is a mix of factors, not of the low-rank weight
delta (that mix would not stay low-rank). TRL refuses sync with PEFT.
"""

import jax
import jax.numpy as jnp


def sync_reference(ref_params, params, step: jax.Array, *, every: int, alpha: float):
  """The reference after optimizer update number `step` (1-based).

  Args:
    ref_params: the reference parameters (a pytree like `params`).
    params: the policy right after this update.
    step: [] int, the number of updates done so far, this one included.
    every: tau, sync every this many updates (> 0).
    alpha: the policy's share of the new reference, in (0, 1].

  Returns:
    ref_params mixed toward params when step % every == 0, else unchanged.
  """
  def mixed():
    if alpha == 1.0:   # hard update: an exact copy of the policy
      return jax.tree.map(lambda r, p: p.astype(r.dtype), ref_params, params)
    return jax.tree.map(
        lambda r, p: (alpha * p.astype(jnp.float32)
                      + (1.0 - alpha) * r.astype(jnp.float32)).astype(r.dtype),
        ref_params, params)

  return jax.lax.cond(step % every == 0, mixed, lambda: ref_params)
