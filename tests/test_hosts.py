"""Multi-host control over loopback: a failure on process 0 while it prepares what every
process reads (`distributed.main_first`) stops every process within seconds, each with one
line naming the cause; without a failure every process gets its result. Cluster detection
survives a JAX release that moves its private list."""

import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys

from attn import cli
from attn.errors import UserError
from attn.training import distributed


def main(argv):
    distributed.initialize_from_flags()

    def prepare():
        if distributed.is_main() and sys.argv[1] == 'fail':
            raise UserError('Cannot write the vocabulary to /data: set --config.data.data_dir.')
        return 'made' if distributed.is_main() else 'read'

    print(distributed.main_first('attn-data', prepare), flush=True)


if __name__ == '__main__':
    distributed.define_flags()
    cli.run(main)
"""


def _two_processes(tmp_path, outcome: str):
    script = tmp_path / 'prepare.py'
    script.write_text(SCRIPT)
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    start = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), outcome, f'--coordinator_address=127.0.0.1:{port}']
            + ['--num_processes=2', f'--process_id={i}', '--initialization_timeout=60'],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in processes]
    return results, time.monotonic() - start


def test_a_failure_on_process_0_stops_every_process_with_its_cause(tmp_path):
    results, seconds = _two_processes(tmp_path, 'fail')
    (_, err_0, code_0), (_, err_1, code_1) = results
    assert code_0 == 2 and code_1 == 2, (err_0[-2000:], err_1[-2000:])
    cause = 'Cannot write the vocabulary to /data: set --config.data.data_dir.'
    assert f'error: {cause}' in err_0
    assert "error: Process 0 failed in 'attn-data'" in err_1 and cause in err_1
    assert 'Traceback' not in err_0 + err_1
    assert seconds < 60  # not the distributed service's minutes-long timeout


def test_without_a_failure_every_process_gets_its_result(tmp_path):
    results, _ = _two_processes(tmp_path, 'ok')
    # gloo prints its own lines to stdout first
    assert [(out.split()[-1], code) for out, _, code in results] == [('made', 0), ('read', 0)]


def test_a_moved_jax_cluster_list_means_none_detected(monkeypatch, caplog):
    """Cluster detection reads a private JAX list; if a release moves it, launches go on as
    "no cluster detected" with a warning naming the explicit flags, not an AttributeError."""
    from jax._src import clusters

    from attn.training import distributed

    monkeypatch.delattr(clusters.ClusterEnv, '_cluster_types')
    with caplog.at_level('WARNING'):
        assert distributed.detected_clusters() == []
    assert '--coordinator_address' in caplog.text
