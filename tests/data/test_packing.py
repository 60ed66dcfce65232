"""Packed batches (data.packing): layout, and one step equal to the padded layout's.

The equalities run the real sharded step on 8 fake CPU devices, for every
data format, on sequences of wildly different lengths (2 to T tokens, some
rows ending in padding, some groups with padding slots).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign import losses, sharding
from jaxalign.data import packing
from jaxalign.train import step as step_lib
from tests.train.helpers import built_state, tiny_config

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
  if loss_name in ("d2o", "grao", "aft"):
    mask = np.ones((b, g), np.int32)
    mask[::2, -1] = 0         # the padding sequences of _wild_batch(group_padding=True)
    out = {"group_mask": mask}
    if loss_name == "grao":
      out["rewards"] = (rng.uniform(size=(b, g)) * mask).astype(np.float32)
    else:
      out["labels"] = ((np.arange(g)[None] + np.arange(b)[:, None]) % 2 * mask).astype(np.int32)
    return out
  return {}


# One loss per data format (sft, pairwise, unpaired, unpaired_kl, negatives, groups,
# ranked) and the other pairwise/unpaired ones; all read their columns of one
# [B, 4] batch (sequence 0, then 1..3 with padding slots in the group formats).
LOSS_NAMES = ("sft", "dpo", "ln_dpo", "bco", "kto", "apo_zero_unpaired", "d2o", "grao", "aft")
B, S = 16, 4


@functools.lru_cache(maxsize=None)
def _setup(mesh_shape=(1, 8, 1)):
  """(mesh, rules, graphdef, step-0 state) of the tiny recipe on 8 devices, its frozen
  reference a little away from the policy, as build.build_config makes them
  (`mesh_shape`: config.mesh.shape; tests/models/test_context.py splits the
  sequence too)."""
  built, state = built_state(tiny_config(**{
      "mesh.shape": mesh_shape, "reference.mode": "frozen", "optim.warmup_steps": 1,
      "total_steps": 10, "logprob_chunk_size": 16}))
  mesh, rules, graphdef = built.mesh, built.run_spec.rules, built.graphdef
  # A reference a little away from the policy, so ref log-probs differ from the policy's.
  ref = jax.tree.map(lambda x: x * 1.1, state.ref_params)
  return mesh, rules, graphdef, state.replace(ref_params=ref)


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




@functools.lru_cache(maxsize=None)
def _logps_and_vjp(mesh_shape=(1, 8, 1)):
  """jit((params, frozen, ref, batch, cotangent) -> policy [B, S] logps, counts, ref logps,
  and the policy gradient of <cotangent, logps>): the step's batch_logps, both layouts."""
  mesh, rules, graphdef, state = _setup(mesh_shape)
  axes = sharding.batch_axes(rules)

  def fn(params, frozen, ref_params, batch, cotangent):
    policy = lambda p: step_lib.batch_logps(graphdef, p, frozen, batch, chunk_size=16,
                                            batch_axes=axes)
    (logps, counts), vjp = jax.vjp(policy, params)
    ref, _ = step_lib.batch_logps(graphdef, ref_params, frozen, batch, chunk_size=16,
                                  batch_axes=axes)
    (grads,) = vjp((cotangent, np.zeros(counts.shape, jax.dtypes.float0)))
    return logps, counts, ref, grads

  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _wild_batches():
  rng = np.random.default_rng(3)
  padded = _wild_batch(rng, B, S, group_padding=True)
  return padded, _pack(padded, 8)   # one group per device, 2 examples each


@functools.lru_cache(maxsize=None)
def _layout_values(layout: str, loss_name: str, mesh_shape=(1, 8, 1)):
  """(loss, metrics, grads) of one step of `loss_name` on the padded or packed layout,
  sharded on 8 devices: the policy and frozen-reference forwards, the loss, and the
  gradient through the log-probs."""
  mesh, rules, graphdef, state = _setup(mesh_shape)
  padded, packed = _wild_batches()
  host = {"padded": padded, "packed": packed}[layout]
  spec = losses.get(loss_name)
  extra = _extras(np.random.default_rng(4), loss_name, B, S)
  call = step_lib.make_loss_call(spec, {n: 0.1 for n in spec.required_hparams()})
  loss_state = spec.init_state() if spec.init_state else None
  fn = _logps_and_vjp(mesh_shape)
  with jax.set_mesh(mesh):
    batch = sharding.host_to_global(host, sharding.batch_sharding(mesh, rules))
    zero = np.zeros((B, S), np.float32)   # host cotangents: one compile for both calls
    logps, counts, ref, _ = fn(state.params, state.frozen, state.ref_params, batch, zero)

    def objective(lp):
      inputs = losses.LossInputs(logps=lp, ref_logps=ref, lengths=counts, batch=extra)
      loss, metrics, _ = call(inputs, loss_state)
      return loss, metrics

    (loss, metrics), d_logps = jax.jit(jax.value_and_grad(objective, has_aux=True))(logps)
    grads = fn(state.params, state.frozen, state.ref_params, batch, np.asarray(d_logps))[3]
  return jax.device_get((loss, metrics, grads, logps, counts, ref))


def test_packed_logps_equal_padded_logps():
  a, b = _layout_values("padded", "sft"), _layout_values("packed", "sft")
  for x, y in zip(a[3:], b[3:]):   # policy logps, counts, reference logps: [B, S]
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
  assert (a[4][::2, -1] == 0).all()          # padding slots score nothing


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_packed_loss_metrics_and_gradients_equal_padded(loss_name):
  padded = _layout_values("padded", loss_name)
  packed = _layout_values("packed", loss_name)
  np.testing.assert_allclose(packed[0], padded[0], rtol=1e-5, atol=1e-6)
  assert set(packed[1]) == set(padded[1])
  for k in padded[1]:
    np.testing.assert_allclose(packed[1][k], padded[1][k], rtol=1e-5, atol=1e-5, err_msg=k)
  for x, y in zip(jax.tree.leaves(padded[2]), jax.tree.leaves(packed[2])):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


@functools.lru_cache(maxsize=None)
def _step_fn(hparams: tuple, accum: int, mesh_shape=(1, 8, 1)):
  """(the jitted DPO step with `hparams` over `accum` micro-batches on _setup's
  `mesh_shape`, its optimizer), one per triple: layouts and sources of the same shapes
  share its compiled executable.

  The step unit itself, bound to the builder's graph and state with SGD(1): the
  recipe's AdamW would not test the update (its first step runs at warm-up lr 0, and
  Adam's first update g / (|g| + eps) turns float noise in tiny gradients into
  whole steps), while with SGD equal new params mean equal gradients."""
  mesh, rules, graphdef, state = _setup(mesh_shape)
  tx = optax.sgd(1.0)
  state = state.replace(opt_state=tx.init(state.params))
  call = step_lib.make_loss_call(losses.get("dpo"), dict(hparams))
  fn = step_lib.jit_train_step(
      graphdef=graphdef, tx=tx, schedule=optax.constant_schedule(1.0), loss_call=call,
      chunk_size=16, accum_steps=accum, skip_nonfinite=False,
      state_shardings=jax.tree.map(lambda x: x.sharding, state),
      batch_sharding=sharding.batch_sharding(mesh, rules),
      replicated=sharding.replicated(mesh))
  return fn, tx


@functools.lru_cache(maxsize=None)
def _step_values(source: str, layout: str, hparams: tuple = (("beta", 0.1),),
                 gaps: bool = False, mesh_shape=(1, 8, 1)):
  """(new params, metrics) of the whole jitted DPO step (frozen reference, metrics,
  update) on 8 devices, from 32 examples of 2 sequences: `source` "wild"
  (_wild_batch) or "shared" (_shared_prompt_batch, one prompt per example), laid
  out "padded" in one micro-batch, or "packed" / "packed_shared" in 16 groups /
  "shared" (a KV-cached prompt), each over 2 micro-batches. `gaps`: some
  responses have unscored tokens inside (_with_gaps). `mesh_shape`: _setup's."""
  mesh, rules, graphdef, state = _setup(mesh_shape)
  rng = np.random.default_rng(5)
  padded = _wild_batch(rng, 32, 2) if source == "wild" else _shared_prompt_batch(rng, 32, 2)
  if gaps:
    padded = _with_gaps(np.random.default_rng(7), padded)
  host, accum = {
      "padded": lambda: (padded, 1),
      "packed": lambda: (_pack(padded, 16), 2),
      "packed_shared": lambda: (_pack_shared(padded, 16, 16), 2),
      "shared": lambda: (packing.make_sharer(prompt_length=8, max_length=T)(padded), 2),
  }[layout]()
  fn, tx = _step_fn(hparams, accum, mesh_shape)
  state = state.replace(opt_state=tx.init(state.params))
  with jax.set_mesh(mesh):
    new, metrics = fn(jax.tree.map(jnp.copy, state),
                      sharding.host_to_global(host, sharding.batch_sharding(mesh, rules)))
  return jax.device_get((new.params, metrics))


def _assert_steps_equal(a, b):
  (p1, m1), (p2, m2) = a, b
  assert set(m1) == set(m2)
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["packed", "packed_shared"])
def test_packed_accumulated_train_step_equals_padded_step(layout):
  """The whole jitted step on 8 devices: packed in 16 groups split over 2
  micro-batches == padded in one (packed_shared: rows of units of one prompt and
  its two responses)."""
  source = "wild" if layout == "packed" else "shared"
  padded = _step_values(source, "padded")
  assert {"logits/chosen", "logits/rejected"} <= set(padded[1])   # compared with the rest
  _assert_steps_equal(padded, _step_values(source, layout))


# --- data.share_prompt -----------------------------------------------------------------
def _shared_prompt_batch(rng, b, s):
  """[b, s, T]: one prompt per example (1..6 tokens), responses of 1..T-prompt tokens,
  the last sequence of every other example a padding slot."""
  tokens = np.zeros((b, s, T), np.int32)
  attention = np.zeros((b, s, T), np.int32)
  loss_mask = np.zeros((b, s, T), np.int32)
  for i in range(b):
    n = int(rng.integers(1, 7))
    prompt = rng.integers(4, VOCAB, size=n)
    for j in range(s):
      if i % 2 == 0 and j == s - 1:
        continue
      m = int(rng.choice([1, 2, T - n]))
      tokens[i, j, :n], tokens[i, j, n:n + m] = prompt, rng.integers(4, VOCAB, size=m)
      attention[i, j, :n + m] = 1
      loss_mask[i, j, n:n + m] = 1
  return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


def _pack_shared(batch, num_groups, row_length, buckets=None):
  b, s, _ = batch["tokens"].shape
  full = b // num_groups * s
  spec = packing.PackSpec(num_groups=num_groups, row_length=row_length,
                          buckets=buckets or tuple(range(1, full + 1)))
  return packing.pack_shared_batch(batch, spec)


@functools.lru_cache(maxsize=None)
def _shared_values(layout: str, loss_name: str):
  mesh, rules, graphdef, state = _setup()
  padded = _shared_prompt_batch(np.random.default_rng(6), B, S)
  if layout == "padded":
    host = padded
  elif layout == "shared":
    host = packing.make_sharer(prompt_length=8, max_length=T)(padded)
  else:   # "packed_shared": packed rows of 16 holding one prompt and its responses per unit
    host = _pack_shared(padded, 8, 16)
  spec = losses.get(loss_name)
  extra = _extras(np.random.default_rng(4), loss_name, B, S)
  call = step_lib.make_loss_call(spec, {n: 0.1 for n in spec.required_hparams()})
  fn = _logps_and_vjp()
  with jax.set_mesh(mesh):
    batch = sharding.host_to_global(host, sharding.batch_sharding(mesh, rules))
    logps, counts, ref, _ = fn(state.params, state.frozen, state.ref_params, batch,
                               np.zeros((B, S), np.float32))

    def objective(lp):
      inputs = losses.LossInputs(logps=lp, ref_logps=ref, lengths=counts, batch=extra)
      loss, metrics, _ = call(inputs, None)
      return loss, metrics

    (loss, metrics), d_logps = jax.jit(jax.value_and_grad(objective, has_aux=True))(logps)
    grads = fn(state.params, state.frozen, state.ref_params, batch, np.asarray(d_logps))[3]
  return jax.device_get((loss, metrics, grads, logps, counts, ref))


@pytest.mark.parametrize("layout,loss_name", [("shared", "dpo"), ("shared", "grao"),
                                             ("packed_shared", "dpo"),
                                             ("packed_shared", "grao"),
                                             ("packed_shared", "d2o")])
def test_shared_prompt_equals_separate_sequences(layout, loss_name):
  """Pairs (DPO reads sequences 0, 1) and groups (GRAO, D2O, with padding slots): the
  prompt once + responses (a KV cache, or packed rows of units) == each sequence on
  its own, on 8 devices: policy and frozen-reference log-probs, counts, loss,
  metrics, gradients."""
  a, b = _shared_values("padded", loss_name), _shared_values(layout, loss_name)
  for x, y in zip(a[3:], b[3:]):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b[0], a[0], rtol=1e-5, atol=1e-6)
  for k in a[1]:
    np.testing.assert_allclose(b[1][k], a[1][k], rtol=1e-5, atol=1e-5, err_msg=k)
  for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2])):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_share_prompt_refuses_examples_with_different_prompts():
  batch = _wild_batch(np.random.default_rng(0), 4, 2)
  with pytest.raises(ValueError, match="another prompt"):
    packing.make_sharer(prompt_length=8, max_length=T)(batch)


def test_packed_shared_layout():
  """Units of one prompt and its responses: every response token once, in its slot,
  positions continuing after the prompt, the prompt's last token predicting each
  response's first; long examples split (prompt repeated), rows ending in padding."""
  padded = _shared_prompt_batch(np.random.default_rng(6), B, S)
  L = 16
  packed = _pack_shared(padded, 8, L)
  G, R, _ = packed["packed_tokens"].shape
  per = B // G
  lengths = padded["attention_mask"].sum(-1)
  prompts = padded["attention_mask"][:, 0].sum(-1) - padded["loss_mask"][:, 0].sum(-1)
  assert R < per * S and (packed["packed_attention_mask"][..., -1] == 0).any()
  assert packed["packed_attention_mask"].sum() < lengths.sum()    # prompts once per unit
  for g in range(G):
    flat = {k: packed[k][g].reshape(-1) for k in ("packed_tokens", "packed_slot",
                                                    "packed_positions", "packed_part_ids",
                                                    "packed_loss_mask")}
    for local in range(per * S):
      b, s = g * per + local // S, local % S
      p, n = int(prompts[b]), int(lengths[b, s])
      at = np.nonzero(flat["packed_slot"] == local)[0]
      assert len(at) == max(n - p, 0)
      if n == 0:
        assert packed["packed_first_loss"][g, local] == 0
        continue
      np.testing.assert_array_equal(flat["packed_tokens"][at], padded["tokens"][b, s, p:n])
      np.testing.assert_array_equal(flat["packed_positions"][at], np.arange(p, n))
      assert (flat["packed_part_ids"][at] == s + 1).all()
      assert flat["packed_loss_mask"][at[0]] == 0 and flat["packed_loss_mask"][at[1:]].all()
      last = packed["packed_first_index"][g, local]
      assert flat["packed_tokens"][last] == padded["tokens"][b, s, p - 1]
      assert flat["packed_positions"][last] == p - 1 and flat["packed_part_ids"][last] == 0
      assert packed["packed_first_token"][g, local] == padded["tokens"][b, s, p]
  # Example 0 (three responses of 12 - p tokens) does not fit one row: split units.
  assert len({int(x) // L for x in packed["packed_first_index"][0, :3]}) == 3


def test_packed_shared_buckets_fit_units():
  padded = _shared_prompt_batch(np.random.default_rng(6), B, S)
  lengths = padded["attention_mask"].sum(-1)
  prompts = packing.example_prompt_lengths(
      [{k: padded[k][i] for k in padded} for i in range(B)])
  need = packing.rows_needed(lengths, 8, 16, prompts)
  assert need == _pack_shared(padded, 8, 16)["packed_tokens"].shape[1]
  assert need <= (B // 8) * S   # the largest bucket (one response per row) always fits


def test_part_ids_run_on_splash_and_cudnn():
  from jaxalign.models import attention
  for impl, platform in (("splash", "tpu"), ("cudnn", "gpu")):
    assert attention.choose(impl, platform, seq_len=256, kv_len=256, dtype="bfloat16",
                            softcap=None, decode=False, parts=True) == (impl, None)


# --- per-sequence loss columns (LD-DPO's tail_logps, WPO's wpo_logps) -------------------
def _with_gaps(rng, batch):
  """`batch` with one scored token past the first unscored in about half the responses
  of 3+ scored tokens (an unscored token inside a response), prompts kept."""
  loss_mask = batch["loss_mask"].copy()
  for idx in np.ndindex(loss_mask.shape[:2]):
    scored = np.nonzero(loss_mask[idx])[0]
    if len(scored) >= 3 and rng.uniform() < 0.5:
      loss_mask[idx][rng.choice(scored[1:])] = 0
  return {**batch, "loss_mask": loss_mask}


# The last three: the per-token metrics' sums (the step's logits/chosen, logits/rejected,
# mean_token_accuracy, entropy), no gradient.
COLUMN_NAMES = ("tail_logps", "wpo_logps", "unscored_logps", "unscored_lengths",
                "token_logit_means", "token_top1", "token_entropies")


@functools.lru_cache(maxsize=None)
def _column_values(source: str, layout: str):
  """Jitted, on one device (no mesh): policy logps, counts, {column: [B, S]} and the gradient
  of <c, logps> + sum_k <c_k, column_k> (fixed random cotangents) from batch_logps,
  on [16, 4] batches with padding slots and gaps (_wild_batch for "wild", one
  prompt per example for "shared"), in `layout`."""
  _, _, graphdef, state = _setup()
  params, frozen = jax.device_get((state.params, state.frozen))
  rng = np.random.default_rng(8)
  if source == "wild":
    padded = _wild_batch(rng, B, S, group_padding=True)
  else:
    padded = _shared_prompt_batch(rng, B, S)
  padded = _with_gaps(rng, padded)
  host = {
      "padded": lambda: padded,
      "packed": lambda: _pack(padded, 8),
      "packed_shared": lambda: _pack_shared(padded, 8, 16),
      "shared": lambda: packing.make_sharer(prompt_length=8, max_length=T)(padded),
  }[layout]()
  cot = np.random.default_rng(9).normal(size=(1 + len(COLUMN_NAMES), B, S)).astype(np.float32)

  def policy(p):
    logps, counts, cols = step_lib.batch_logps(graphdef, p, frozen, host, chunk_size=16,
                                               columns=COLUMN_NAMES)
    value = (cot[0] * logps).sum() + sum((c * cols[k]).sum()
                                         for c, k in zip(cot[1:], COLUMN_NAMES))
    return value, (logps, counts, cols)

  grads, (logps, counts, cols) = jax.jit(jax.grad(policy, has_aux=True))(params)
  return padded, jax.device_get((logps, counts, cols, grads))


@pytest.mark.parametrize("source,layout", [("wild", "packed"), ("shared", "packed_shared"),
                                           ("shared", "shared")])
def test_columns_equal_padded_columns(source, layout):
  """tail_logps, wpo_logps and ORPO's unscored_logps / unscored_lengths (the prompt
  and the gaps), the per-token metrics' sums (mean logit, argmax hits, entropy), and
  the gradient through them, of packed rows (the shared layout:
  each response's first token scored from the prompt's last state, the prompt once
  per unit) and of KV-cached shared prompts == the padded layout's, on sequences of
  1 to 11 scored tokens with gaps and empty slots."""
  padded, want = _column_values(source, "padded")
  _, got = _column_values(source, layout)
  for k in COLUMN_NAMES:
    np.testing.assert_allclose(got[2][k], want[2][k], rtol=1e-5, atol=1e-5, err_msg=k)
  for x, y in zip(want[:2], got[:2]):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
  for x, y in zip(jax.tree.leaves(want[3]), jax.tree.leaves(got[3])):   # entries up to ~10
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
  # The batches exercise what the tail depends on: a pair of different lengths,
  # an empty slot (the whole sequence is tail), and tokens past a gap.
  counts = want[1]
  assert (counts.min(1) == 0).any() and (counts.max(1) > counts.min(1) + 3).any()
  assert np.any(want[2]["tail_logps"] != 0) and np.any(want[2]["tail_logps"] == 0)
  # Unscored: every non-empty sequence has its prompt, padding slots have nothing.
  real = padded["attention_mask"].astype(bool)
  np.testing.assert_array_equal(want[2]["unscored_lengths"],
                                (real[..., 1:] & real[..., :-1]).sum(-1) - counts)
  assert (want[2]["unscored_lengths"][counts == 0] == 0).all()
  # The metrics' sums: hits are whole counts, empty slots sum nothing.
  top1 = want[2]["token_top1"]
  assert (top1 == np.round(top1)).all() and (top1 <= counts).all() and top1.sum() > 0
  for k in ("token_logit_means", "token_top1", "token_entropies"):
    assert (want[2][k][counts == 0] == 0).all()
  scored = padded["loss_mask"].sum(-1)
  span = (np.argmax(np.cumsum(padded["loss_mask"], -1), -1)     # last scored - first + 1
          - np.argmax(padded["loss_mask"], -1) + 1)
  assert ((scored > 0) & (scored < span)).any()


# LD-DPO and WPO in one loss: one compiled step per layout reads both columns.
LD_WPO = (("beta", 0.1), ("ld_alpha", 0.5), ("use_weighting", True))


@pytest.mark.parametrize("source,layout", [("wild", "packed"), ("shared", "packed_shared"),
                                           ("shared", "shared")])
def test_column_losses_train_step_equals_padded_step(source, layout):
  """LD-DPO (ld_alpha: policy and frozen-reference tails) with WPO (use_weighting):
  the whole jitted step on 8 devices, 2 micro-batches, packed / packed shared /
  shared prompt == padded: loss, metrics, updated params."""
  padded = _step_values(source, "padded", LD_WPO, gaps=True)
  _assert_steps_equal(padded, _step_values(source, layout, LD_WPO, gaps=True))
  # Each column changes the step: it differs from plain DPO's and from either alone.
  for hparams in ((("beta", 0.1),), LD_WPO[:2], LD_WPO[::2]):
    other = _step_values(source, "padded", hparams, gaps=True)
    assert abs(other[1]["loss"] - padded[1]["loss"]) > 1e-5, hparams   # float noise ~1e-7


# --- packed shared prompts on the splash kernel ----------------------------------------
@functools.lru_cache(maxsize=None)
def _splash_shared_step(attention: str):
  """(new params, metrics) of one jitted DPO step (SGD(1), precomputed reference) of a
  1-layer model on one device, on 6 examples packed as shared-prompt units into rows
  of 128 tokens (the splash kernel's block), with `attention` "xla" or "splash"
  (Pallas interpret mode on CPU)."""
  t = 128
  built, state = built_state(tiny_config(**{
      "model.attention": attention, "model.overrides.max_seq_len": t,
      "data.max_length": t, "data.max_prompt_length": 64, "data.batch_size": 6,
      "mesh.shape": (1, 1, 1), "reference.mode": "precompute"}), jax.devices()[:1])
  rng = np.random.default_rng(8)
  tokens = np.zeros((6, 2, t), np.int32)
  attention_mask, loss_mask = np.zeros_like(tokens), np.zeros_like(tokens)
  for i in range(6):
    p = int(rng.integers(5, 40))
    prompt = rng.integers(4, VOCAB, size=p)
    for j in range(2):
      m = int(rng.integers(3, 60))
      tokens[i, j, :p], tokens[i, j, p:p + m] = prompt, rng.integers(4, VOCAB, size=m)
      attention_mask[i, j, :p + m], loss_mask[i, j, p:p + m] = 1, 1
  padded = {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "ref_logps": rng.normal(-40, 5, size=(6, 2)).astype(np.float32)}
  host = packing.pack_shared_batch(padded, packing.PackSpec(num_groups=1, row_length=t,
                                                            buckets=tuple(range(1, 13))))
  assert host["packed_tokens"].shape[1] < 12      # several units share a row
  tx = optax.sgd(1.0)
  state = state.replace(opt_state=tx.init(state.params))
  mesh, rules = built.mesh, built.run_spec.rules
  fn = step_lib.jit_train_step(
      graphdef=built.graphdef, tx=tx, schedule=optax.constant_schedule(1.0),
      loss_call=step_lib.make_loss_call(losses.get("dpo"), {"beta": 0.1}),
      chunk_size=16, accum_steps=1, skip_nonfinite=False,
      state_shardings=jax.tree.map(lambda x: x.sharding, state),
      batch_sharding=sharding.batch_sharding(mesh, rules),
      replicated=sharding.replicated(mesh))
  with jax.set_mesh(mesh):
    new, metrics = fn(state, sharding.host_to_global(host, sharding.batch_sharding(mesh, rules)))
  return jax.device_get((new.params, metrics))


def test_packed_shared_splash_step_equals_xla_step():
  """The packed + shared-prompt train step on the splash kernel (two passes merged by
  their log-sum-exps, jaxalign.models.splash_parts) == the same step on the XLA
  reference: loss, every metric, the SGD(1) update (= the gradients)."""
  _assert_steps_equal(_splash_shared_step("xla"), _splash_shared_step("splash"))
