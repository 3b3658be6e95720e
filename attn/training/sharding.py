"""Data parallelism over every device of every host.

One mesh axis, `data`: batches are split along it; parameters and optimizer state are
replicated, or, opt-in with `config.sharding='fsdp'` (ZeRO-3), each split over `data`
along one dimension, XLA gathering them where a step needs them whole (`state_shardings`).
Each host loads its own rows; `global_batch` joins them into arrays that span the mesh,
and `host_rows` takes this host's rows of a result back. Joining the hosts is
`attn.training.distributed`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from attn.errors import ConfigError

DATA_AXIS = 'data'
# 'replicated': every device holds the whole train state. 'fsdp': each device holds a
# 1 / devices slice of every parameter and Adam moment (ZeRO-3).
SHARDING_MODES = ('replicated', 'fsdp')


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(tree: Any, mesh: Mesh, mode: str) -> Any:
    """NamedShardings for the arrays of `tree` (a TrainState, an nnx.State of parameters,
    ...; jax.Arrays or ShapeDtypeStructs), in its structure.

    'replicated': every array whole on every device. 'fsdp': an array of rank >= 1 is split
    over `data` along its largest dimension that the `data` size divides (the first of
    equals); arrays with no such dimension, and scalars, are replicated. Optimizer moments
    have their parameter's shape, so they are split alike.
    """
    if mode not in SHARDING_MODES:
        raise ConfigError(f'config.sharding={mode!r} is not one of {SHARDING_MODES}.')
    devices = mesh.shape[DATA_AXIS]

    def spec(shape: tuple[int, ...]) -> PartitionSpec:
        divisible = [i for i, size in enumerate(shape) if size % devices == 0]
        if mode == 'replicated' or not divisible:
            return PartitionSpec()
        split = max(divisible, key=lambda i: shape[i])  # max() keeps the first of equals
        return PartitionSpec(*(DATA_AXIS if i == split else None for i in range(len(shape))))

    return jax.tree.map(lambda x: NamedSharding(mesh, spec(tuple(np.shape(x)))), tree)


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


def host_rows(mesh: Mesh, array: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded result (the rows `global_batch` took from it)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    local = multihost_utils.global_array_to_host_local_array(array, mesh, PartitionSpec(DATA_AXIS))
    return np.asarray(local)


def local_device_count(mesh: Mesh) -> int:
    """Devices of `mesh` on this host: a host's rows must be a multiple of this."""
    return len(mesh.local_devices)
