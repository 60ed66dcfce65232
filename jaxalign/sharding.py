"""Mesh axes and logical-axis rules, the mesh from a shape, rules turned into NamedShardings.

Imports nothing of jaxalign but errors: models, data and config build on it.
"""

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.errors import ConfigError

MESH_AXES = ("data", "fsdp", "context", "tensor")
# The axes of a three-size config.mesh.shape, written before the context axis
# existed: (data, fsdp, tensor) with context 1.
LEGACY_MESH_AXES = ("data", "fsdp", "tensor")
CONTEXT_AXIS = "context"

# Logical axis name -> mesh axis (or axes, or None). One table for the model.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("lora_rank", None),
    # MoE experts ([E, D, F] weights) split over "data": expert parallelism across
    # the data-parallel groups, FSDP over "fsdp" inside each (models/expert_parallel.py).
    ("expert", "data"),
    ("layers", None),          # the stacked (scanned) layers axis: never split
    # Activations along the sequence (embeddings, blocks, the log-prob head):
    # split over "context" (context parallelism; jaxalign/models/context.py).
    # A recipe saved before this rule existed gets it (config.py).
    ("activation_length", "context"),
)


# Every logical axis name the model and the batch use; each needs a rule.
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def full_mesh_shape(shape) -> tuple[int, ...]:
  """`shape` as four sizes over MESH_AXES: a three-size (data, fsdp, tensor) shape
  gets context 1; raises ConfigError for any other length."""
  shape = tuple(int(s) for s in shape)
  if len(shape) == len(LEGACY_MESH_AXES):
    return shape[:2] + (1,) + shape[2:]
  if len(shape) != len(MESH_AXES):
    raise ConfigError(f"config.mesh.shape: needs {len(MESH_AXES)} sizes for {MESH_AXES} "
                      f"(or 3 for {LEGACY_MESH_AXES}, context 1), got {shape}")
  return shape


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
  """Four sizes over MESH_AXES (`full_mesh_shape`) with one -1 replaced by what
  fills `num_devices`; raises ConfigError (quoting the shape as given)."""
  given = tuple(int(s) for s in shape)
  shape = full_mesh_shape(given)
  if shape.count(-1) > 1:
    raise ConfigError(f"config.mesh.shape: at most one -1 is allowed, got {given}")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"config.mesh.shape: sizes must be positive or -1, got {given}")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ConfigError(f"config.mesh.shape: {given} does not divide the {num_devices} "
                      "available devices")
  if -1 in shape:
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(f"config.mesh.shape: {given} uses {math.prod(shape)} devices but "
                      f"{num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "context", "tensor") mesh; one size may be -1 (fill); a
  three-size shape is (data, fsdp, tensor) with context 1."""
  devices = jax.devices() if devices is None else list(devices)
  resolved = resolve_mesh_shape(shape, len(devices))
  try:
    return jax.make_mesh(resolved, MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  except NotImplementedError as e:   # jax cannot lay the sizes on the chips' torus
    raise ConfigError(
        f"config.mesh.shape: {tuple(resolved)} cannot be laid out on the {len(devices)} "
        f"{devices[0].platform} devices' physical topology ({str(e).strip().splitlines()[0]}); "
        "use sizes that are products of whole torus axes") from None


def state_shardings(abstract_state, mesh: Mesh, rules: Rules):
  """One NamedSharding per leaf, read from the logical names on the params.

  Leaves without logical names (step counters, RNG keys) are replicated.
  """
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
    specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def check_partition_specs(specs) -> None:
  """Raises ConfigError when a spec maps two dimensions of one array to one mesh axis."""
  for path, spec in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P))[0]:
    used = [a for dim in spec if dim is not None
            for a in ((dim,) if isinstance(dim, str) else dim)]
    if len(used) != len(set(used)):
      raise ConfigError(
          f"config.sharding_rules: {jax.tree_util.keystr(path)} gets {spec}, which uses a "
          "mesh axis for two of its dimensions")


def batch_axes(rules: Rules) -> tuple[str, ...] | str | None:
  """Mesh axes that the logical "batch" dimension maps to."""
  return dict((name, target) for name, target in rules).get("batch", ("data", "fsdp"))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """Shards of the leading (example) dimension: the product of the batch axes' sizes."""
  axes = batch_axes(rules) or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(int(mesh.shape[a]) for a in axes)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Leading (example) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(rules)))


def context_size(mesh) -> int:
  """Devices on the mesh's context axis (1 when it has none)."""
  return int(dict(mesh.shape).get(CONTEXT_AXIS, 1))


def process_slice(batch_sharding: NamedSharding) -> tuple[int, int]:
  """(index, count): which slice of the global batch this process feeds, of how many
  (the batch split over `batch_sharding`'s leading axes).

  Processes whose devices hold the same batch shards (they differ only along the
  context or tensor axes) feed the same rows, as `host_to_global` expects; with
  every process on its own batch shards this is (process_index, process_count).
  """
  if jax.process_count() == 1:
    return 0, 1
  mesh = batch_sharding.mesh
  spec = batch_sharding.spec
  grid = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  return batch_process_slices(grid, tuple(mesh.axis_names),
                              _axes_tuple(spec[0] if len(spec) else None), jax.process_index())


def _axes_tuple(axes) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_process_slices(process_grid: np.ndarray, axis_names: Sequence[str],
                         batch_mesh_axes: Sequence[str], process: int) -> tuple[int, int]:
  """(index, count) of `process`'s slice of the batch (`data_process`), from the
  process id of each device of the mesh grid (`process_grid`, shaped as the mesh).

  The batch is split over the batch axes' shards in order (data major); a process
  addressing shards [a, b) feeds rows of slice a / (b - a) of count / (b - a).

  Raises:
    ValueError: the process's shards are not contiguous, or processes overlap
      partly (no whole-slice assignment exists).
  """
  names = list(axis_names)
  keep = [names.index(a) for a in batch_mesh_axes]
  rest = [i for i in range(len(names)) if i not in keep]
  grid = np.transpose(process_grid, keep + rest)
  shards = int(np.prod([process_grid.shape[i] for i in keep]))
  grid = grid.reshape(shards, -1)                          # [batch shard, other devices]
  owned = sorted({s for s in range(shards) if (grid[s] == process).any()})
  if not owned:
    raise ValueError(f"process {process} has no device in the mesh")
  per = len(owned)
  if owned != list(range(owned[0], owned[0] + per)) or owned[0] % per or shards % per:
    raise ValueError(f"process {process} holds batch shards {owned} of {shards}: not one "
                     "contiguous, aligned slice")
  for start in range(0, shards, per):   # every other process must hold whole slices too
    held = {int(p) for p in np.unique(grid[start:start + per])}
    for p in held:
      rows = {s for s in range(shards) if (grid[s] == p).any()}
      if rows != set(range(start, start + per)):
        raise ValueError(f"processes {sorted(held)} share batch shards "
                         f"[{start}, {start + per}) but not all of them")
  return owned[0] // per, shards // per


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each process's numpy batch into one global jax.Array per key."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
