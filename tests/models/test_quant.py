"""A quantized frozen base (QLoRA, models/quant.py): the formats' error bounds, the
NF4 level choice, host and device quantizers agreeing, the LoRA step on the quantized
base equal to the step on the explicitly dequantized base, and validation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import config as config_lib, sharding
from jaxalign.models import quant
from tests.train.helpers import built_state, random_batch, tiny_config

# d_model, head_dim and d_ff multiples of the block (64); mesh (4, 1, 2): the "tensor"
# axis splits d_ff's 2 blocks, and no axis splits d_model's single block.
QLORA_MODEL = dict(vocab_size=32, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2,
                   head_dim=64, d_ff=128, max_seq_len=16)


def _weights(rng, shape=(6, 256)):
  """Normal weights with an outlier, a block of zeros and a constant block."""
  w = rng.normal(size=shape).astype(np.float32)
  w[0, 3] = 40.0
  w[1, :64] = 0.0
  w[2, 64:128] = -0.5
  return w


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("axis", [-1, 0])
def test_quantize_dequantize_error_within_the_format_bound(fmt, axis):
  """Blocks along the last axis, or along the first (the weight transposed: the same
  blocks, so the same figures)."""
  w = _weights(np.random.default_rng(0))
  t = (lambda a: a) if axis == -1 else (lambda a: np.swapaxes(a, 0, 1))
  codes, scale = jax.jit(lambda a: quant.quantize(a, fmt, axis=axis))(t(w))
  assert codes.dtype == (jnp.int8 if fmt == "int8" else jnp.uint8)
  assert t(codes).shape == (6, 256 if fmt == "int8" else 128) and t(scale).shape == (6, 4)
  back = t(np.asarray(jax.jit(lambda c, s: quant.dequantize(c, s, fmt, axis=axis))(
      codes, scale)))
  scale = t(scale)
  err = np.abs(back - w).reshape(6, 4, 64)
  # int8 absmax: <= s/2 per entry; nf4: <= half the widest level gap x block absmax;
  # both up to float32 rounding of the division and product.
  bound = np.asarray(quant.error_bound(fmt, scale))[..., None]
  assert (err <= bound * (1 + 1e-6) + 1e-7).all(), (err - bound).max()
  absmax = np.abs(w).reshape(6, 4, 64).max(-1)
  np.testing.assert_array_equal(np.abs(back).reshape(6, 4, 64).max(-1), absmax)  # exact
  np.testing.assert_array_equal(back[1, :64], 0.0)
  np.testing.assert_allclose(back[2, 64:128], -0.5, rtol=1e-7)
  # Beyond the bound: the quantization is fine enough to matter (and not exact).
  rel = np.abs(back - w).mean() / np.abs(w).mean()
  assert 0 < rel < (0.01 if fmt == "int8" else 0.15), rel


def test_nf4_packs_a_blocks_halves_into_one_byte_along_the_block_axis():
  """Byte j of a block holds entry j (high nibble) and entry j + 32 (low): along a
  middle axis, the other axes untouched."""
  levels = np.arange(64, dtype=np.int64) % 16                       # one entry per level index
  w = (quant.NF4_LEVELS[levels][None, :, None] * np.float32([1, 2, 3])).astype(np.float32)
  codes, scale = quant.quantize(np.repeat(w, 2, axis=0), "nf4", axis=1, xp=np)
  assert codes.shape == (2, 32, 3) and scale.shape == (2, 1, 3)
  np.testing.assert_array_equal(codes[:, :, 0] >> 4, np.tile(levels[:32], (2, 1)))
  np.testing.assert_array_equal(codes[:, :, 2] & 0xF, np.tile(levels[32:], (2, 1)))
  np.testing.assert_array_equal(scale[0, 0], [1, 2, 3])


def test_nf4_picks_the_nearest_of_the_sixteen_levels():
  """Against a brute-force nearest level of w / absmax (the paper's definition)."""
  w = _weights(np.random.default_rng(1))
  codes, scale = jax.jit(lambda a: quant.quantize(a, "nf4"))(w)
  blocks = w.reshape(6, 4, 64)
  absmax = np.abs(blocks).max(-1, keepdims=True)
  x = blocks / np.where(absmax > 0, absmax, 1)
  gaps = np.abs(x[..., None] - quant.NF4_LEVELS)                 # [6, 4, 64, 16]
  want = quant.NF4_LEVELS[gaps.argmin(-1)] * absmax
  got = np.asarray(jax.jit(lambda c, s: quant.dequantize(c, s, "nf4"))(codes, scale))
  got = got.reshape(6, 4, 64)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  assert len(quant.NF4_LEVELS) == 16 and quant.NF4_LEVELS[7] == 0.0   # an exact zero


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("axis", [-1, -3])
def test_host_and_device_quantizers_give_the_same_codes(fmt, axis):
  """The import quantizes on the host (numpy), an init on device (jit): same bits."""
  w = _weights(np.random.default_rng(2), (128, 8, 128)) * np.float32(0.037)
  host = quant.quantize(w, fmt, axis=axis, xp=np)
  device = jax.jit(lambda a: quant.quantize(a, fmt, axis=axis))(jnp.asarray(w))
  for h, d in zip(host, device):
    assert h.dtype == d.dtype
    np.testing.assert_array_equal(h, np.asarray(d))


def _qlora_config(fmt, **overrides):
  c = tiny_config(**{"lora.rank": 4, "lora.alpha": 8.0,
                     "lora.targets": ("q", "o", "up", "down"), "lora.base_dtype": fmt,
                     "reference.mode": "frozen", "mesh.shape": (4, 1, 2), **overrides})
  c.model.overrides = ml_collections.ConfigDict(QLORA_MODEL)
  c.model.scan_layers = True
  return c


def _assert_same_steps(first, *others, keys):
  """(metrics, params) of runs of the same steps: the metrics `keys` and every param
  of each of `others` equal `first`'s to float rounding; the gradient is not zero."""
  mq, pq = first
  for mo, po in others:
    for key in keys:
      np.testing.assert_allclose(mq[key], mo[key], rtol=2e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(pq), jax.tree.leaves(po)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
  assert mq["grad_norm"] > 0


def test_quantized_base_step_equals_the_step_on_the_dequantized_base():
  """Two LoRA steps (policy and adapters-off reference) on the NF4 base equal the steps
  of a float-base LoRA run whose frozen base is the explicitly dequantized weights
  (int8 shares every line but `dequantize`'s first, covered above)."""
  fmt = "nf4"
  jax.config.update("jax_default_matmul_precision", "highest")
  try:
    # One device: the sharded layout is checked by the import test (tests/train/test_qlora.py).
    one = {"mesh.shape": (1, 1, 1)}
    built_q, state_q = built_state(_qlora_config(fmt, **one), jax.devices()[:1])
    built_f, state_f = built_state(_qlora_config("", **one), jax.devices()[:1])
    assert {p[-1] for p, _ in nnx.to_flat_state(state_q.frozen)} >= {"codes", "scale"}
    dequantized = jax.jit(lambda f: quant.dequantize_state(f, jnp.float32),
                          out_shardings=built_f.state_shardings.frozen)(state_q.frozen)
    state_f = state_f.replace(frozen=dequantized)
    # Same seed: the same adapters; the quantized base differs from the float init.
    for a, b in zip(jax.tree.leaves(state_q.params), jax.tree.leaves(state_f.params)):
      np.testing.assert_array_equal(a, b)
    batch = random_batch(np.random.default_rng(0))
    out = []
    for built, state in ((built_q, state_q), (built_f, state_f)):
      with jax.set_mesh(built.mesh):
        for _ in range(2):   # the second step has nonzero B: adapters in the forward
          state, metrics = built.step_fn(state, batch)
        out.append((jax.device_get(metrics), jax.device_get(state.params)))
    _assert_same_steps(*out, keys=("loss", "grad_norm", "rewards/margins", "logps/chosen"))
  finally:
    jax.config.update("jax_default_matmul_precision", None)


@pytest.mark.parametrize("overrides, message", [
    ({"lora.base_dtype": "nf2"}, "config.lora.base_dtype: 'nf2'"),
    ({"lora.base_dtype": "nf4", "lora.rank": 0}, "config.lora.base_dtype: 'nf4' .*lora.rank"),
    ({"lora.base_dtype": "int8", "model.overrides.head_dim": 48, "model.overrides.n_heads": 2},
     r"config.lora.base_dtype: .*model.head_dim=48 is not a multiple of 64"),
    ({"lora.base_dtype": "nf4", "mesh.shape": (1, 8, 1)},
     r"config.lora.base_dtype: .*1 blocks of 64 along model.d_model .* 8 devices"),
    ({"lora.base_dtype": "nf4", "init_from": "/some/run"}, r"config.lora.base_dtype: .*init_from"),
    ({"lora.param_dtype": "int8"}, r"config.lora.param_dtype: .*'int8'"),
])
def test_bad_base_dtype_settings_fail_in_validation_naming_the_key(overrides, message):
  c = _qlora_config("")
  config_lib.apply_overrides(c, overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, 8)


def test_resume_refuses_another_base_dtype_and_accepts_other_remat_stages():
  """Adapters trained against one base resume only on it; remat_stages (how the backward
  is recomputed) may change; a record from before the key reads as no quantization."""
  from jaxalign import errors
  from jaxalign.train import resume
  saved = _qlora_config("nf4").to_dict()
  resume.check_resume_config(saved, _qlora_config("nf4", **{"model.overrides.remat_stages": 1}),
                             where="here")
  with pytest.raises(errors.ResumeMismatchError, match=r"lora\.base_dtype 'nf4' -> 'int8'"):
    resume.check_resume_config(saved, _qlora_config("int8"), where="here")
  old = _qlora_config("").to_dict()
  del old["lora"]["base_dtype"]
  resume.check_resume_config(old, _qlora_config(""), where="here")


def test_float32_adapters_over_a_bfloat16_quantized_base():
  """lora.param_dtype: the adapters (and so their AdamW state) in float32 while the
  frozen base's float parts are bfloat16 (the 70B recipe's choice: a 5e-6 step on a
  bfloat16 weight of 0.01 would round away)."""
  from jaxalign.train import build as build_lib
  c = _qlora_config("nf4", **{"lora.param_dtype": "float32", "mesh.shape": (1, 1, 1)})
  c.model.overrides.param_dtype = "bfloat16"
  built = build_lib.build_config(c, jax.devices()[:1])
  assert {a.dtype for a in jax.tree.leaves(built.abstract_state.params)} == {np.dtype("float32")}
  assert {a.dtype for a in jax.tree.leaves(built.abstract_state.opt_state)
          if a.ndim} == {np.dtype("float32")}
  frozen = dict(nnx.to_flat_state(built.abstract_state.frozen))
  assert frozen[("embed", "embedding")].get_value().dtype == jnp.bfloat16


# A 4-expert, top-2 MoE whose block axes split over mesh (2, 2, 2): d_model's 2 blocks
# over "fsdp" (gate, up, q, k, v), moe_d_ff's 2 over "tensor" (the experts' down), the
# experts over "data" (the default rules).
QLORA_MOE_MODEL = dict(QLORA_MODEL, d_model=128, n_experts=4, experts_per_token=2,
                       moe_d_ff=128)


def _qlora_moe_config(fmt, mesh):
  c = _qlora_config(fmt, **{"mesh.shape": mesh, "lora.targets": ("q", "o")})
  c.model.overrides = ml_collections.ConfigDict(QLORA_MOE_MODEL)
  return c


def test_quantized_moe_base_step_equals_the_dequantized_base_and_shards_experts():
  """An MoE model's experts and attention stored NF4 (router, norms, embeddings float):
  two LoRA DPO steps equal those of a float-base run whose frozen base is the explicitly
  dequantized weights (one device), and the same steps with the experts split over
  "data", d_model over "fsdp" and moe_d_ff over "tensor" (8 devices: each dequantizes
  its own experts' codes inside the shard_map) equal the one-device steps."""
  jax.config.update("jax_default_matmul_precision", "highest")
  try:
    one = jax.devices()[:1]
    built_q, state_q = built_state(_qlora_moe_config("nf4", (1, 1, 1)), one)
    built_f, state_f = built_state(_qlora_moe_config("", (1, 1, 1)), one)
    built_s, state_s = built_state(_qlora_moe_config("nf4", (2, 2, 2)), jax.devices())
    frozen = dict(nnx.to_flat_state(state_s.frozen))
    layer = ("layers", 0, "mlp")
    codes = frozen[layer + ("gate", "codes")].get_value()
    scale = frozen[layer + ("down", "scale")].get_value()
    assert codes.dtype == jnp.uint8 and codes.shape == (1, 4, 64, 128)   # [G, E, D/2, F]
    assert codes.sharding.spec == P(None, "data", "fsdp", "tensor")
    assert scale.shape == (1, 4, 2, 128) and scale.sharding.spec == P(None, "data", "tensor",
                                                                       "fsdp")
    assert frozen[layer + ("router",)].get_value().dtype == jnp.float32
    assert ("layers", 0, "attn", "k", "codes") in frozen
    dequantized = jax.jit(lambda f: quant.dequantize_state(f, jnp.float32),
                          out_shardings=built_f.state_shardings.frozen)(state_q.frozen)
    state_f = state_f.replace(frozen=dequantized)
    for a, b in zip(jax.tree.leaves(state_q.params), jax.tree.leaves(state_f.params)):
      np.testing.assert_array_equal(a, b)
    batch = random_batch(np.random.default_rng(0))
    out = []
    for built, state in ((built_q, state_q), (built_f, state_f), (built_s, state_s)):
      with jax.set_mesh(built.mesh):
        global_batch = sharding.host_to_global(batch, built.batch_sharding)
        for _ in range(2):   # the second step has nonzero B: adapters in the forward
          state, metrics = built.step_fn(state, global_batch)
        out.append((jax.device_get(metrics), jax.device_get(state.params)))
    _assert_same_steps(*out, keys=("loss", "grad_norm", "rewards/margins", "logps/chosen",
                                   "aux_loss"))
  finally:
    jax.config.update("jax_default_matmul_precision", None)


@pytest.mark.parametrize("overrides, message", [
    ({"model.overrides.moe_d_ff": 96},
     r"config.lora.base_dtype: .*the experts' down: model.moe_d_ff=96 is not a multiple of 64"),
    ({"model.overrides.moe_d_ff": 64},   # one block of the experts' down over tensor=2
     r"config.lora.base_dtype: .*1 blocks of 64 along model.moe_d_ff .* 2 devices"),
    ({"model.overrides.d_model": 64},    # one block of the experts' gate, up over fsdp=2
     r"config.lora.base_dtype: .*1 blocks of 64 along model.d_model .* 2 devices"),
    ({"lora.targets": ("q", "up")}, r"config.lora.targets: .*experts"),
])
def test_bad_moe_base_dtype_settings_fail_in_validation_naming_the_key(overrides, message):
  """The experts' block axes (d_model for gate and up, moe_d_ff for down) hold whole
  blocks per device; adapters on the experts stay refused."""
  c = _qlora_moe_config("nf4", (2, 2, 2))
  config_lib.validate(c, 8)
  config_lib.apply_overrides(c, overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c, 8)
