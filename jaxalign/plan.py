"""Ahead-of-time plan of one training step: memory, FLOPs and fit, without running it.

`plan(config, topology="v5p:4x4x4")` builds the abstract train state and an
abstract batch (shapes, dtypes and shardings only: no weights are allocated),
then lowers and compiles THE train step -- `jaxalign.train.build.build`, the
builder `jaxalign train` uses, so LoRA adapters, OFS-DPO modules and their
optimizers are planned as they run -- for a TPU slice described by
`jax.experimental.topologies` (needs `libtpu`, the `tpu` extra; no TPU is
needed) or for local CPU devices (`devices="cpu:8"`). The compiled executable
reports per-device memory and XLA's cost estimate exactly as the real slice
would; an out-of-memory is the compiler's own RESOURCE_EXHAUSTED error, which
`plan` turns into `fits=False`.

Figures (all per device unless named otherwise):
  memory: arguments (state + batch), outputs, aliased (donated state reused
    for the new state), temporaries and generated code, from
    `compiled.memory_analysis()`; total = arguments + outputs - aliased +
    temporaries + generated code, compared with the chip's HBM.
  flops_per_step: `compiled.cost_analysis()["flops"]` of the partitioned
    (per-device) program, times the device count for the whole step. It counts
    what XLA runs: rematerialized forwards included.
  model_flops_per_step: jaxalign.flops.model_flops (6N per token for the
    policy's forward and backward, + 2N for a frozen reference's forward, N the
    matmul parameters, plus the causal/window-aware attention-score FLOPs;
    docs/performance.md) over batch_size * S sequences of max_length tokens
    (every token counted real: the planner cannot know the data);
    model_flops_per_token = model_flops_per_step / tokens_per_step.
  packing (data.packing): the step receives the packed layout
    (jaxalign/data/packing.py): G = batch shards x grad_accum_steps groups of
    R rows of L = data.pack_length (0: max_length) tokens. The planner cannot
    see the data, so it plans a stated `PackAssumption`: every sequence holds
    `sequence_length` real tokens (default max_length: one sequence per row, R =
    B_g * S, the largest bucket, which every run compiles and may hit), and R
    is the fewest rows that hold the group's real tokens at `fill` (and that
    equal-length sequences can fill). Model FLOPs, tokens_per_step, tokens/s
    and MFU then count the real tokens only (B * S * sequence_length, each
    sequence's own causal attention); computed_tokens_per_step = G * R * L.
    With data.share_prompt too, the rows hold units -- an example's prompt once,
    then its responses (packing.shared_units) -- as the run packs them: every
    example's prompt is assumed `prompt_length` real tokens (default
    data.max_prompt_length, at most sequence_length - 1), R is what first-fit
    packing of those units needs (at `fill`), and the batch carries the packed
    shared-prompt columns (part ids, first-token columns). Model FLOPs and
    tokens_per_step still count every sequence with its prompt, as the run's
    perf/ metrics do (the layout saves computed tokens, not model FLOPs).
  attention kernel: a fused kernel (splash on TPU, cudnn on GPU) is opaque to
    XLA's cost analysis, which then counts none of its FLOPs or time. When the
    step uses one, its FLOPs are counted analytically
    (jaxalign.flops.attention_kernel_flops: masked blocks skipped, backward
    2.5 x forward; packed shared prompts on splash: two kernel passes over
    each unit, jaxalign.models.splash_parts) and its time estimated as a roofline at
    flops.KERNEL_EFFICIENCY of the chip's peak; both are reported apart from
    the XLA-visible figures and the time is added to the step's.
  context parallelism (a mesh context size c > 1, jaxalign/models/context.py):
    the plan prints c, the attention strategy and the tokens per chip (the
    computed tokens over batch shards x c). The XLA-visible costs are those of
    the partitioned program (K/V all-gathers included); the splash kernel's
    FLOPs are the unsplit count (the shards together skip the same masked
    blocks), and its time is that of the busiest shard: the mean in the
    load-balanced order (every shard the same work), (2c - 1) / c times it in
    contiguous shards (flops.context_imbalance). MFU is over all chips.
  inter-chip traffic: the bytes a device receives in the compiled program's
    collectives (`collective_bytes`) over the chip's ICI bandwidth where known
    (v5p); a lower bound on link time, taken into the roofline's max.
  mixture of experts split over "data" (models/expert_parallel.py): the
    scanned-cost probes trace the bounded dispatch buffer alone
    (`expert_parallel.within_capacity`): their costs are those of a step in
    which no device's experts overflow it (XLA charges a conditional its
    dearest branch, the exact fallback); the memory is the real program's.
  predicted step time / MFU: XLA's own time estimate when the cost analysis
    carries one ("optimal_seconds"); otherwise a roofline from XLA's counts,
    max(flops / peak, bytes accessed / HBM bandwidth, ICI bytes / ICI
    bandwidth), marked as such; plus the kernel time above.
    MFU = model_flops_per_step / (step time * devices * peak bf16 FLOP/s), so
    work hidden from XLA can never raise it.
    On CPU there is no known peak, so neither is given.
  scanned layers: XLA's cost analysis counts a loop body once, whatever its
    trip count, so the compiled scanned step's FLOPs, bytes and time miss
    (G - 1) / G of the layers' work (G scanned groups). The plan then compiles
    two small UNROLLED probes of the same step -- the same config with
    P + tail and 2P + tail layers (P the scanned period) -- and extrapolates
    XLA's counts affinely in the number of groups:
        cost(G) = cost(1 group) + (G - 1) * (cost(2 groups) - cost(1 group)),
    which is XLA's estimate of the unrolled G-group step whenever its costs are
    affine in the layer count (FLOPs and bytes are: every layer is the same
    program). The memory figures stay those of the real scanned program.
    The estimate models the unrolled program's schedule, not the loop's own
    (no loop overhead, no cross-iteration prefetch of gathered weights).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxalign import config as config_lib
from jaxalign import flops as flops_lib
from jaxalign import losses, sharding
from jaxalign.data import packing, schema
from jaxalign.models import attention as attention_lib
from jaxalign.models import context as context_lib
from jaxalign.models import expert_parallel
from jaxalign.models import grouped_matmul as grouped_matmul_lib
from jaxalign.errors import PlanError
from jaxalign.train import build as build_lib

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures (Cloud TPU docs): dense bf16 peak, HBM size and bandwidth,
  and where known the inter-chip (ICI) bandwidth one way (what a chip can receive)."""
  name: str
  peak_flops: float      # bf16 FLOP/s
  hbm_bytes: int
  hbm_bandwidth: float   # bytes/s
  ici_bandwidth: float | None = None   # bytes/s into one chip, all its links together


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1.2e12),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 0.819e12),
    # ICI: "Bidirectional inter-chip interconnect (ICI) bandwidth per chip: 1200 GBps"
    # (cloud.google.com/tpu/docs/v5p; "4800 Gbps" in older versions of the page),
    # 600 GB/s each way.
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2.765e12, ici_bandwidth=600e9),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1.64e12),
}

# Group size a plan assumes for a grouped format without data.group_size.
DEFAULT_GROUP_SIZE = 4


def chip_of(topology: str) -> Chip | None:
  """The Chip named by a topology's prefix ("v5p:4x4x4" -> v5p); None if unknown."""
  kind = re.sub(r"^\d+x", "", topology).split(":", 1)[0].lower().replace("litepod", "e")
  return CHIPS.get(kind)


def tpu_devices(topology: str) -> list:
  """The abstract (compile-only) devices of a TPU slice, e.g. "v5p:4x4x4".

  A multi-slice topology is written "2xv5e:16x16" (two v5e-256 slices).
  """
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    raise PlanError("planning for a TPU topology needs libtpu (pip install 'jaxalign[tpu]' "
                    "or the libtpu wheel matching jax); no TPU is needed") from None
  from jax.experimental import topologies
  # Without TPU metadata libtpu logs a warning about worker hostnames; give it one.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  m = re.fullmatch(r"(?:(\d+)x)?(v\w+:[\dx]+)", topology)
  if not m:
    raise PlanError(f"topology {topology!r}: expected e.g. 'v5p:4x4x4', 'v6e:16x16' or "
                    "'2xv5e:16x16'")
  num_slices, name = int(m.group(1) or 1), m.group(2)
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
  except Exception as e:  # libtpu's own message says what is wrong
    raise PlanError(f"topology {topology!r}: {str(e).strip().splitlines()[0]}") from None
  return list(desc.devices)


def local_devices(spec: str) -> list:
  """"cpu:8" -> the first 8 local CPU devices ("cpu" alone: all of them)."""
  platform, _, count = spec.partition(":")
  try:
    devs = jax.devices(platform)
  except RuntimeError as e:
    raise PlanError(f"devices {spec!r}: {e}") from None
  n = int(count) if count else len(devs)
  if len(devs) < n:
    raise PlanError(f"devices {spec!r}: only {len(devs)} {platform} devices here (set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={n})")
  return devs[:n]


def _make_mesh(config, devs):
  """config.mesh over `devs`; over several slices the "data" axis spans them (DCN)."""
  num_slices = len({getattr(d, "slice_index", 0) for d in devs})
  if num_slices == 1:
    return sharding.make_mesh(config.mesh.shape, devs)
  from jax.experimental import mesh_utils
  shape = sharding.resolve_mesh_shape(config.mesh.shape, len(devs))
  if shape[0] % num_slices:
    raise config_lib.ConfigError(
        f"config.mesh.shape: {tuple(shape)} over {num_slices} slices needs a 'data' size "
        f"divisible by {num_slices} (data parallelism runs across slices)")
  per_slice = (shape[0] // num_slices, *shape[1:])
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, (num_slices, 1, 1, 1), devs)
  return jax.sharding.Mesh(grid, sharding.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))


@dataclasses.dataclass(frozen=True)
class PackAssumption:
  """What a packed plan assumes of the data it cannot see (module docstring).

  Attributes:
    sequence_length: real tokens of every sequence; None: data.max_length
      (the largest bucket: one sequence per row).
    fill: real tokens / row tokens of the rows a step uses, in (0, 1].
    prompt_length: with data.share_prompt, real prompt tokens of every example
      (shared by its sequences); None: data.max_prompt_length, at most
      sequence_length - 1.
  """
  sequence_length: int | None = None
  fill: float = 1.0
  prompt_length: int | None = None


@dataclasses.dataclass(frozen=True)
class PackedShape:
  """The packed layout a plan compiles: G groups of R rows of L tokens."""
  groups: int
  rows: int
  row_length: int
  sequence_length: int
  fill: float
  largest_bucket: int       # B_g * S
  prompt_length: int | None = None     # shared prompts: every example's prompt tokens
  unit_lengths: tuple[int, ...] = ()   # shared prompts: one example's units, in tokens


def packed_shape(config: ml_collections.ConfigDict, batch_sharding,
                 assume: PackAssumption | None = None) -> PackedShape:
  """The packed layout (module docstring) of `config`'s step under `assume`.

  Raises:
    PlanError: an assumption the layout cannot hold.
  """
  assume = assume or PackAssumption()
  B, T = config.data.batch_size, config.data.max_length
  S = _sequences(losses.get(config.loss.name), config)
  L = config.data.pack_length or T
  rules = tuple(tuple(r) for r in config.sharding_rules)
  G = sharding.batch_shards(batch_sharding.mesh, rules) * config.optim.grad_accum_steps
  if B % G:
    raise PlanError(f"data.packing: the batch of {B} examples does not split into {G} pack "
                    "groups (batch shards x grad_accum_steps)")
  m = T if assume.sequence_length is None else int(assume.sequence_length)
  if not 0 < m <= T:
    raise PlanError(f"packed plan: sequence_length {m} must be in [1, data.max_length={T}]")
  if not 0 < assume.fill <= 1:
    raise PlanError(f"packed plan: fill {assume.fill} must be in (0, 1]")
  full = B // G * S
  if config.data.get("share_prompt", False):
    return _shared_shape(config, assume, G=G, S=S, L=L, m=m, full=full)
  rows = max(math.ceil(full * m / (L * assume.fill)), math.ceil(full / (L // m)))
  return PackedShape(groups=G, rows=min(rows, full), row_length=L, sequence_length=m,
                     fill=assume.fill, largest_bucket=full)


def _shared_shape(config, assume: PackAssumption, *, G: int, S: int, L: int, m: int,
                  full: int) -> PackedShape:
  """packed_shape with data.share_prompt: rows of units, as the run's packer lays them."""
  p = (min(config.data.max_prompt_length, m - 1) if assume.prompt_length is None
       else int(assume.prompt_length))
  if not 0 < p < m:
    raise PlanError(f"packed shared plan: prompt_length {p} must be in [1, sequence_length "
                    f"{m}) (every response holds a token)")
  per = full // S
  lengths = np.full((per, S), m, np.int64)
  prompts = np.full((per,), p, np.int64)
  units = [u[2] for u in packing.shared_units(lengths[:1], prompts[:1], L)]
  rows = max(packing.rows_needed(lengths, 1, L, prompts),
             math.ceil(per * sum(units) / (L * assume.fill)))
  return PackedShape(groups=G, rows=min(rows, full), row_length=L, sequence_length=m,
                     fill=assume.fill, largest_bucket=full, prompt_length=p,
                     unit_lengths=tuple(units))


def _group_size(spec, config) -> int | None:
  """G of the loss's format (None for a format without groups)."""
  if not schema.get(spec.data).grouped:
    return None
  return config.data.group_size or DEFAULT_GROUP_SIZE


def _sequences(spec, config) -> int:
  """Sequences per example of the loss's data format."""
  return schema.get(spec.data).num_sequences(_group_size(spec, config))


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding,
                   pack: PackAssumption | None = None) -> dict[str, Any]:
  """The global batch the step receives, as ShapeDtypeStructs with its sharding
  (jaxalign.data.schema.abstract_batch for the loss's format).

  With data.packing, the packed columns of `packed_shape(config, batch_sharding,
  pack)` in place of tokens/attention_mask/loss_mask.
  """
  spec = losses.get(config.loss.name)
  packed = None
  if config.data.get("packing", False):
    p = packed_shape(config, batch_sharding, pack)
    packed = (p.groups, p.rows, p.row_length)
  return schema.abstract_batch(
      spec.data, batch_size=config.data.batch_size, max_length=config.data.max_length,
      group_size=_group_size(spec, config),
      ref_logps=spec.needs_ref and config.reference.mode == "precompute",
      extra=spec.prepared_columns if spec.prepare else None, packed=packed,
      packed_shared=packed is not None and config.data.get("share_prompt", False),
      sharding=batch_sharding)


def _shape_overrides(config) -> bool:
  return bool(set(config.model.overrides.keys()) - {"dtype", "param_dtype", "remat"})


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = dict(cost or {})
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except  (no text: no ICI figure)
    text = None
  if text:
    cost[ICI_KEY] = collective_bytes(text)
  return cost


ICI_KEY = "ici bytes"
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "s4": 0.5, "u4": 0.5}
_COLLECTIVE = re.compile(
    r"=\s+(?P<type>.+?)\s+(?P<op>all-gather-start|all-gather|all-reduce-start|all-reduce|"
    r"reduce-scatter|all-to-all|collective-permute-start|collective-permute)\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


def _replica_group_size(rest: str) -> int:
  """Devices in each of a collective's replica groups (its HLO attributes)."""
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)        # iota form
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  if m:
    return len(m.group(1).split(",")) if m.group(1) else 1
  # Mesh form (libtpu 0.0.42 under shardy): mesh['axis_0'=8,'axis_1'=1] {'axis_0'}: the
  # product of the sizes of the axes in braces.
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
  return 1


def collective_bytes(hlo_text: str) -> float:
  """Bytes one device receives over the inter-chip links in a compiled program.

  From each collective of the partitioned HLO, for g devices per replica group and
  B the bytes of the (whole, gathered or reduced) result: all-gather (g - 1) / g
  B, reduce-scatter (g - 1) x its output, all-reduce 2 (g - 1) / g B (a
  reduce-scatter then an all-gather), all-to-all (g - 1) / g B, a collective
  permute its output. Like XLA's cost analysis it reads a loop body once. A lower
  bound on link time when divided by the chip's whole ICI bandwidth: a collective
  over one mesh axis uses only that axis's links.
  """
  total = 0.0
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    op, rest = m.group("op"), m.group("rest")
    arrays = [(_DTYPE_BYTES.get(d), dims) for d, dims in _ARRAY.findall(m.group("type"))]
    size = sum(b * math.prod(int(x) for x in dims.split(",") if x)
               for b, dims in arrays if b is not None)
    g = _replica_group_size(rest)
    if op.endswith("-start"):
      # (operands, results, ...): an async start carries its inputs with its outputs.
      op = op[:-len("-start")]
      if op == "all-gather":
        size = size * g / (g + 1)
      elif op != "all-reduce":   # all-reduce-start: its results only; a collective
        size = size / 2          # permute's: (operand, result, contexts)
    if op == "collective-permute":
      total += size
    elif g > 1:
      total += {"all-gather": (g - 1) / g * size, "reduce-scatter": (g - 1) * size,
                "all-reduce": 2 * (g - 1) / g * size, "all-to-all": (g - 1) / g * size}[op]
  return total


def _target(topology: str | None, devices: str | None):
  """(devices, chip or None, target name) of a plan."""
  if topology and devices:
    raise PlanError("give a topology or devices, not both")
  if topology:
    return tpu_devices(topology), chip_of(topology), topology
  devices = devices or f"{jax.default_backend()}"
  return local_devices(devices), None, devices


def build_for(config: ml_collections.ConfigDict, devs, pack: PackAssumption | None = None
              ) -> tuple[build_lib.Built, dict]:
  """(the run's Built, the abstract global batch) on `devs`: the train step exactly as
  `jaxalign train` builds it (jaxalign.train.build), LoRA adapters, OFS-DPO modules
  and their optimizers included. `pack`: the packed plan's assumption (data.packing).

  Raises:
    ConfigError: the config cannot run on that many devices.
  """
  # For the target's platform: model.scan_layers="auto" scans a TPU plan, whatever the host.
  spec = config_lib.resolve(config, len(devs), platform=devs[0].platform)
  built = build_lib.build(spec, _make_mesh(spec.config, devs))
  return built, abstract_batch(spec.config, built.batch_sharding, pack)


def lower_step(config: ml_collections.ConfigDict, *, topology: str | None = None,
               devices: str | None = None, pack: PackAssumption | None = None):
  """The planned train step, lowered (not compiled) for the target: `jax.stages.Lowered`."""
  built, batch = build_for(config, _target(topology, devices)[0], pack)
  with jax.set_mesh(built.mesh):
    return built.step_fn.lower(built.abstract_state, batch)


def plan(config: ml_collections.ConfigDict, *, topology: str | None = None,
         devices: str | None = None, verbose: bool = False,
         scan_estimate: bool | None = None,
         pack: PackAssumption | None = None) -> dict[str, Any]:
  """Compiles the real train step for a TPU topology or local devices; returns its figures.

  Args:
    config: a recipe (validated here for the target's device count).
    topology: a TPU slice name, e.g. "v5p:4x4x4" (needs libtpu).
    devices: "cpu:8" etc.; default (no topology) all local devices.
    verbose: print the table (`format_plan`) as well.
    scan_estimate: for a model scanned over G > 1 groups, extrapolate XLA's
      costs from two small unrolled probes (module docstring). None: only when
      a time can be predicted (a TPU chip with a known peak); False: never
      (then no time or MFU is predicted for a scanned model).
    pack: with data.packing, what the plan assumes of the data (PackAssumption;
      default: the largest bucket); ignored without packing.

  Returns:
    A flat dict: target, num_devices, mesh, num_params, trainable_params, lora
    (its settings, None without adapters), scan_layers (the layout planned:
    model.scan_layers, "auto" resolved for the target's platform) and layers
    (that choice in words, as the run logs it), tokens_per_step,
    memory_* (bytes per device), hbm_bytes, fits, flops_per_device,
    flops_per_step, model_flops_per_token, model_flops_per_step,
    predicted_step_seconds, predicted_mfu, estimate (how they were obtained),
    lower_seconds, compile_seconds, scan_iterations, compiled_flops_per_device
    (as XLA counts the compiled program: a scan body once) and, when the
    scanned costs were extrapolated, scan_probe_layers and
    scan_probe_compile_seconds; error (the compiler's message when it did not fit);
    with data.packing, packing (the planned layout and its assumption) and
    computed_tokens_per_step (tokens_per_step and the model FLOPs: real tokens);
    share_prompt_planned: with data.share_prompt, True when planned as it runs
    (with data.packing: rows of units) and False when not (without packing the
    KV-cached shared layout is planned as padded sequences, each with its own
    prompt); None without data.share_prompt.

  Raises:
    PlanError: libtpu missing, bad topology, too few local devices.
    ConfigError: the config cannot run on that many devices.
  """
  devs, chip, target = _target(topology, devices)
  built, batch = build_for(config, devs, pack)
  out, lengths = _describe(config, built, batch, devs, chip, target, pack)
  compiled = _compile(built, batch, out)
  if compiled is not None:
    out.update(_memory(compiled, chip))
    out.update(_costs(config, built, batch, compiled, devs, chip, lengths, out,
                      scan_estimate=chip is not None if scan_estimate is None else scan_estimate,
                      pack=pack))
  if verbose:
    print(format_plan(out))
  return out


def _describe(config, built, batch, devs, chip: Chip | None, target: str,
              pack: PackAssumption | None) -> tuple[dict[str, Any], list[int]]:
  """(plan's figures known before compiling, the real tokens of each sequence)."""
  model_cfg, mesh, n = built.run_spec.model_cfg, built.mesh, len(devs)
  packed = packing.is_packed(batch)
  share = config.data.get("share_prompt", False)
  if packed:
    B, S = batch["packed_lengths"].shape
    T = config.data.max_length
    layout = packed_shape(config, built.batch_sharding, pack)
    lengths = [layout.sequence_length] * (B * S)       # real tokens only
    computed = math.prod(batch["packed_tokens"].shape)
  else:
    B, S, T = batch["tokens"].shape
    lengths = [T] * (B * S)
    computed = B * S * T
  tokens = sum(lengths)
  model_flops = flops_lib.model_flops(model_cfg, lengths, **built.flops_terms)
  shards = sharding.context_size(mesh)
  # A chip holds the activations of its batch shard's rows, 1 / context of each.
  token_shards = sharding.batch_shards(mesh, built.run_spec.rules) * shards
  lora_cfg = built.run_spec.lora_cfg
  out: dict[str, Any] = {
      "target": target, "num_devices": n,
      "device_kind": getattr(devs[0], "device_kind", devs[0].platform),
      "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
      "loss": config.loss.name, "num_params": model_cfg.num_params(),
      # Parameters one token uses (top-k experts of an MoE): the 6N of the model FLOPs.
      "active_params": model_cfg.num_active_params(),
      "trainable_params": sum(int(math.prod(a.shape))
                              for a in jax.tree.leaves(built.abstract_state.params)),
      "lora": (f"rank {lora_cfg.rank} on {','.join(lora_cfg.targets)}"
               + (f", modules {'+'.join(built.run_spec.modules)}" if built.run_spec.modules else "")
               + (f", base {lora_cfg.base_dtype}" if lora_cfg.base_dtype != "none" else "")
               if lora_cfg.enabled else None),
      "model": config.model.preset + (" (shape overrides)" if _shape_overrides(config) else ""),
      "scan_layers": model_cfg.scan_layers, "layers": built.run_spec.layers_line,
      "batch_shape": [B, S, T], "tokens_per_step": tokens,
      "computed_tokens_per_step": computed,
      "context": shards, "context_strategy": context_lib.STRATEGY if shards > 1 else None,
      "tokens_per_chip": computed // token_shards,
      "packing": (dict(dataclasses.asdict(layout),
                       packed_shape=list(batch["packed_tokens"].shape)) if packed else None),
      "model_flops_per_token": model_flops / tokens, "model_flops_per_step": model_flops,
      "hbm_bytes": chip.hbm_bytes if chip else None,
      # Packed: rows of units under the stated assumption. The unpacked shared
      # layout's shapes follow each batch's prompts, which a plan never sees: it
      # plans each sequence with its own prompt (more tokens, an upper bound).
      "share_prompt_planned": (packed if share else None),
  }
  return out, lengths


def _compile(built, batch, out: dict[str, Any]):
  """The compiled step, or None when it does not fit (then `out` says so); records
  lower_seconds and compile_seconds in `out`."""
  t0 = time.perf_counter()
  with jax.set_mesh(built.mesh):
    lowered = built.step_fn.lower(built.abstract_state, batch)
  out["lower_seconds"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; re-raised unless it is an OOM
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
      raise
    out.update(compile_seconds=time.perf_counter() - t0, fits=False,
               error=msg.strip().splitlines()[0][:2000])
    return None
  out["compile_seconds"] = time.perf_counter() - t0
  return compiled


def _memory(compiled, chip: Chip | None) -> dict[str, Any]:
  """memory_* (bytes per device), fits and hbm_fraction of the compiled step."""
  mem = compiled.memory_analysis()
  out: dict[str, Any] = {"memory_total": None}
  if mem is not None:
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    code = mem.generated_code_size_in_bytes
    out.update(memory_arguments=args, memory_outputs=outs, memory_aliased=alias,
               memory_temporaries=temp, memory_generated_code=code,
               memory_total=args + outs - alias + temp + code)
  total = out["memory_total"]
  out["fits"] = bool(chip is None or total is None or total <= chip.hbm_bytes)
  out["hbm_fraction"] = total / chip.hbm_bytes if chip and total else None
  return out


def _costs(config, built, batch, compiled, devs, chip: Chip | None, lengths: list[int],
           known: dict[str, Any], *, scan_estimate: bool,
           pack: PackAssumption | None) -> dict[str, Any]:
  """FLOPs, bytes, the attention kernel's share and the predicted step time and MFU."""
  model_cfg, n = built.run_spec.model_cfg, len(devs)
  cost = _cost(compiled)
  out: dict[str, Any] = {"compiled_flops_per_device": float(cost.get("flops", 0.0))}
  # XLA's cost analysis counts a loop body once, whatever its trip count: with
  # the layers scanned G > 1 times its counts miss (G - 1) / G of the layers'
  # work. Extrapolate them from two unrolled probes (module docstring).
  groups = model_cfg.scan_groups()[1] if getattr(model_cfg, "scan_layers", False) else 1
  out["scan_iterations"] = groups
  extrapolated = groups > 1 and scan_estimate
  if extrapolated:
    cost, probe = scan_extrapolated_cost(config, devs, model_cfg, pack)
    out.update(probe)
  # The micro-batches of gradient accumulation are one more loop (train/step.py), whose
  # body XLA counts once too: the step runs it grad_accum_steps times.
  cost = accumulated_cost(cost, config.optim.grad_accum_steps)
  flops = float(cost.get("flops", 0.0))
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  ici = cost.get(ICI_KEY)
  out.update(flops_per_device=flops, flops_per_step=flops * n,
             bytes_accessed_per_device=bytes_accessed, ici_bytes_per_device=ici,
             ici_seconds=(ici / chip.ici_bandwidth
                          if ici is not None and chip and chip.ici_bandwidth else None))
  seconds, estimate = _xla_seconds(cost, chip, flops, bytes_accessed)
  kernel_lengths, passes = lengths, 1
  if packing.is_packed_shared(batch):
    # The kernel runs over units (a prompt once, then its responses).
    layout = packed_shape(config, built.batch_sharding, pack)
    kernel_lengths = list(layout.unit_lengths) * batch["packed_lengths"].shape[0]   # x B
    passes = 2
  out.update(_attention_kernel_part(
      model_cfg, devs[0].platform, kernel_lengths, n, chip,
      frozen_reference=built.run_spec.frozen_ref, passes=passes,
      row_length=(batch["packed_tokens"].shape[-1] if packing.is_packed(batch)
                  else config.data.max_length), context=sharding.context_size(built.mesh)))
  if extrapolated:
    l1, l2 = out["scan_probe_layers"]
    estimate = (f"{estimate}; XLA's costs of the unrolled step extrapolated over {groups} scanned "
                f"groups from unrolled {l1}- and {l2}-layer probes (XLA counts a scan "
                f"body once)")
  elif groups > 1 and seconds is not None:
    seconds = None
    estimate = (f"none: XLA's cost analysis counts the scanned layer body once, not "
                f"{groups} times, so its FLOPs and time undercount the step; "
                f"--config.model.scan_layers=False gives XLA's estimate of the same step "
                f"(unrolled, slower to compile)")
  moe = moe_kernel_part(
      model_cfg, devs[0].platform, dict(zip(built.mesh.axis_names, built.mesh.devices.shape)),
      tokens_per_device=known["computed_tokens_per_step"] / batch_shards(built, config),
      micro_batches=config.optim.grad_accum_steps, chip=chip,
      frozen_reference=built.run_spec.frozen_ref, within_capacity=extrapolated)
  out.update(moe)
  if moe["moe_static_flops_per_device"] and chip is not None and seconds is not None:
    # The megablox calls enter XLA's time estimate as negative times and its FLOP
    # and byte counts at their static row count: a roofline of the rest, plus the
    # kernel's own time (moe_kernel_part).
    seconds = max((flops - moe["moe_static_flops_per_device"]) / chip.peak_flops,
                  max(bytes_accessed - moe["moe_static_bytes_per_device"], 0.0)
                  / chip.hbm_bandwidth) + moe["moe_kernel_seconds"]
    estimate = (f"roofline from XLA's flops and bytes accessed (less the megablox calls' "
                f"static estimates) + the megablox kernel, the larger of its FLOPs at "
                f"{100 * flops_lib.KERNEL_EFFICIENCY:.0f}% of peak and its bytes (XLA's own "
                f"time estimate is unusable with Pallas calls that carry a cost estimate)"
                + (estimate[estimate.index(";"):] if extrapolated else ""))
  if seconds is not None and out["ici_seconds"] and out["ici_seconds"] > seconds:
    # Collectives overlap compute and HBM traffic at best: the links bound the step.
    seconds = out["ici_seconds"]
    estimate += ("; bound by the inter-chip links: the collectives' bytes per device "
                 "over the chip's ICI bandwidth")
  out["xla_step_seconds"] = seconds
  if seconds is not None and out["kernel_flops_per_step"]:
    seconds = seconds + out["kernel_seconds"] if out["kernel_seconds"] is not None else None
  model_flops = known["model_flops_per_step"]
  out["predicted_step_seconds"] = seconds
  out["predicted_mfu"] = (model_flops / (seconds * n * chip.peak_flops)
                          if seconds and chip else None)
  out["predicted_tokens_per_second"] = known["tokens_per_step"] / seconds if seconds else None
  out["estimate"] = estimate
  return out


def _xla_seconds(cost: dict[str, float], chip: Chip | None, flops: float,
                 bytes_accessed: float) -> tuple[float | None, str]:
  """(XLA's step time, or a roofline from its counts, or None; how it was obtained)."""
  if cost.get("optimal_seconds", 0) > 0:
    return float(cost["optimal_seconds"]), "xla optimal_seconds"
  if chip is not None and flops > 0:
    return (max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth),
            "roofline from XLA's flops and bytes accessed (this XLA gives no time estimate)")
  return None, "none: no time estimate from XLA and no known peak for this device"


# XLA cost-analysis keys extrapolated over scanned groups (the rest are not read).
_EXTRAPOLATED_COSTS = ("flops", "bytes accessed", "transcendentals", "optimal_seconds",
                       ICI_KEY)


def probe_config(config: ml_collections.ConfigDict, model_cfg, groups: int):
  """`config` unrolled (scan_layers=False) with `groups` periods of layers + the tail."""
  period, _, tail = model_cfg.scan_groups()
  n_layers = groups * period + tail
  c = copy.deepcopy(config)
  over = c.model.overrides.to_dict()
  over["n_layers"] = n_layers
  if model_cfg.layer_types is not None:
    # Layer i of the probe is configured as layer i of the model (period P).
    over["layer_types"] = list(model_cfg.layer_types[:n_layers])
  c.model.overrides = ml_collections.ConfigDict(over)
  c.model.scan_layers = False
  return c, n_layers


def accumulated_cost(cost: dict[str, float], accum_steps: int) -> dict[str, float]:
  """XLA's cost of a step that accumulates `accum_steps` micro-batches, from the cost
  analysis of its compiled program, which counts the micro-batch loop's body once.

  Each of _EXTRAPOLATED_COSTS is multiplied by `accum_steps`. The optimizer update
  runs once per step but is counted `accum_steps` times then: an overestimate of the
  step's cost (and time) by (accum_steps - 1) updates, a few FLOPs per trainable
  parameter against the micro-batches' ~6 per parameter per token, so the predicted
  MFU errs low, never high.
  """
  accum_steps = max(int(accum_steps), 1)
  return {k: (float(v) * accum_steps if k in _EXTRAPOLATED_COSTS else v)
          for k, v in cost.items()}


def scan_extrapolated_cost(config: ml_collections.ConfigDict, devs, model_cfg,
                           pack: PackAssumption | None = None
                           ) -> tuple[dict[str, float], dict[str, Any]]:
  """XLA's cost of the step unrolled over all G scanned groups, from two probes.

  Compiles the step unrolled with 1 and 2 periods of layers (plus the tail) on
  the same devices, batch and mesh, and returns
  cost(1) + (G - 1) * (cost(2) - cost(1)) for each of _EXTRAPOLATED_COSTS present
  in both, with the probes' layer counts and compile time.
  """
  _, groups, _ = model_cfg.scan_groups()
  costs, layers = [], []
  t0 = time.perf_counter()
  for g in (1, 2):
    c, n_layers = probe_config(config, model_cfg, g)
    # The MoE experts' bounded buffer alone: the step as it runs when no device's
    # experts overflow it (XLA would charge the exact fallback's cond branch).
    with expert_parallel.within_capacity():
      built, batch = build_for(c, devs, pack)
      with jax.set_mesh(built.mesh):
        compiled = built.step_fn.lower(built.abstract_state, batch).compile()
    costs.append(_cost(compiled))
    layers.append(n_layers)
    del compiled, built
  one, two = costs
  cost = {k: float(one[k]) + (groups - 1) * (float(two[k]) - float(one[k]))
          for k in _EXTRAPOLATED_COSTS if k in one and k in two}
  return cost, {"scan_probe_layers": tuple(layers),
                "scan_probe_compile_seconds": time.perf_counter() - t0,
                "scan_probe_costs": tuple({k: float(c[k]) for k in _EXTRAPOLATED_COSTS if k in c}
                                          for c in costs)}


def batch_shards(built, config) -> int:
  """Devices the examples of a step are split over (the batch rule's mesh axes)."""
  mesh = dict(zip(built.mesh.axis_names, built.mesh.devices.shape))
  axes = sharding.batch_axes(config.sharding_rules) or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(int(mesh[a]) for a in axes)


def moe_kernel_part(model_cfg, platform: str, mesh: dict[str, int], *, tokens_per_device: float,
                    micro_batches: int, chip: Chip | None, frozen_reference: bool,
                    within_capacity: bool = False) -> dict[str, Any]:
  """The MoE experts' grouped-matmul kernel and, for megablox on TPU, its FLOPs and time.

  The megablox kernel's cost estimate counts its static row count, the rows of
  the sorted buffer (expert_parallel.dispatch_rows): S n k (S the data shards
  the tokens are gathered over, n the tokens of a device's micro-batch, k
  experts per token), or the bounded buffer's R rows when the costs are those
  of the step within capacity (`within_capacity`: the plan's probes); a device
  computes n k of them on average (its own experts' share). Per MoE layer a
  forward is three grouped matmuls, 6 M D F' FLOPs for M rows (F' = moe_d_ff
  over the tensor shards); the backward two of each (the input gradient and
  tgmm's weight gradient), the rematerialized forward one more (remat "full";
  the other policies save the mlp_* projections of a MoE model), a frozen
  reference's forward one. Without `within_capacity` the exact overflow branch
  is counted as XLA counts it (its dearest branch): S n k rows, plus the bounded
  buffer's R, with one more forward in its backward (its custom VJP recomputes
  it). Returns the static FLOPs and bytes XLA counted (megablox's own cost
  estimates, to be taken out of its counts), the computed ones (n k rows) and the
  kernel's time: the larger of its FLOPs at flops.KERNEL_EFFICIENCY of the chip's
  peak and its bytes at the chip's HBM bandwidth (its blocks stream while it
  computes); zeros where no megablox runs.
  """
  none = {"moe_kernel": None, "moe_static_flops_per_device": 0.0,
          "moe_static_bytes_per_device": 0.0, "moe_kernel_flops_per_device": 0.0,
          "moe_kernel_bytes_per_device": 0.0, "moe_kernel_seconds": 0.0,
          "moe_buffer_rows": None, "moe_exact_rows": None}
  if not getattr(model_cfg, "n_experts", 0):
    return none
  D, F, E, k = (model_cfg.d_model, model_cfg.expert_d_ff, model_cfg.n_experts,
                model_cfg.experts_per_token)
  impl, _ = grouped_matmul_lib.choose(model_cfg.moe_kernel, platform, k=D, n=F,
                                      lhs_dtype=model_cfg.dtype, rhs_dtype=model_cfg.dtype)
  none["moe_kernel"] = impl
  n = tokens_per_device / max(micro_batches, 1)
  data = mesh.get(expert_parallel.EXPERT_MESH_AXIS, 1)
  gather = data if E % data == 0 else 1
  full, bounded = expert_parallel.dispatch_rows(
      shards=gather, tokens=int(n), k=k,
      capacity_factor=model_cfg.moe_capacity_factor if gather > 1 else 0.0)
  none.update(moe_exact_rows=full, moe_buffer_rows=bounded)
  if impl != "megablox" or platform != "tpu":
    return none
  tensor = mesh.get(expert_parallel.HIDDEN_MESH_AXIS, 1)
  f_local = F // tensor if F % tensor == 0 else F
  def padded(rows):
    tm = grouped_matmul_lib.tiling(int(rows), D, f_local)[0]
    return -(-rows // tm) * tm

  # Forward passes of the expert matmuls: the step's, the rematerialized one (a
  # policy that saves the mlp_* projections, "minimal" or "dots" for MoE, skips it)
  # and a frozen reference's; the backward is two more (input and weight gradients).
  forwards = 1.0 + (1.0 if model_cfg.remat == "full" else 0.0) + (
      1.0 if frozen_reference else 0.0)
  passes = forwards + 2.0
  repeat = model_cfg.n_layers * max(micro_batches, 1)
  per_row = 6.0 * D * f_local * passes * repeat
  groups = E // gather if gather > 1 else E
  size = jnp.dtype(model_cfg.dtype).itemsize

  def call_bytes(rows, n_forwards):
    """megablox's own byte estimate of one layer's calls over a `rows`-row buffer."""
    est = functools.partial(grouped_matmul_lib.estimated_bytes, int(rows), groups=groups,
                            itemsize=size)
    forward = 2 * est(D, f_local) + est(f_local, D)
    backward = (2 * est(f_local, D) + est(D, f_local)             # input gradients
                + 2 * est(D, f_local, kind="tgmm") + est(f_local, D, kind="tgmm"))
    return (n_forwards * forward + backward) * repeat

  if bounded is None:
    static, static_bytes = per_row * padded(full), call_bytes(padded(full), forwards)
  else:
    static, static_bytes = per_row * padded(bounded), call_bytes(padded(bounded), forwards)
    if not within_capacity:   # the overflow's branch: its backward recomputes its forward
      static += per_row * (passes + 1.0) / passes * padded(full)
      static_bytes += call_bytes(padded(full), forwards + 1.0)
  computed = per_row * n * k
  computed_bytes = call_bytes(n * k, forwards)
  seconds = 0.0
  if chip:
    # A Pallas kernel streams its blocks while it computes: its time is the larger of
    # its compute and its HBM traffic, not their sum.
    seconds = max(computed / (chip.peak_flops * flops_lib.KERNEL_EFFICIENCY),
                  computed_bytes / chip.hbm_bandwidth)
  return {**none, "moe_static_flops_per_device": static,
          "moe_static_bytes_per_device": static_bytes,
          "moe_kernel_flops_per_device": computed,
          "moe_kernel_bytes_per_device": computed_bytes,
          "moe_kernel_seconds": seconds}


def _attention_kernel_part(model_cfg, platform: str, lengths, n: int, chip: Chip | None, *,
                           frozen_reference: bool, row_length: int,
                           passes: int = 1, context: int = 1) -> dict[str, Any]:
  """The attention kernel the step uses and, when XLA cannot see it, its FLOPs and time.

  `lengths`: real tokens of each sequence (a packed row's segments attend only
  within themselves, so the kernel's unmasked blocks are those of the sequences),
  or of each unit of packed shared prompts; `row_length`: the rows' length, the
  kernel's shape; `passes`: splash calls over them (2: the shared-prompt cascade,
  jaxalign.models.splash_parts; cuDNN takes part ids in its one call's mask);
  `context`: the mesh's context size: each chip runs 1 / context of every row's
  queries; in contiguous shards (no load-balanced order) the busiest one sets
  the time (flops.context_imbalance).
  """
  impl, _ = attention_lib.choose(
      model_cfg.attention, platform, seq_len=row_length // context,
      kv_len=row_length // context,
      dtype=model_cfg.dtype, softcap=model_cfg.attn_logit_softcap, decode=False)
  opaque = impl in ("splash", "cudnn") and platform in ("tpu", "gpu")
  passes = passes if impl == "splash" else 1
  kernel = (passes * flops_lib.attention_kernel_flops(
      model_cfg, lengths, frozen_reference=frozen_reference,
      recompute_forward=flops_lib.remat_on(model_cfg)) if opaque else 0.0)
  windows = {model_cfg.window_of(i) for i in range(model_cfg.n_layers)}
  imbalance = (1.0 if context_lib.balanced(row_length, context) else
               max(flops_lib.context_imbalance(context, w, row_length) for w in windows))
  kernel_seconds = (kernel / n * imbalance / (chip.peak_flops * flops_lib.KERNEL_EFFICIENCY)
                    if opaque and chip else None)
  return {"attention": impl, "kernel_flops_per_step": kernel,
          "kernel_flops_per_device": kernel / n, "kernel_seconds": kernel_seconds,
          "kernel_context_imbalance": imbalance if opaque else None}


def _gib(x) -> str:
  if x is None:
    return "-"
  return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:.2f} MiB"


def _num(x, unit="") -> str:
  if x is None:
    return "-"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {prefix}{unit}"
  return f"{x:.3g} {unit}".strip()


def format_plan(p: dict[str, Any]) -> str:
  """A short human table of `plan`'s result."""
  mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
  lines = [
      f"plan: {p['model']} {p['loss']} on {p['target']} ({p['num_devices']} x "
      f"{p['device_kind']}), mesh {mesh}",
      f"  context {p.get('context', 1)}"
      + (f": {p['context_strategy']}" if p.get("context_strategy") else " (sequences unsplit)")
      + f"; {p.get('tokens_per_chip', '-')} tokens per chip",
      f"  params {_num(p['num_params'])} (trainable {_num(p.get('trainable_params'))}"
      + (f": LoRA {p['lora']})" if p.get("lora") else ")")
      + (f", active per token {_num(p['active_params'])}"
         if p.get("active_params", p["num_params"]) != p["num_params"] else "")
      + f"   batch {p['batch_shape']} (B, S, T) = "
      + (f"{p['tokens_per_step']} tokens/step" if not p.get("packing") else
         f"{p['tokens_per_step']} real tokens/step packed into {p['packing']['packed_shape']} "
         f"(G, R, L) = {p['computed_tokens_per_step']} computed"),

      *([f"  {p['layers']}"] if p.get("layers") else []),
      f"  lower {p['lower_seconds']:.1f} s, compile {p['compile_seconds']:.1f} s"
      + (f" (+ {p['scan_probe_compile_seconds']:.1f} s for the unrolled "
         f"{p['scan_probe_layers'][0]}- and {p['scan_probe_layers'][1]}-layer cost probes)"
         if p.get("scan_probe_layers") else ""),
  ]
  if p.get("packing"):
    k = p["packing"]
    lines.append(f"  packing assumed: every sequence {k['sequence_length']} real tokens"
                 + (f" of which a {k['prompt_length']}-token prompt shared by the example's "
                    f"sequences (units of {'+'.join(map(str, k['unit_lengths']))} tokens)"
                    if k.get("prompt_length") else "")
                 + f", rows {100 * k['fill']:.0f}% full -> {k['rows']} of at most "
                 f"{k['largest_bucket']} rows per group; model FLOPs, tokens/s and MFU count "
                 f"real tokens" + (" (each sequence with its prompt)"
                                   if k.get("prompt_length") else ""))
  if p.get("share_prompt_planned") is False:
    lines.append("  data.share_prompt is not planned without data.packing: every sequence is "
                 "planned with its own prompt (more tokens than the run computes: an upper "
                 "bound)")
  if p.get("error"):
    lines.append(f"  DOES NOT FIT: {p['error']}")
    return "\n".join(lines)
  hbm = p.get("hbm_bytes")
  lines += [
      "  memory per device:",
      f"    arguments        {_gib(p.get('memory_arguments'))}",
      f"    outputs          {_gib(p.get('memory_outputs'))}  "
      f"(aliased to donated arguments: {_gib(p.get('memory_aliased'))})",
      f"    temporaries      {_gib(p.get('memory_temporaries'))}",
      f"    generated code   {_gib(p.get('memory_generated_code'))}",
      f"    total            {_gib(p.get('memory_total'))}"
      + (f" of {_gib(hbm)} HBM ({100 * p['hbm_fraction']:.0f}%)" if hbm else ""),
      f"  fits: {p['fits']}",
      f"  FLOPs per step (XLA)      {_num(p['flops_per_step'], 'FLOP')} "
      + ((f"(extrapolated to {p['scan_iterations']} scanned groups; as compiled, the "
          f"body counted once: {_num(p['compiled_flops_per_device'] * p['num_devices'], 'FLOP')}) "
          if p.get("scan_probe_layers") else
          f"(the scanned layer body counted once of {p['scan_iterations']}) ")
         if p.get("scan_iterations", 1) > 1 else "")
      + f"({_num(p['flops_per_device'], 'FLOP')} per device)",
      f"  attention kernel          {p['attention']}"
      + (f": + {_num(p['kernel_flops_per_step'], 'FLOP')} per step invisible to XLA, "
         f"counted analytically ({_num(p['kernel_flops_per_device'], 'FLOP')} per device)"
         if p["kernel_flops_per_step"] else " (its FLOPs are in XLA's count)"),
      *([f"  MoE grouped matmul        {p['moe_kernel']}"
         + (f": XLA counts {_num(p['moe_static_flops_per_device'], 'FLOP')} per device "
            f"(the static sorted-buffer rows), the kernel computes "
            f"{_num(p['moe_kernel_flops_per_device'], 'FLOP')}"
            if p.get("moe_static_flops_per_device") else "")]
        if p.get("moe_kernel") else []),
      *([f"  MoE dispatch buffer       {p['moe_buffer_rows']} rows per device "
         f"(exact fallback {p['moe_exact_rows']} rows, taken by a layer whose experts "
         f"receive more; costs above are "
         + ("the bounded buffer's: no device over capacity)" if p.get("scan_probe_layers")
            else "the compiled program's, which counts the fallback)")]
        if p.get("moe_buffer_rows") else []),
      *([f"  inter-chip (ICI) traffic  {_num(p['ici_bytes_per_device'], 'B')} per device"
         + (f" = {p['ici_seconds'] * 1e3:.1f} ms at the chip's ICI bandwidth (a lower bound)"
            if p.get("ici_seconds") is not None else "")]
        if p.get("ici_bytes_per_device") is not None else []),
      f"  model FLOPs per token     {_num(p['model_flops_per_token'], 'FLOP')} "
      f"(per step {_num(p['model_flops_per_step'], 'FLOP')})",
  ]
  if p.get("predicted_step_seconds"):
    mfu = p.get("predicted_mfu")
    lines.append(f"  predicted step time {p['predicted_step_seconds'] * 1e3:.1f} ms, "
                 f"{_num(p['predicted_tokens_per_second'])} tokens/s"
                 + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
    if p.get("moe_static_flops_per_device"):
      lines.append(f"    (XLA-visible part includes the megablox kernel's "
                   f"{p['moe_kernel_seconds'] * 1e3:.1f} ms at "
                   f"{100 * flops_lib.KERNEL_EFFICIENCY:.0f}% of peak)")
    if p.get("kernel_seconds"):
      imbalance = p.get("kernel_context_imbalance") or 1.0
      lines.append(f"    = XLA-visible {p['xla_step_seconds'] * 1e3:.1f} ms + attention "
                   f"kernel {p['kernel_seconds'] * 1e3:.1f} ms (roofline at "
                   f"{100 * flops_lib.KERNEL_EFFICIENCY:.0f}% of peak"
                   + (f", x {imbalance:.2f} for the busiest context shard"
                      if imbalance > 1 else "") + ")")
  lines.append(f"  estimate: {p['estimate']}")
  return "\n".join(lines)
