"""jaxalign.models.grouped_matmul: the megablox kernel equals ragged_dot, in values and gradients.

References, none of them our own code: `jax.lax.ragged_dot` (XLA's grouped
matmul) and a float64 NumPy loop over the groups. The kernel is Google's Pallas
megablox gmm/tgmm, run on CPU in Pallas interpret mode; our part is the
padding of M to the row tile, the zeroed rows past the groups (which the
kernel leaves unwritten) and the VJP that wires gmm and tgmm together.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import grouped_matmul as gm


def numpy_grouped(lhs, rhs, group_sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(np.asarray(group_sizes)):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


# Row counts off the tile (200), groups empty at the start, middle and end, and
# rows past the groups' sum (200 - 170 = 30 trailing rows must come out zero).
@pytest.mark.parametrize("group_sizes", [(0, 90, 0, 80, 0), (200, 0, 0, 0, 0)])
def test_megablox_equals_ragged_dot_values_and_gradients(group_sizes):
  M, K, N = 200, 128, 256
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(k1, (M, K), jnp.float32)
  rhs = jax.random.normal(k2, (len(group_sizes), K, N), jnp.float32)
  cot = jax.random.normal(k3, (M, N), jnp.float32)
  sizes = jnp.asarray(group_sizes, jnp.int32)

  def loss(impl):
    return lambda a, b: jnp.sum(gm.grouped_matmul(a, b, sizes, implementation=impl) * cot)

  with jax.default_matmul_precision("highest"):
    out = gm.grouped_matmul(lhs, rhs, sizes, implementation="megablox")
    ref = gm.grouped_matmul(lhs, rhs, sizes, implementation="ragged_dot")
    grads = jax.grad(loss("megablox"), argnums=(0, 1))(lhs, rhs)
    ref_grads = jax.grad(loss("ragged_dot"), argnums=(0, 1))(lhs, rhs)
  np.testing.assert_allclose(ref, numpy_grouped(lhs, rhs, sizes), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(out)[sum(group_sizes):] == 0)
  for g, r in zip(grads, ref_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(grads[0])[sum(group_sizes):], 0)
  empty = [g for g, s in enumerate(group_sizes) if s == 0]
  np.testing.assert_array_equal(np.asarray(grads[1])[empty], 0)


def test_bfloat16_kernel_accumulates_in_float32():
  M, K, N = 128, 256, 128
  k1, k2 = jax.random.split(jax.random.key(1))
  lhs = jax.random.normal(k1, (M, K), jnp.bfloat16)
  rhs = jax.random.normal(k2, (2, K, N), jnp.bfloat16)
  sizes = jnp.asarray([60, 68], jnp.int32)
  out = gm.grouped_matmul(lhs, rhs, sizes, implementation="megablox")
  ref = gm.grouped_matmul(lhs, rhs, sizes, implementation="ragged_dot")
  assert out.dtype == ref.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2e-2, atol=2e-2)


def test_auto_resolution_and_fallbacks_with_one_logged_line(caplog):
  assert gm.resolve("auto", "tpu") == "megablox"
  assert gm.resolve("auto", "gpu") == gm.resolve("auto", "cpu") == "ragged_dot"
  with pytest.raises(ValueError, match="ragged_dot"):
    gm.check_implementation("pallas")
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert gm.choose("auto", "tpu", k=2048, n=768, lhs_dtype=bf16, rhs_dtype=bf16) == (
      "megablox", None)
  impl, why = gm.choose("megablox", "tpu", k=64, n=128, lhs_dtype=f32, rhs_dtype=f32)
  assert impl == "ragged_dot" and "K=64" in why
  impl, why = gm.choose("megablox", "tpu", k=128, n=128, lhs_dtype=bf16, rhs_dtype=f32)
  assert impl == "ragged_dot" and "one dtype" in why
  # K = 64 cannot run the kernel: ragged_dot's result, one warning for two calls.
  lhs = jnp.ones((16, 64), jnp.float32)
  rhs = jnp.ones((2, 64, 128), jnp.float32)
  sizes = jnp.asarray([10, 6], jnp.int32)
  gm._logged.clear()
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    for _ in range(2):
      out = gm.grouped_matmul(lhs, rhs, sizes, implementation="megablox")
  np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, sizes))
  lines = [r for r in caplog.records if "moe_kernel=megablox" in r.getMessage()]
  assert len(lines) == 1


def test_tiles_read_each_operand_as_few_times_as_fit_in_vmem():
  """Qwen3-30B-A3B's expert shapes (D 2048, F 768), bf16: the forward reads the rows
  once (tn = N) with the widest K tile that fits; the weight gradient balances its
  lhs and rhs re-reads; every choice within VMEM_BUDGET (by the kernel's blocks)."""
  assert gm.tiling(81920, 2048, 768) == (512, 1024, 768)       # gate / up: 1 lhs read
  assert gm.tiling(81920, 768, 2048) == (512, 384, 2048)       # down: tn 2048 fits at tk 384
  assert gm.tiling(81920, 2048, 768, kind="tgmm") == (512, 1024, 768)
  assert gm.tiling(81920, 768, 2048, kind="tgmm") == (512, 768, 1024)
  assert gm.tiling(200, 2048, 768) == (256, 2048, 768)          # small row tile: wider K
  assert gm.tiling(100, 128, 128) == (128, 128, 128)
  for m, k, n, size in ((81920, 2048, 768, 2), (81920, 768, 2048, 2), (4096, 2048, 768, 4)):
    tm, tk, tn = gm.tiling(m, k, n, itemsize=size)
    assert 2 * (tm * tk + tk * tn + tm * tn) * size + 4 * tm * tn <= gm.VMEM_BUDGET
    assert k % tk == 0 and n % tn == 0
  # The byte estimate, by hand (megablox's formula): gate over 81,920 rows of 2048,
  # 32 experts: rows read once (tn = 768 = N), one expert's weight per row tile the
  # grid visits (160 + 31), the output.
  assert gm.estimated_bytes(81920, 2048, 768, 32) == 2 * (
      81920 * 2048 + 2048 * 768 * (160 + 31) + 81920 * 768)
  # tgmm, down's weight gradient: lhs [R, 768] once per N tile (2048 / 1024), rhs
  # [R, 2048] once per K tile (768 / 768), the [32, 768, 2048] output.
  assert gm.estimated_bytes(81920, 768, 2048, 32, kind="tgmm") == 2 * (
      81920 * 768 * 2 + 81920 * 2048 + 32 * 768 * 2048)


@pytest.mark.tpu
def test_kernel_calls_compile_for_a_tpu_chip_and_xla_counts_the_estimated_bytes():
  """Compiled for one v5p chip (libtpu, no TPU needed): the chosen tiles fit the
  kernel's VMEM, and XLA's byte count of each call is `estimated_bytes` (plus under
  1%: 6 MB more on the 1 GB of a forward call, from the ops around the kernel)."""
  from jaxalign import plan as plan_lib
  dev = plan_lib.tpu_devices("v5p:2x2x1")[0]
  sh = jax.sharding.SingleDeviceSharding(dev)
  bf = jnp.bfloat16
  spec = lambda shape, dt=bf: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  m, groups = 81920, 32
  for k, n in ((2048, 768), (768, 2048)):
    for kind in ("gmm", "tgmm"):
      tiles = gm.tiling(m, k, n, kind=kind)
      if kind == "gmm":
        fn = lambda a, b, g, t=tiles: gm._backend().gmm(a, b, g, bf, t)
        args = (spec((m, k)), spec((groups, k, n)), spec((groups,), jnp.int32))
      else:
        fn = lambda a, b, g, t=tiles: gm._backend().tgmm(a.swapaxes(0, 1), b, g, bf, t)
        args = (spec((m, k)), spec((m, n)), spec((groups,), jnp.int32))
      with gm._kernel_precision(bf):    # the suite's "highest" precision: not for bf16
        cost = plan_lib._cost(jax.jit(fn).lower(*args).compile())
      expected = gm.estimated_bytes(m, k, n, groups, kind=kind)
      assert expected <= cost["bytes accessed"] <= 1.01 * expected, (k, n, kind)
