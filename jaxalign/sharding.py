"""Mesh from config, and logical-axis rules turned into NamedShardings."""

from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.config import MESH_AXES, ConfigError, resolve_mesh_shape

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


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


def model_partition_specs(model_cfg, rules: Rules):
  """Each parameter's PartitionSpec under `rules`, from an abstract model (nothing allocated)."""
  from jaxalign.models import transformer  # local: sharding stays importable from config

  abstract = nnx.eval_shape(lambda: transformer.Transformer(model_cfg, rngs=nnx.Rngs(0)))
  with nnx.logical_axis_rules(tuple(rules)):
    return nnx.get_partition_spec(nnx.state(abstract, nnx.Param))


def batch_axes(rules: Rules) -> tuple[str, ...] | str | None:
  """Mesh axes that the logical "batch" dimension maps to."""
  return dict((name, target) for name, target in rules).get("batch", ("data", "fsdp"))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Leading (example) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(rules)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each process's numpy batch into one global jax.Array per key."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
