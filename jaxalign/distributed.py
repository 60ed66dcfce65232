"""Joining a multi-process (multi-host) job: `jax.distributed.initialize`, once, first.

One process per host (TPU VM worker, SLURM task, or a local process with its own
fake CPU devices) runs the same `jaxalign train` command. Before anything
touches a JAX backend, each calls `initialize`:

  explicit   --coordinator HOST:PORT --num_processes N --process_id I
             (or JAXALIGN_COORDINATOR / JAXALIGN_NUM_PROCESSES / JAXALIGN_PROCESS_ID)
  automatic  --distributed alone: JAX detects the cluster (Cloud TPU metadata,
             SLURM, Open MPI) and finds the coordinator, count and id itself.

On CPU the cross-process collectives go through gloo (set here before the
backend starts), so 2 local processes joined over 127.0.0.1 run the real
sharded step; `launch/local_multiprocess.sh` starts them.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxalign.errors import DistributedError

ENV_COORDINATOR = "JAXALIGN_COORDINATOR"
ENV_NUM_PROCESSES = "JAXALIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXALIGN_PROCESS_ID"
# Seconds without a heartbeat before the coordination service counts a process as
# lost and stops the others (jaxalign/peers.py turns that into one line).
HEARTBEAT_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How to join: all of coordinator/num_processes/process_id, or `auto` (detect)."""
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  timeout_s: int = 300
  heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S

  @property
  def is_multiprocess(self) -> bool:
    return self.auto or self.coordinator is not None


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def resolve(*, coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, auto: bool = False,
            timeout_s: int = 300, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> Cluster:
  """Flags, falling back to the JAXALIGN_* environment; checked before anything starts.

  Raises:
    DistributedError: naming the flag that is missing or out of range.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  explicit = (coordinator, num_processes, process_id)
  if heartbeat_timeout_s < 1:
    raise DistributedError(f"--heartbeat_timeout {heartbeat_timeout_s}: must be >= 1 second")
  if auto and any(v is not None for v in explicit):
    # Partial overrides of the detected values are allowed by JAX; keep them.
    return Cluster(coordinator, num_processes, process_id, auto=True, timeout_s=timeout_s,
                   heartbeat_timeout_s=heartbeat_timeout_s)
  if all(v is None for v in explicit):
    return Cluster(auto=auto, timeout_s=timeout_s, heartbeat_timeout_s=heartbeat_timeout_s)
  missing = [f"--{name}" for name, v in zip(("coordinator", "num_processes", "process_id"),
                                             explicit) if v is None]
  if missing:
    raise DistributedError(
        f"{', '.join(missing)} missing: give --coordinator HOST:PORT, --num_processes N and "
        "--process_id I together (or --distributed alone to detect them on TPU/SLURM)")
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. "
                           "127.0.0.1:12355")
  if num_processes < 1:
    raise DistributedError(f"--num_processes {num_processes}: must be >= 1")
  if not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id {process_id}: must be in [0, {num_processes})")
  return Cluster(coordinator, num_processes, process_id, timeout_s=timeout_s,
                 heartbeat_timeout_s=heartbeat_timeout_s)


def initialize(cluster: Cluster) -> None:
  """Joins the job described by `cluster`; a no-op for a single-process run.

  Must run before any JAX computation or device query in this process.
  """
  if not cluster.is_multiprocess:
    return
  # CPU collectives across processes (the default CPU client has none); harmless
  # on TPU/GPU, where only the host-side CPU client uses it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if cluster.coordinator is not None:
    kwargs["coordinator_address"] = cluster.coordinator
  if cluster.num_processes is not None:
    kwargs["num_processes"] = cluster.num_processes
  if cluster.process_id is not None:
    kwargs["process_id"] = cluster.process_id
  jax.distributed.initialize(initialization_timeout=cluster.timeout_s,
                             heartbeat_timeout_seconds=cluster.heartbeat_timeout_s, **kwargs)



def describe() -> str:
  """One line: this process, the process count and the devices (for logs)."""
  return (f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local of {jax.device_count()} "
          f"{jax.default_backend()} devices")
