"""jaxalign.plan: the real train step compiled ahead of time, figures read back.

The CPU tests run everywhere (8 fake devices from conftest). The TPU tests need
libtpu (the `tpu` extra; no TPU): each real-scale recipe in configs/ is
compiled for the slice it names in TOPOLOGY and must fit in its HBM.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import flops as flops_lib
from jaxalign import plan as plan_lib
from jaxalign.models import grouped_matmul as gm
from jaxalign.data import packing, schema
from tests.reliability.helpers import recipe_arg

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
REAL_SCALE = ("llama3_8b_dpo", "llama3_8b_dpo_8k", "qwen25_7b_bco", "gemma2_9b_ln_dpo",
              "llama3_70b_dpo", "qwen3_30b_a3b_dpo", "llama3_8b_dpo_32k", "llama3_8b_dpo_128k",
              "llama3_70b_qlora_dpo")


def _load_recipe(name):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_dpo():
  c = config_lib.defaults()   # tiny model, DPO, precomputed reference, batch 8 x 2 x 64
  c.data.batch_size = 8
  return c


def test_tiny_dpo_on_cpu8_gives_sane_figures():
  c = _tiny_dpo()
  p = plan_lib.plan(c, devices="cpu:8")
  n = config_lib.model_config(c).num_params()
  assert p["num_devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "context": 1,
                                                 "tensor": 1}
  assert p["batch_shape"] == [8, 2, 64] and p["tokens_per_step"] == 8 * 2 * 64
  assert p["memory_total"] > 0 and p["memory_arguments"] > 0 and p["memory_temporaries"] > 0
  assert p["flops_per_device"] > 0 and p["flops_per_step"] == p["flops_per_device"] * 8
  assert p["fits"] is True and "error" not in p
  # Precomputed reference: the policy's forward + backward only: 6N per token, N
  # without the untied 32 x 64 input table, plus 3x the causal attention forward
  # (4 * 4 heads * 16 dims per pair, 64 * 65 / 2 pairs, 2 layers) per sequence.
  assert p["num_params"] == n
  attention = 3 * 2 * 4 * 4 * 16 * (64 * 65 // 2) * 8 * 2
  assert p["model_flops_per_step"] == 6 * (n - 32 * 64) * 8 * 2 * 64 + attention
  assert p["model_flops_per_token"] == p["model_flops_per_step"] / (8 * 2 * 64)
  # On CPU attention runs as XLA ops: nothing is hidden from the cost analysis.
  assert p["attention"] == "xla" and p["kernel_flops_per_step"] == 0
  # Forward + backward of the tiny model cost more than 2N per token, and the
  # compiled step should be within a small factor of 6N (attention, logits, optimizer).
  assert 0.5 < p["flops_per_step"] / p["model_flops_per_step"] < 5
  assert p["predicted_mfu"] is None and "none" in p["estimate"]   # no CPU peak
  text = plan_lib.format_plan(p)
  assert "fits: True" in text and "temporaries" in text
  # model.scan_layers="auto" (the default) for CPU devices and 2 layers: unrolled, as printed.
  assert p["scan_layers"] is False and p["scan_iterations"] == 1
  assert "model: scan_layers=auto -> unrolled (cpu, 2 layers <" in text


def test_abstract_batch_follows_the_loss_format():
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  c = _tiny_dpo()
  b = plan_lib.abstract_batch(c, sharding)
  assert b["tokens"].shape == (8, 2, 64) and b["ref_logps"].shape == (8, 2)
  assert b["tokens"].sharding == sharding
  c.reference.mode = "frozen"
  assert "ref_logps" not in plan_lib.abstract_batch(c, sharding)
  c.loss.name, c.loss.hparams = "bco", c.loss.hparams.__class__(dict(beta=0.1))
  c.reference.mode = "precompute"
  b = plan_lib.abstract_batch(c, sharding)
  assert b["tokens"].shape == (8, 1, 64)
  assert set(b) == {"tokens", "attention_mask", "loss_mask", "label", "udm_weights",
                    "ref_logps"}
  c.loss.name, c.data.group_size = "grao", 3
  b = plan_lib.abstract_batch(c, sharding)
  assert b["tokens"].shape == (8, 4, 64) and b["rewards"].shape == (8, 3)


def test_lora_plan_with_accumulation_counts_model_flops_by_hand_and_xla_runs_them_all():
  """A LoRA plan's model FLOPs: the base's forward and input gradient (4N), the
  adapters' 6 per parameter, the frozen reference's forward (the base, adapters off).
  XLA's cost analysis counts the micro-batch loop's body once; the plan counts it per
  micro-batch, so the FLOPs XLA runs are at least the model FLOPs (the plan's predicted
  MFU, model FLOPs over XLA's time, cannot pass 100% on a roofline). Before: 6N, and
  one micro-batch of XLA's FLOPs (a predicted MFU of 358% on an 8-layer 70B plan)."""
  c = _tiny_dpo()
  c.loss.name, c.reference.mode = "dpo", "frozen"
  c.lora.rank, c.lora.alpha = 8, 16.0
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
  c.model.scan_layers = False
  c.optim.grad_accum_steps, c.data.batch_size = 2, 16
  p = plan_lib.plan(c, devices="cpu:8")
  model_cfg = config_lib.model_config(c)
  n = model_cfg.num_params() - 32 * 64                # less the untied input table
  a = p["trainable_params"]
  D, H, KV, Dh, F = (model_cfg.d_model, model_cfg.n_heads, model_cfg.n_kv_heads,
                     model_cfg.head_dim, model_cfg.d_ff)
  per_layer = (D + H * Dh) * 2 + (D + KV * Dh) * 2 + (D + F) * 3
  assert a == model_cfg.n_layers * 8 * per_layer
  tokens = 16 * 2 * 64
  attention = 2 * 4 * 4 * 16 * (64 * 65 // 2) * 16 * 2     # one forward, 2 layers
  policy = (4 * n + 6 * a) * tokens + 3 * attention
  reference = 2 * n * tokens + attention
  assert p["model_flops_per_step"] == policy + reference
  assert p["flops_per_step"] >= p["model_flops_per_step"]
  assert p["flops_per_step"] == pytest.approx(2 * p["compiled_flops_per_device"] * 8)


def test_100m_plan_allocates_no_weights():
  c = config_lib.defaults()
  c.model.preset = "100m"
  c.data.max_length, c.data.max_prompt_length, c.data.batch_size = 32, 16, 8
  before = sum(a.nbytes for a in jax.live_arrays())
  p = plan_lib.plan(c, devices="cpu:8")
  after = sum(a.nbytes for a in jax.live_arrays())
  assert after - before < 1 << 20          # 100M float32 params would be 400 MB
  n = p["num_params"]
  assert 99e6 < n < 101e6
  # Each device holds 1/8 of the float32 params and both AdamW moments (12 B/param).
  assert p["memory_arguments"] >= 12 * n / 8
  assert p["fits"]


def _layered(scan, n_layers, **overrides):
  c = _tiny_dpo()
  c.model.scan_layers = scan
  c.model.overrides = c.model.overrides.__class__(dict(n_layers=n_layers, **overrides))
  return c


# The scanned step's costs extrapolated from two unrolled probes must match XLA's
# count of the whole unrolled step (the reference): FLOPs are affine in the layer
# count, so 0.5% covers fusion differences; bytes accessed within 3%.
SCAN_FLOPS_RTOL, SCAN_BYTES_RTOL = 0.005, 0.03


@pytest.mark.parametrize("n_layers,overrides", [
    (4, {}),
    # Gemma-2-like alternation: period 2, two groups and a 1-layer unrolled tail.
    (5, dict(sliding_window=16,
             layer_types=["sliding" if i % 2 == 0 else "full" for i in range(5)])),
])
def test_scanned_cost_extrapolation_matches_the_unrolled_step(n_layers, overrides):
  scanned = plan_lib.plan(_layered(True, n_layers, **overrides), devices="cpu:8",
                          scan_estimate=True)
  unrolled = plan_lib.plan(_layered(False, n_layers, **overrides), devices="cpu:8")
  period = 2 if overrides else 1
  assert scanned["scan_iterations"] == n_layers // period and unrolled["scan_iterations"] == 1
  tail = n_layers % period
  assert scanned["scan_probe_layers"] == (period + tail, 2 * period + tail)
  # As compiled, the scanned step's body is counted once: well below the unrolled step...
  assert scanned["compiled_flops_per_device"] < 0.9 * unrolled["flops_per_device"]
  # ...extrapolated over its groups it is the unrolled step's count.
  assert scanned["flops_per_device"] == pytest.approx(unrolled["flops_per_device"],
                                                      rel=SCAN_FLOPS_RTOL)
  assert scanned["bytes_accessed_per_device"] == pytest.approx(
      unrolled["bytes_accessed_per_device"], rel=SCAN_BYTES_RTOL)
  assert "extrapolated to" in plan_lib.format_plan(scanned)


def test_scanned_plan_on_cpu_skips_the_probes_by_default():
  p = plan_lib.plan(_layered(True, 4), devices="cpu:8")   # no peak: no time to predict
  assert p["scan_iterations"] == 4 and "scan_probe_layers" not in p
  assert p["flops_per_device"] == p["compiled_flops_per_device"]


def test_topology_without_libtpu_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)   # import libtpu -> ImportError
  with pytest.raises(plan_lib.PlanError, match="libtpu"):
    plan_lib.plan(_tiny_dpo(), topology="v5p:2x2x2")


def test_too_few_cpu_devices_is_a_clear_error():
  with pytest.raises(plan_lib.PlanError, match="device_count"):
    plan_lib.plan(_tiny_dpo(), devices="cpu:1024")


def test_chip_table():
  assert plan_lib.chip_of("v5p:4x4x4").hbm_bytes == 95 * 2**30
  assert plan_lib.chip_of("v5litepod:16x16").name == "v5e"
  assert plan_lib.chip_of("2xv6e:16x16").name == "v6e"
  assert plan_lib.chip_of("v9z:2x2") is None


def _fsdp8_sharding():
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def _packed_tiny(sequence_length, prompt_length=None):
  """The tiny DPO plan with data.packing, and 8 tokenized examples whose every
  sequence holds `sequence_length` real tokens (the plan's assumption made true);
  with `prompt_length`, data.share_prompt too and every example's two sequences
  open with the same prompt of that many tokens."""
  c = _tiny_dpo()
  c.data.packing = True
  T, P = c.data.max_length, c.data.max_prompt_length
  if prompt_length is not None:
    c.data.share_prompt, P = True, prompt_length
  pos = np.arange(T)
  attention = np.broadcast_to(pos < sequence_length, (2, T)).astype(np.int32)
  tokens = (np.arange(2 * T).reshape(2, T) % 30 + 2).astype(np.int32)
  if prompt_length is not None:
    tokens[1, :prompt_length] = tokens[0, :prompt_length]
  examples = [{"tokens": tokens * attention,
               "attention_mask": attention,
               "loss_mask": (attention * (pos >= min(P, sequence_length - 1))).astype(np.int32),
               "ref_logps": np.full((2,), -3.0, np.float32)} for _ in range(8)]
  return c, examples


@pytest.mark.parametrize("sequence_length,prompt_length,rows", [
    (20, None, 1), (64, None, 2),
    # Shared prompts: one unit of 8 + 12 + 12 tokens; 8 + 32 + 32 > 64 splits into two
    # units of 40 (each with the prompt); 64-token sequences leave nothing to share.
    (20, 8, 1), (40, 8, 2), (64, 32, 2)])
def test_packed_abstract_batch_is_what_the_packer_produces(sequence_length, prompt_length,
                                                           rows):
  """Shapes and dtypes of the planned packed batch == jaxalign.data.packing's output
  for data meeting the assumption (64 = max_length: the largest bucket), with and
  without data.share_prompt (rows of units, the packed shared-prompt columns)."""
  sharding = _fsdp8_sharding()
  c, examples = _packed_tiny(sequence_length, prompt_length)
  assume = plan_lib.PackAssumption(sequence_length=sequence_length,
                                   prompt_length=prompt_length)
  planned = plan_lib.abstract_batch(c, sharding, assume)
  # The run's packer: one group per batch shard (8 on this mesh), buckets fitted to the data.
  prompts = None if prompt_length is None else packing.example_prompt_lengths(examples)
  _, pack = packing.make_packer(packing.length_sample(examples, seed=0), process_batch=8,
                                num_groups=8, global_groups=8,
                                row_length=c.data.max_length, num_buckets=3, seed=0, pad_id=0,
                                prompts=prompts)
  real = pack({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  assert packing.is_packed_shared(real) == (prompt_length is not None)
  assert set(planned) == set(real)
  for k, v in real.items():
    assert (planned[k].shape, planned[k].dtype) == (v.shape, v.dtype), k
  assert planned["packed_tokens"].sharding == sharding
  # 2 sequences of 20 tokens share a 64-token row; of 64, one each (B_g * S = 2 rows).
  assert planned["packed_tokens"].shape == (8, rows, 64)


def test_packed_plan_counts_real_tokens():
  c, _ = _packed_tiny(20)
  p = plan_lib.plan(c, devices="cpu:8", pack=plan_lib.PackAssumption(sequence_length=20))
  cfg = config_lib.model_config(c)
  assert p["tokens_per_step"] == 8 * 2 * 20 and p["computed_tokens_per_step"] == 8 * 1 * 64
  assert p["model_flops_per_step"] == flops_lib.model_flops(cfg, [20] * 16)
  assert p["packing"]["rows"] == 1 and p["packing"]["largest_bucket"] == 2
  assert p["fits"] and p["memory_total"] > 0
  assert "real tokens/step packed into [8, 1, 64]" in plan_lib.format_plan(p)
  # Without packing, data.share_prompt is planned without sharing, and the table says so.
  assert p["share_prompt_planned"] is None
  assert "data.share_prompt is not planned" not in plan_lib.format_plan(p)
  assert "data.share_prompt is not planned" in plan_lib.format_plan(
      {**p, "share_prompt_planned": False})
  # A fill the rows cannot reach needs more of them (at most the largest bucket).
  assert plan_lib.packed_shape(
      c, _fsdp8_sharding(), plan_lib.PackAssumption(20, fill=0.5)).rows == 2
  with pytest.raises(plan_lib.PlanError, match="sequence_length"):
    plan_lib.packed_shape(c, _fsdp8_sharding(), plan_lib.PackAssumption(65))


def test_moe_kernel_part_takes_the_static_rows_out_and_times_the_computed_ones():
  """megablox's cost estimate counts the sorted buffer's S n k static rows; a device
  computes n k of them (its experts' share). Hand count: per MoE layer a forward is
  3 grouped matmuls of 2 M D F FLOPs; backward 2x, remat 1x more."""
  from jaxalign.models import transformer
  cfg = transformer.ModelConfig(d_model=256, d_ff=512, n_layers=3, n_heads=4, n_kv_heads=2,
                                head_dim=64, n_experts=8, experts_per_token=2, moe_d_ff=384,
                                remat="full", dtype="bfloat16", moe_capacity_factor=0.0)
  chip = plan_lib.chip_of("v5p:2x2x1")
  part = plan_lib.moe_kernel_part(cfg, "tpu", {"data": 4, "fsdp": 2, "tensor": 1},
                                  tokens_per_device=1000, micro_batches=2, chip=chip,
                                  frozen_reference=False)
  n, k, S = 500, 2, 4                        # tokens per micro-batch, top-k, data shards
  per_row = 3 * 2 * 256 * 384 * (1 + 2 + 1) * 3 * 2      # matmuls, passes, layers, micro-batches
  assert part["moe_kernel"] == "megablox"
  assert part["moe_kernel_flops_per_device"] == per_row * n * k
  assert S * n * k == 4000                   # static rows, padded to 8 row tiles of 512:
  assert part["moe_static_flops_per_device"] == per_row * 4096
  assert part["moe_kernel_seconds"] == pytest.approx(
      per_row * n * k / (chip.peak_flops * flops_lib.KERNEL_EFFICIENCY))
  # The bytes megablox's estimate gives XLA, per layer and micro-batch: the forward's
  # gate, up ([M, 256] @ [256, 384]) and down calls twice (step and remat), the
  # backward's three input-gradient calls (K and N swapped) and three tgmm calls; 2
  # local experts (8 over data 4).
  est = functools.partial(gm.estimated_bytes, groups=2)
  per_layer = lambda m: (2 * (2 * est(m, 256, 384) + est(m, 384, 256))
                         + 2 * est(m, 384, 256) + est(m, 256, 384)
                         + 2 * est(m, 256, 384, kind="tgmm") + est(m, 384, 256, kind="tgmm"))
  assert part["moe_static_bytes_per_device"] == per_layer(4096) * 3 * 2
  assert part["moe_kernel_bytes_per_device"] == per_layer(n * k) * 3 * 2
  # Remat "minimal" saves the expert projections: one forward fewer, FLOPs and bytes.
  saved = plan_lib.moe_kernel_part(dataclasses.replace(cfg, remat="minimal"), "tpu",
                                   {"data": 4, "fsdp": 2}, tokens_per_device=1000,
                                   micro_batches=2, chip=chip, frozen_reference=False)
  assert saved["moe_kernel_flops_per_device"] == per_row * n * k * 3 / 4
  assert saved["moe_static_bytes_per_device"] == (
      per_layer(4096) - 2 * est(4096, 256, 384) - est(4096, 384, 256)) * 3 * 2
  assert plan_lib.moe_kernel_part(cfg, "cpu", {"data": 4}, tokens_per_device=1000,
                                  micro_batches=1, chip=None, frozen_reference=False
                                  )["moe_static_flops_per_device"] == 0.0
  # The bounded buffer (capacity 1.25: 1250 -> 1256 rows, 3 tiles of 512), as the
  # plan's probes compile it (within capacity); the computed rows do not change.
  bounded = plan_lib.moe_kernel_part(
      dataclasses.replace(cfg, moe_capacity_factor=1.25), "tpu", {"data": 4, "fsdp": 2},
      tokens_per_device=1000, micro_batches=2, chip=chip, frozen_reference=False,
      within_capacity=True)
  assert (bounded["moe_buffer_rows"], bounded["moe_exact_rows"]) == (1256, 4000)
  assert bounded["moe_static_flops_per_device"] == per_row * 1536
  assert bounded["moe_kernel_flops_per_device"] == per_row * n * k


def test_collective_bytes_counts_what_a_device_receives_over_the_links():
  """Lines of a compiled TPU program (libtpu 0.0.42's text, trimmed): an all-gather
  to bf16[1024,512] over pairs receives half of its 1 MiB; a reduce-scatter to
  bf16[512,512] over pairs receives its 0.5 MiB output once; an all-reduce of 0.5
  MiB over 4 devices 2 x 3/4 of it; the async all-gather's (operand, result) tuple
  counts its result; a collective permute its output; -done lines nothing; groups in
  the mesh form (`mesh['axis_0'=8,'axis_1'=1] {'axis_0'}`) are the named axes' devices."""
  hlo = "\n".join([
      "  %all_gather.3 = bf16[1024,512]{1,0:T(8,128)(2,1)} all-gather(%param.2), "
      "channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}",
      "  %reduce_scatter.7 = bf16[512,512]{1,0:T(8,128)(2,1)} reduce-scatter(%fusion), "
      "channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}",
      "  ROOT %psum.7 = bf16[512,512]{1,0:T(8,128)(2,1)} all-reduce(%reduce_scatter.7), "
      "channel_id=1, replica_groups=[2,4]<=[8], to_apply=%region_1.0",
      "  %ags = (f32[256]{0}, f32[1024]{0}) all-gather-start(%p), replica_groups=[2,4]<=[8]",
      "  %agd = f32[1024]{0} all-gather-done(%ags)",
      "  %cp = f32[128]{0} collective-permute(%q), source_target_pairs={{0,1},{1,0}}",
      # The mesh form of the groups (a scanned layer's FSDP gather): 8 devices of axis_0.
      "  %all-gather.11 = bf16[1,1024,1024]{2,1,0:T(8,128)(2,1)} all-gather(%c), channel_id=8, "
      "replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={1}",
  ])
  mib = 2 ** 20
  expected = mib / 2 + mib / 2 + 2 * 3 / 4 * mib / 2 + 3 / 4 * 4096 + 512 + 7 / 8 * 2 * mib
  assert plan_lib.collective_bytes(hlo) == pytest.approx(expected)
  assert plan_lib.collective_bytes("%a = f32[8]{0} add(%b, %c)") == 0.0


def test_packed_shared_prompt_plan_is_planned_as_it_runs():
  """data.packing + data.share_prompt: rows of units (one 8-token prompt, two 12-token
  responses: 32 tokens per example) instead of one row per 20-token sequence; the
  run's token and model-FLOP counts (each sequence with its prompt)."""
  c, _ = _packed_tiny(20, prompt_length=8)
  p = plan_lib.plan(c, devices="cpu:8",
                    pack=plan_lib.PackAssumption(sequence_length=20, prompt_length=8))
  assert p["share_prompt_planned"] is True and p["fits"]
  assert p["packing"]["prompt_length"] == 8 and p["packing"]["unit_lengths"] == (32,)
  assert p["packing"]["packed_shape"] == [8, 1, 64] and p["computed_tokens_per_step"] == 512
  assert p["tokens_per_step"] == 8 * 2 * 20
  assert p["model_flops_per_step"] == flops_lib.model_flops(config_lib.model_config(c),
                                                            [20] * 16)
  table = plan_lib.format_plan(p)
  assert "8-token prompt shared" in table and "is not planned" not in table
  # A prompt that leaves a response no token is refused, naming the assumption.
  with pytest.raises(plan_lib.PlanError, match="prompt_length"):
    plan_lib.packed_shape(c, _fsdp8_sharding(), plan_lib.PackAssumption(20, prompt_length=20))


# --- TPU: compiled for abstract TPU devices; needs libtpu, not a TPU. ---
# Marked `tpu`: the README's `pytest` deselects them (pyproject addopts);
# `pytest -m tpu` runs them all, as .ci/run does after installing the tpu extra.

@pytest.mark.tpu
def test_tiny_dpo_compiles_for_a_tpu_slice():
  pytest.importorskip("libtpu")
  c = _tiny_dpo()
  c.model.scan_layers = False
  p = plan_lib.plan(c, topology="v5p:2x2x2")
  assert p["num_devices"] == 8 and p["device_kind"].startswith("TPU")
  assert p["fits"] and 0 < p["memory_total"] < p["hbm_bytes"]
  assert p["flops_per_step"] > 0 and p["predicted_step_seconds"] > 0
  assert 0 < p["predicted_mfu"] < 1


@pytest.mark.tpu
def test_a_mesh_the_torus_cannot_hold_is_a_config_error_naming_the_key():
  """(2, 32, 1) on v5p:4x4x4: 32 is no product of whole torus axes; jax's
  NotImplementedError becomes a ConfigError naming config.mesh.shape, before compiling."""
  pytest.importorskip("libtpu")
  c = _tiny_dpo()
  c.mesh.shape = (2, 32, 1)
  c.data.batch_size = 64
  with pytest.raises(config_lib.ConfigError, match=r"config\.mesh\.shape: \(2, 32, 1, 1\)"):
    plan_lib.plan(c, topology="v5p:4x4x4")


@pytest.mark.tpu
def test_bf16_moe_step_on_megablox_compiles_under_highest_precision():
  """A bf16 MoE step on the megablox kernel compiles for a TPU slice under the process
  default "highest" (the suite's, conftest): the kernel's forward and backward are
  traced at "default" precision, as splash is; under "highest" Mosaic refused its
  bf16 contractions ("Bad lhs type"), failing the Qwen3-30B-A3B recipe's fit test."""
  pytest.importorskip("libtpu")
  c = _tiny_dpo()
  c.model.scan_layers = False
  c.model.moe_kernel = "megablox"
  c.model.overrides.update(dict(n_experts=4, experts_per_token=2, d_model=128, moe_d_ff=128,
                                dtype="bfloat16", head_dim=32))
  assert jax.config.jax_default_matmul_precision == "highest"
  p = plan_lib.plan(c, topology="v5p:2x2x1")
  assert p["fits"] and p["moe_kernel"] == "megablox"


@pytest.mark.tpu
def test_bf16_expert_parallel_step_with_its_overflow_branch_compiles_for_a_tpu_slice():
  """Experts split over data (mesh (2, 2, 1)), bf16 on megablox: the step with the
  bounded dispatch buffer and its exact overflow branch (a lax.cond) compiles, and
  the scanned plan's probes (the bounded buffer alone) cost it. A bf16 scatter-add
  inside that branch crashed libtpu 0.0.42's compiler (SIGSEGV in
  SortedScatterEmitter); the overflow is written with gathers only."""
  pytest.importorskip("libtpu")
  c = _tiny_dpo()
  c.model.moe_kernel = "megablox"
  c.model.overrides.update(dict(n_experts=4, experts_per_token=2, d_model=128, moe_d_ff=128,
                                dtype="bfloat16", head_dim=32, remat=True))
  c.mesh.shape = (2, -1, 1)
  p = plan_lib.plan(c, topology="v5p:2x2x1", scan_estimate=True)
  assert p["fits"] and p["moe_kernel"] == "megablox"
  assert p["moe_buffer_rows"] < p["moe_exact_rows"] and p["scan_probe_layers"]
  assert p["ici_bytes_per_device"] > 0 and p["predicted_step_seconds"] > 0


@pytest.mark.tpu
def test_nf4_expert_parallel_qlora_step_gathers_codes_on_megablox():
  """A QLoRA step over an NF4 MoE base (experts split over data, FSDP over fsdp), bf16
  on megablox, compiles for a TPU slice, and the experts' FSDP all-gathers carry the
  uint8 codes (each device dequantizes its own experts inside the shard_map), not
  the dequantized bf16 weights."""
  pytest.importorskip("libtpu")
  c = _tiny_dpo()
  c.model.moe_kernel = "megablox"
  c.model.overrides.update(dict(n_experts=4, experts_per_token=2, d_model=128, moe_d_ff=128,
                                dtype="bfloat16", head_dim=64, remat=True))
  c.mesh.shape = (2, -1, 1)
  c.lora.rank = 4
  c.lora.base_dtype = "nf4"
  c.reference.mode = "frozen"
  text = plan_lib.lower_step(c, topology="v5p:2x2x1").compile().as_text()
  gathered = re.findall(r"= (\w+)\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", text)
  # gate/up codes [G, E/2, D/2, F] = [1, 2, 64, 128] after the gather over fsdp. (With
  # the weights dequantized before the shard_map, XLA gathers bf16 weights, no codes.)
  assert ("u8", "1,2,64,128") in gathered, sorted(set(gathered))


@pytest.mark.tpu
def test_auto_layers_are_planned_scanned_for_a_tpu_slice():
  """model.scan_layers="auto" is resolved for the plan's target, not for this CPU host."""
  pytest.importorskip("libtpu")
  p = plan_lib.plan(_tiny_dpo(), topology="v5p:2x2x2", scan_estimate=False)
  assert p["scan_layers"] is True and p["scan_iterations"] == 2
  assert "model: scan_layers=auto -> scanned (tpu, 2 layers)" in plan_lib.format_plan(p)


@pytest.mark.tpu
def test_tiny_packed_dpo_compiles_for_a_tpu_slice_and_counts_real_tokens():
  pytest.importorskip("libtpu")
  padded = _tiny_dpo()
  padded.model.scan_layers = False
  c, _ = _packed_tiny(20)
  c.model.scan_layers = False
  ref = plan_lib.plan(padded, topology="v5p:2x2x2")
  p = plan_lib.plan(c, topology="v5p:2x2x2", pack=plan_lib.PackAssumption(sequence_length=20))
  assert p["fits"] and 0 < p["memory_total"] < p["hbm_bytes"]
  assert p["packing"]["packed_shape"] == [8, 1, 64] and p["computed_tokens_per_step"] == 512
  cfg = config_lib.model_config(c)
  assert p["model_flops_per_step"] == flops_lib.model_flops(cfg, [20] * 16)
  assert p["predicted_tokens_per_second"] == pytest.approx(320 / p["predicted_step_seconds"])
  assert 0 < p["predicted_mfu"] < 1
  # Half the rows of the padded step: XLA counts fewer FLOPs for it.
  assert p["flops_per_step"] < ref["flops_per_step"]


# Predicted step time and MFU of the scanned step (extrapolated from unrolled probes)
# against XLA's estimate of the whole unrolled step, the reference.
SCAN_TIME_RTOL = 0.03


@pytest.mark.tpu
def test_scanned_step_time_and_mfu_agree_with_the_unrolled_estimate():
  pytest.importorskip("libtpu")
  unrolled = plan_lib.plan(_layered(False, 4), topology="v5p:2x2x2")
  scanned = plan_lib.plan(_layered(True, 4), topology="v5p:2x2x2")
  blind = plan_lib.plan(_layered(True, 4), topology="v5p:2x2x2", scan_estimate=False)
  assert scanned["scan_iterations"] == 4 and unrolled["scan_iterations"] == 1
  # XLA counts the scan body once: as compiled, its FLOPs fall below the unrolled step's...
  assert scanned["compiled_flops_per_device"] < 0.8 * unrolled["flops_per_device"]
  # ...so without the probes no time or MFU is predicted, and the plan says why...
  assert blind["predicted_step_seconds"] is None and blind["predicted_mfu"] is None
  assert "counts the scanned layer body once" in blind["estimate"]
  assert "counted once of 4" in plan_lib.format_plan(blind)
  # ...and with them (the default on a TPU) the estimate is the unrolled one.
  assert scanned["scan_probe_layers"] == (1, 2)
  assert scanned["predicted_step_seconds"] == pytest.approx(
      unrolled["predicted_step_seconds"], rel=SCAN_TIME_RTOL)
  assert scanned["predicted_mfu"] == pytest.approx(unrolled["predicted_mfu"],
                                                   rel=SCAN_TIME_RTOL)
  assert scanned["flops_per_step"] == pytest.approx(unrolled["flops_per_step"],
                                                    rel=SCAN_FLOPS_RTOL)
  assert scanned["model_flops_per_step"] == unrolled["model_flops_per_step"]
  # Memory is the scanned program's own, not the probes'.
  assert scanned["memory_total"] == blind["memory_total"]


@pytest.mark.tpu
def test_splash_step_compiles_for_a_tpu_slice_and_its_kernel_is_counted():
  pytest.importorskip("libtpu")
  plans = {}
  for impl in ("xla", "splash"):
    c = _tiny_dpo()
    c.model.attention = impl
    c.model.scan_layers = False   # XLA's time estimate needs every layer visible
    c.model.overrides = c.model.overrides.__class__(dict(max_seq_len=128))
    c.data.max_length, c.data.max_prompt_length = 128, 64
    plans[impl] = plan_lib.plan(c, topology="v5p:2x2x2")
  p, ref = plans["splash"], plans["xla"]
  assert p["fits"] and p["attention"] == "splash" and ref["attention"] == "xla"
  cfg = config_lib.model_config(c)
  assert p["kernel_flops_per_step"] == flops_lib.attention_kernel_flops(cfg, [128] * 16) > 0
  assert ref["kernel_flops_per_step"] == 0
  # The kernel is invisible to XLA: its count drops below the einsum step's...
  assert p["flops_per_step"] < ref["flops_per_step"]
  # ...so its time is added, and the model FLOPs (the MFU numerator) do not change.
  assert p["predicted_step_seconds"] == pytest.approx(p["xla_step_seconds"] + p["kernel_seconds"])
  assert p["model_flops_per_step"] == ref["model_flops_per_step"]
  assert "invisible to XLA" in plan_lib.format_plan(p)


@pytest.mark.tpu
@pytest.mark.parametrize("precision", ["highest", "default"])
def test_bf16_splash_step_compiles_at_any_process_matmul_precision(precision):
  """A process-wide "highest" asked Mosaic for fp32 contractions of the bf16 kernel's
  operands, forward and backward ("Bad lhs type"); the kernel traces at its inputs'
  own precision, so the bf16 step compiles whatever the process default."""
  pytest.importorskip("libtpu")
  c = _tiny_dpo()
  c.model.attention = "splash"
  c.model.overrides = c.model.overrides.__class__(
      dict(max_seq_len=128, dtype="bfloat16", param_dtype="bfloat16"))
  c.data.max_length, c.data.max_prompt_length = 128, 64
  with jax.default_matmul_precision(precision):
    p = plan_lib.plan(c, topology="v5p:2x2x2", scan_estimate=False)
  assert p["fits"] and p["attention"] == "splash"


@pytest.mark.tpu
def test_packed_shared_prompt_splash_step_compiles_for_a_tpu_slice_without_fallback(caplog):
  """Packed + shared-prompt rows run on the splash kernel (two passes merged by their
  log-sum-exps, jaxalign.models.splash_parts): no "using xla" line, and its kernel
  FLOPs counted twice over the units."""
  pytest.importorskip("libtpu")
  c, _ = _packed_tiny(100, prompt_length=40)
  c.model.attention = "splash"
  c.model.scan_layers = False
  c.model.overrides = c.model.overrides.__class__(
      dict(max_seq_len=128, dtype="bfloat16", param_dtype="float32"))
  c.data.max_length = 128
  pack = plan_lib.PackAssumption(sequence_length=100, prompt_length=40)
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    p = plan_lib.plan(c, topology="v5p:2x2x2", pack=pack)
  assert not [r for r in caplog.records if "using xla" in r.getMessage()]
  assert p["fits"] and p["attention"] == "splash" and p["share_prompt_planned"] is True
  # One unit of 40 + 60 + 60 = 160 tokens > 128: two units of 100, one row each.
  assert p["packing"]["unit_lengths"] == (100, 100)
  assert p["packing"]["packed_shape"] == [8, 2, 128]
  cfg = config_lib.model_config(c)
  assert p["kernel_flops_per_step"] == pytest.approx(2 * flops_lib.attention_kernel_flops(
      cfg, [100] * 16, recompute_forward=flops_lib.remat_on(cfg)))


@pytest.mark.tpu
def test_multislice_topology_puts_data_across_slices():
  pytest.importorskip("libtpu")
  c = _tiny_dpo()
  c.mesh.shape = (2, -1, 1)
  p = plan_lib.plan(c, topology="2xv5e:2x2")
  assert p["num_devices"] == 8 and p["mesh"] == {"data": 2, "fsdp": 4, "context": 1,
                                                 "tensor": 1}
  assert p["fits"]
  c.mesh.shape = (1, -1, 1)
  with pytest.raises(config_lib.ConfigError, match="slices"):
    plan_lib.plan(c, topology="2xv5e:2x2")


@pytest.mark.tpu
def test_a_step_that_does_not_fit_reports_it():
  pytest.importorskip("libtpu")
  c = config_lib.defaults()
  c.model.preset = "100m"
  c.model.overrides = c.model.overrides.__class__(dict(n_layers=2))
  c.data.max_length, c.data.max_prompt_length, c.data.batch_size = 2048, 1024, 256
  # 64 pairs of 2 x 2048 tokens per 16 GiB chip: float32 attention scores alone
  # take 64 * 2 * 12 heads * 2048^2 * 4 B = 25 GiB.
  p = plan_lib.plan(c, topology="v5e:2x2")
  assert p["fits"] is False


@pytest.mark.tpu
# Each compile takes minutes of one core (4-9 CPU minutes, up to 13 GiB of host
# memory); CI runs them all after the README suite (docs/performance.md has the times).
@pytest.mark.parametrize("name", REAL_SCALE)
def test_real_scale_recipe_fits_its_slice(name):
  pytest.importorskip("libtpu")
  recipe = _load_recipe(name)
  # Fit only: the scanned-cost probes (two more compiles) are not needed for memory.
  # Under the suite's "highest" matmul precision (conftest), as a user who sets it would;
  # a recipe with nested remat at the default one, the only one it traces at with splash
  # and bf16 (attention._traced_at).
  config = recipe.get_config()
  nested = config.model.overrides.get("remat_stages", 1) > 1
  with jax.default_matmul_precision("default") if nested else contextlib.nullcontext():
    p = plan_lib.plan(config, topology=recipe.TOPOLOGY, scan_estimate=False)
  assert p["fits"], plan_lib.format_plan(p)
  assert p["memory_total"] <= p["hbm_bytes"]
  assert p["flops_per_step"] > 0


# --- every recipe plans --------------------------------------------------------------

RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def _tiny_recipe(name, workdir):
  """configs/<name>.py with the tiny model and small shapes: its loss, data format,
  reference, LoRA and packing settings planned cheaply."""
  arg = recipe_arg(CONFIG_DIR / f"{name}.py", workdir)   # ":DIR" where a recipe needs one
  recipe = _load_recipe(name)
  c = recipe.get_config(arg[1:]) if arg else recipe.get_config()
  c.model.preset, c.model.attention, c.model.hf_path = "tiny", "auto", ""
  # One layer and T=16: what is planned here is the recipe's step structure (loss,
  # format, reference, LoRA, packing), not its depth; one cheap compile each.
  c.model.overrides = c.model.overrides.__class__({"n_layers": 1})
  c.model.scan_layers = False
  c.mesh.shape = (1, -1, 1)
  c.data.max_length, c.data.max_prompt_length = 16, 8
  c.data.batch_size = 8
  c.data.pack_length = 0
  c.optim.grad_accum_steps = 1
  if c.lora.get("base_dtype", ""):   # QLoRA: whole blocks of 64 on every projection's input
    c.model.overrides.head_dim = 64  # axis, none split by the mesh
    c.mesh.shape = (-1, 1, 1)
  return c


def test_every_recipe_is_planned_by_the_test_below():
  assert len(RECIPES) >= 20 and "kto_demo" in RECIPES and "llama3_8b_dpo" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_plans_on_cpu8(name, tmp_path):
  c = _tiny_recipe(name, tmp_path)
  spec = config_lib.losses.get(c.loss.name)   # every recipe's loss is registered
  p = plan_lib.plan(c, devices="cpu:8")
  fmt = schema.get(spec.data)
  S = fmt.num_sequences(c.data.group_size or plan_lib.DEFAULT_GROUP_SIZE)
  assert p["batch_shape"] == [8, S, 16] and p["fits"] and p["flops_per_step"] > 0


@pytest.mark.tpu
@pytest.mark.parametrize("share_prompt", [False, True])
def test_context_parallel_splash_step_compiles_for_a_tpu_slice(share_prompt, caplog):
  """Mesh (1, 2, 4, 1): every sequence over 4 chips, splash per shard in the
  load-balanced order (packed shared prompts: the cascade per shard), no xla fallback;
  the plan prints the context size and the strategy."""
  pytest.importorskip("libtpu")
  c = _tiny_dpo()
  c.model.attention = "splash"
  c.model.overrides = c.model.overrides.__class__(dict(max_seq_len=1024, dtype="bfloat16"))
  c.data.max_length, c.data.max_prompt_length = 1024, 512
  c.data.packing = share_prompt
  c.data.share_prompt = share_prompt
  c.mesh.shape = (1, 2, 4, 1)
  p = plan_lib.plan(c, topology="v5p:2x2x2", scan_estimate=False)
  assert p["fits"] and p["attention"] == "splash" and p["context"] == 4
  assert p["kernel_context_imbalance"] == 1.0          # balanced: every shard the same work
  assert "context 4: all-gather K/V, load-balanced" in plan_lib.format_plan(p)
  assert "using xla" not in caplog.text
