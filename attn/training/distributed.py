"""The processes of a multi-host run: joining them, and what they must agree on.

Every command that can span hosts (`attn.train`, `attn.evaluate`) starts
with `initialize()`. `jax.distributed` detects SLURM, TPU pods, Open MPI and Kubernetes, or
takes explicit flags; a cluster that was detected or requested but cannot start is an
error, never a silent single-process run (N lone processes would train into one workdir).

Once joined, the hosts agree through JAX's own collectives: `barrier`, `agreed_max` (e.g.
the padded width of an evaluation batch), `gather_rows` (each host's decoded rows, in
process order). With one process each is a no-op.
"""

from __future__ import annotations

import contextlib
import socket
import time

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from attn.errors import UserError

# jax.distributed's own default: how long processes wait for each other at start-up.
DEFAULT_TIMEOUT_S = 300


class ClusterError(UserError, RuntimeError):
    """A multi-process run that cannot start; the message names what was tried."""


def define_flags() -> None:
    """--coordinator_address, --num_processes, --process_id, --initialization_timeout."""
    if 'coordinator_address' in flags.FLAGS:
        return
    flags.DEFINE_string(
        'coordinator_address', None, 'host:port of process 0, where no cluster is auto-detected.'
    )
    flags.DEFINE_integer(
        'num_processes', None, 'Processes in the run (with --coordinator_address).'
    )
    flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
    flags.DEFINE_integer(
        'initialization_timeout',
        DEFAULT_TIMEOUT_S,
        'Seconds to wait for every process of a multi-process run to join.',
    )


def initialize_from_flags() -> None:
    FLAGS = flags.FLAGS
    initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        timeout_s=FLAGS.initialization_timeout,
    )


def detected_clusters() -> list[str]:
    """Names of the cluster environments jax.distributed would auto-detect here.

    JAX has no public API for this, so it reads JAX's own detection list; if a JAX release
    moves it, this degrades to "none detected" with a warning (explicit flags still work)
    instead of failing every launch."""
    try:
        from jax._src import clusters  # the detection jax.distributed.initialize() runs

        cluster_types = list(clusters.ClusterEnv._cluster_types)
    except Exception as error:  # noqa: BLE001 - a private API: any change means "unknown"
        logging.warning(
            'Cannot list the cluster environments JAX detects (%s: %s); assuming none. '
            'Pass --coordinator_address, --num_processes and --process_id for a '
            'multi-process run.',
            type(error).__name__,
            error,
        )
        return []
    found = []
    for env in cluster_types:
        with contextlib.suppress(Exception):
            if not env.opt_in_only_method and env.is_env_present():
                found.append(env.__name__)
    return found


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> None:
    """Joins a multi-process run: the one explicitly requested, else the detected one.

    With nothing requested and no cluster detected, this process runs alone. A requested
    or detected cluster that fails to start raises ClusterError.
    """
    if jax.distributed.is_initialized():
        return
    # Cross-process collectives between CPU devices (tests, CPU clusters) go through gloo.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    requested = any(x is not None for x in (coordinator_address, num_processes, process_id))
    detected = detected_clusters()
    if not requested and not detected:
        logging.info('No cluster requested or detected; running as a single process.')
        return
    if requested:
        what = (
            f'--coordinator_address={coordinator_address} --num_processes={num_processes} '
            f'--process_id={process_id}'
        )
        if not detected:  # else the cluster's environment fills in what is not given
            _check_request(coordinator_address, num_processes, process_id)
        if coordinator_address and process_id:  # jax aborts if the coordinator never answers
            _wait_for_coordinator(coordinator_address, timeout_s, what)
    else:
        what = f'the {", ".join(detected)} environment'
        logging.warning('Joining the multi-process run of %s.', what)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as error:  # noqa: BLE001 - any failure to join is fatal
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClusterError(
            f'Could not start the multi-process run requested by {what}: {first}. '
            + _FIX
            + (
                ' To run one process alone, unset the cluster environment variables.'
                if detected
                else ''
            )
        ) from None
    logging.info(
        'Process %d of %d; %d local / %d global devices.',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


_FIX = (
    'Start every process with the same --coordinator_address (host:port of process 0) and '
    '--num_processes and a distinct --process_id in [0, num_processes); make sure process 0 '
    'is running and its port reachable, or raise --initialization_timeout if the processes '
    'start far apart.'
)


def _check_request(coordinator_address, num_processes, process_id) -> None:
    missing = [
        f'--{name}'
        for name, value in (
            ('coordinator_address', coordinator_address),
            ('num_processes', num_processes),
            ('process_id', process_id),
        )
        if value is None
    ]
    if missing:
        raise ClusterError(
            f'A multi-process run needs --coordinator_address, --num_processes and '
            f'--process_id together; {", ".join(missing)} missing. ' + _FIX
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ClusterError(
            f'--process_id={process_id} is not in [0, --num_processes={num_processes}). ' + _FIX
        )
    host, _, port = coordinator_address.rpartition(':')
    if not host or not port.isdigit():
        raise ClusterError(
            f'--coordinator_address={coordinator_address} is not host:port (e.g. node0:1234).'
        )


def _wait_for_coordinator(address: str, timeout_s: float, what: str) -> None:
    """Returns once process 0's port accepts a connection; ClusterError after timeout_s."""
    host, _, port = address.rpartition(':')
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f'Could not start the multi-process run requested by {what}: no '
                    f'coordinator answered at {address} within {timeout_s:g} s ({error}). ' + _FIX
                ) from None
            time.sleep(0.25)


def is_main() -> bool:
    """Process 0: the one that writes shared files and prints reports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Returns once every process has reached the barrier called `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agreed_max(values) -> np.ndarray:
    """The element-wise maximum of `values` (ints, the same shape on every process)."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows [R, ...] (the same shape on each), in process order [P * R, ...]."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def main_first(name: str, work):
    """Runs `work()` on process 0, then on the others: for preparing shared files
    (datasets, tokenizers) that the other processes then only read.

    Process 0's outcome reaches every process in one collective (it replaces a barrier): if
    its `work()` raises, it raises that error and every other process raises a ClusterError
    naming it, at once, instead of waiting at a barrier process 0 never reaches until the
    distributed service times out, minutes later, with no word of the cause."""
    if jax.process_count() == 1:
        return work()
    if is_main():
        try:
            result = work()
        except BaseException as error:
            _share_failure(f'{type(error).__name__}: {error}')
            raise
        _share_failure('')
        return result
    failure = _share_failure('')
    if failure:
        raise ClusterError(
            f'Process 0 failed in {name!r} (preparing what every process reads), so this '
            f'process stops too: {failure}'
        )
    return work()


_FAILURE_BYTES = 2048  # of process 0's error message, shared with the other processes


def _share_failure(failure: str) -> str:
    """Process 0's `failure` ('' = none), as every process receives it."""
    first = failure.strip().splitlines()[0] if failure.strip() else ''
    data = np.zeros(_FAILURE_BYTES, np.uint8)
    encoded = first.encode('utf-8')[:_FAILURE_BYTES]
    data[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(shared).rstrip(b'\0').decode('utf-8', errors='replace')
