"""Packed batches (data.packing): layout, and one step equal to the padded layout's.

The equalities run the real sharded step on 8 fake CPU devices, for every
data format, on sequences of wildly different lengths (2 to T tokens, some
rows ending in padding, some groups with padding slots).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import losses, sharding
from jaxalign.data import packing
from jaxalign.train import loop, optim, step as step_lib
from tests.train.helpers import tiny_config

T, VOCAB = 12, 32


def _wild_batch(rng, b, s, *, group_padding=False):
  """[b, s, T] right-padded sequences of 2..T tokens (prompt 1..n-1, the rest scored)."""
  tokens = rng.integers(4, VOCAB, size=(b, s, T)).astype(np.int32)
  lengths = rng.choice([2, 3, T - 1, T, 5, 7], size=(b, s))
  if group_padding:  # the last slot of every other example is a padding sequence
    lengths[::2, -1] = 0
  pos = np.arange(T)
  attention = (pos < lengths[..., None]).astype(np.int32)
  prompt = np.maximum(1, (lengths * rng.uniform(0.1, 0.7, size=(b, s))).astype(int))
  loss_mask = (attention.astype(bool) & (pos >= prompt[..., None])).astype(np.int32)
  tokens = np.where(attention.astype(bool), tokens, 0)
  return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


def _extras(rng, loss_name, b, s):
  g = s - 1
  if loss_name in ("bco", "kto", "apo_zero_unpaired"):
    return {"label": (np.arange(b) % 2).astype(np.int32)}
  if loss_name == "d2o":
    return {"group_mask": np.ones((b, g), np.int32)}
  if loss_name in ("grao", "aft"):
    mask = np.ones((b, g), np.int32)
    mask[::2, -1] = 0
    out = {"group_mask": mask}
    if loss_name == "grao":
      out["rewards"] = (rng.uniform(size=(b, g)) * mask).astype(np.float32)
    else:
      out["labels"] = ((np.arange(g)[None] + np.arange(b)[:, None]) % 2 * mask).astype(np.int32)
    return out
  return {}


# loss -> (sequences per example, padding group slots)
CASES = {"sft": (1, False), "dpo": (2, False), "bco": (1, False), "kto": (2, False),
         "d2o": (4, False), "grao": (4, True), "aft": (4, True)}


@functools.lru_cache(maxsize=None)
def _setup():
  cfg = tiny_config(**{"mesh.shape": (1, 8, 1)})
  mesh = sharding.make_mesh(cfg.mesh.shape)
  rules = tuple(tuple(r) for r in cfg.sharding_rules)
  tx, sched = optim.make_optimizer(lr=1e-3, warmup_steps=1, total_steps=10)
  graphdef, abstract, shardings, init_fn = loop.build_model_and_state(
      config_lib.model_config(cfg), tx, mesh, rules, seed=0, keep_reference=True)
  with jax.set_mesh(mesh):
    state = jax.jit(init_fn, out_shardings=shardings)()
  # A reference a little away from the policy, so ref log-probs differ from the policy's.
  ref = jax.tree.map(lambda x: x * 1.1, state.ref_params)
  return mesh, rules, graphdef, state.replace(ref_params=ref)


def _micro(loss_name, batch, *, accum=1):
  """Metrics and gradients of one step on `batch`, sharded over 8 devices."""
  mesh, rules, graphdef, state = _setup()
  spec = losses.get(loss_name)
  call = step_lib.make_loss_call(spec, {})
  loss_state = spec.init_state() if spec.init_state else None
  batch_sharding = sharding.batch_sharding(mesh, rules)
  fn = jax.jit(functools.partial(
      step_lib._micro_step, graphdef=graphdef, loss_call=call, chunk_size=16,
      batch_axes=sharding.batch_axes(rules)))
  with jax.set_mesh(mesh):
    metrics, grads, _ = fn(state.params, state.frozen,
                           state.ref_params if spec.needs_ref else None, loss_state,
                           sharding.host_to_global(batch, batch_sharding))
  return jax.device_get(metrics), jax.device_get(grads)


def _pack(batch, num_groups, buckets=None):
  b, s, _ = batch["tokens"].shape
  full = b // num_groups * s
  return packing.pack_batch(batch, packing.PackSpec(num_groups=num_groups, row_length=T,
                                                    buckets=buckets or tuple(range(1, full + 1))))


def test_pack_layout_holds_every_token_once_in_order():
  rng = np.random.default_rng(0)
  batch = _wild_batch(rng, 8, 2)
  packed = _pack(batch, 4, buckets=(2, 3, 4))
  G, R, L = packed["packed_tokens"].shape
  assert (G, L) == (4, T) and R in (2, 3, 4) and R < 4   # fewer rows than sequences
  per = 2
  for g in range(G):
    for local in range(per * 2):
      b, s = g * per + local // 2, local % 2
      at = packed["packed_slot"][g] == local
      n = int(batch["attention_mask"][b, s].sum())
      assert at.sum() == n and len(np.unique(np.nonzero(at)[0])) == 1   # one row
      row = np.nonzero(at.any(axis=1))[0][0]
      np.testing.assert_array_equal(packed["packed_tokens"][g][at], batch["tokens"][b, s, :n])
      np.testing.assert_array_equal(packed["packed_positions"][g][at], np.arange(n))
      assert len(np.unique(packed["packed_segment_ids"][g, row][at[row]])) == 1
      want = batch["loss_mask"][b, s, :n].copy()
      want[0] = 0
      np.testing.assert_array_equal(packed["packed_loss_mask"][g][at], want)
  np.testing.assert_array_equal(packed["packed_lengths"], batch["attention_mask"].sum(-1))
  assert packed["packed_attention_mask"].sum() == batch["attention_mask"].sum()
  assert "tokens" not in packed


def test_pack_is_deterministic_and_leaves_invalid_slots_empty():
  batch = _wild_batch(np.random.default_rng(1), 8, 2)
  a, b = _pack(batch, 2), _pack(batch, 2)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  valid = np.array([True] * 5 + [False] * 3)
  spec = packing.PackSpec(num_groups=2, row_length=T, buckets=(8,))
  p = packing.pack_batch(batch, spec, valid=valid)
  assert not np.isin(p["packed_slot"][1], [2, 3, 4, 5, 6, 7]).any()   # examples 5..7
  assert (p["packed_lengths"][5:] == 0).all()


def test_buckets_are_few_ascending_and_end_with_the_full_group():
  lengths = np.random.default_rng(0).integers(2, T + 1, size=(100, 2))
  buckets = packing.plan_buckets(lengths, batch_size=16, num_groups=4, row_length=T,
                                 num_buckets=3, seed=0)
  assert len(buckets) <= 3 and buckets[-1] == 8 and list(buckets) == sorted(set(buckets))
  assert buckets == packing.plan_buckets(lengths, batch_size=16, num_groups=4, row_length=T,
                                         num_buckets=3, seed=0)


def _assert_same(a, b):
  (ma, ga), (mb, gb) = a, b
  assert set(ma) == set(mb)
  for k in ma:
    np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5, atol=1e-5, err_msg=k)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_name", sorted(CASES))
def test_packed_step_equals_padded_step(loss_name):
  s, group_padding = CASES[loss_name]
  rng = np.random.default_rng(hash(loss_name) % 2**32)
  b = 16
  batch = {**_wild_batch(rng, b, s, group_padding=group_padding),
           **_extras(rng, loss_name, b, s)}
  packed = _pack(batch, 8)    # one group per device: 2 examples each
  rows = packed["packed_tokens"].shape[1]
  assert rows < 2 * s or (s == 1 and rows <= 2)
  _assert_same(_micro(loss_name, batch), _micro(loss_name, packed))
