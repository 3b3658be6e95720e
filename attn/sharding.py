"""Data parallelism over every device of every host.

One mesh axis, `data`: batches are split along it, parameters and optimizer state are
replicated. Each host loads its own rows; `global_batch` joins them into arrays that
span the mesh. Multi-host runs start with `initialize_distributed()`, which lets
`jax.distributed` detect SLURM, TPU pods and Kubernetes, or takes explicit flags.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process run; a no-op for one process with nothing to detect.

    With no arguments `jax.distributed.initialize()` auto-detects the cluster
    (SLURM, TPU pods, Kubernetes, ...). Outside any cluster it raises; a plain
    one-host run then simply continues alone.
    """
    # Cross-process collectives between CPU devices (tests, CPU clusters) go through gloo.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if coordinator_address is not None or num_processes is not None:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as error:
            logging.info('No cluster detected (%s); running as a single process.', error)
            return
    logging.info(
        'Process %d of %d; %d local / %d global devices.',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Joins each host's rows [rows, ...] into global arrays [rows * processes, ...]."""
    sharding = batch_sharded(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, array)
        for name, array in local_batch.items()
    }
