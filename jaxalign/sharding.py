"""Mesh axes and logical-axis rules, the mesh from a shape, rules turned into NamedShardings.

Imports nothing of jaxalign but errors: models, data and config build on it.
"""

import math
from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

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
)


# Every logical axis name the model and the batch use; each needs a rule.
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 in `shape` by what fills `num_devices`; raises ConfigError."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ConfigError(f"config.mesh.shape: at most one -1 is allowed, got {shape}")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"config.mesh.shape: sizes must be positive or -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ConfigError(f"config.mesh.shape: {shape} does not divide the {num_devices} "
                      "available devices")
  if -1 in shape:
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(f"config.mesh.shape: {shape} uses {math.prod(shape)} devices but "
                      f"{num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh; one size may be -1 (fill)."""
  devices = jax.devices() if devices is None else list(devices)
  resolved = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(resolved, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


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


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each process's numpy batch into one global jax.Array per key."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
