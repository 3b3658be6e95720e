"""Every command on every topology: 1, 2 and 4 devices, and 2 processes x 2 devices over
loopback, give the same numbers and text; preemption and start-up failures cannot split
the hosts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pytest

from attn import errors
from tests import toy
from tests.topology_commands import run_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FLAGS = [
    '--config=configs/l10n.py:size=tiny',
    '--config.total_steps=12',
    '--config.eval_every_steps=12',
    '--config.checkpoint_every_steps=4',
    '--config.log_every_steps=4',
    '--config.data.eval_batch_size=8',  # 8 rows per evaluation batch: fast on any topology
]


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _start(command: str, flags: list[str], *, devices: int, stderr, process=None, port=None):
    """`python -m attn.<command> flags` as process `process` of 2 (or alone)."""
    cluster = []
    if process is not None:
        cluster = [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
        cluster.append(f'--process_id={process}')
    return subprocess.Popen(
        [sys.executable, '-m', f'attn.{command}', *flags, *cluster],
        cwd=REPO,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def _two_hosts(
    command: str, flags: list[str], tmp_path, on_start=None, status: int = 0
) -> list[dict]:
    """Runs `command` as 2 processes x 2 devices; each process's exit status (asserted to
    be `status`) and report."""
    port, processes, logs = _port(), [], []
    for i in range(2):
        logs.append(open(tmp_path / f'{command}-{i}.log', 'w+'))  # noqa: SIM115 - closed below
        processes.append(_start(command, flags, devices=2, stderr=logs[i], process=i, port=port))
    if on_start:
        on_start(processes, [tmp_path / f'{command}-{i}.log' for i in range(2)])
    results = []
    for process, log in zip(processes, logs, strict=True):
        out, _ = process.communicate(timeout=600)
        log.seek(0)
        reports = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
        results.append({'returncode': process.returncode, 'reports': reports, 'log': log.read()})
        log.close()
    for result in results:
        assert result['returncode'] == status, result['log'][-3000:]
    return results


@pytest.fixture(scope='module')
def two_hosts(fixture_corpus, tmp_path_factory):
    """A tiny run trained by 2 processes x 2 devices with the test-set decode at the end,
    started as users rehearse a two-host run: `PROCESSES=2 launch/local.sh`."""
    tmp = tmp_path_factory.mktemp('two_hosts')
    workdir = str(tmp / 'workdir')
    flags = [*TRAIN_FLAGS, f'--workdir={workdir}', f'--config.data.data_dir={fixture_corpus}']
    config, *rest = [f for f in flags if not f.startswith('--workdir')]
    result = subprocess.run(
        ['bash', 'launch/local.sh', config.removeprefix('--config='), workdir, *rest]
        + ['--config.bleu_at_end=True'],
        cwd=REPO,
        env=dict(_env(2), PROCESSES='2', PORT=str(_port())),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    assert len(reports) == 1  # process 0 reports, alone
    return workdir, reports[0], flags


@pytest.fixture(scope='module')
def one_device(two_hosts, tmp_path_factory):
    """Every checkpoint-reading command on the two-host run, in one process of 1 device."""
    out = tmp_path_factory.mktemp('one_device')
    return _commands_on(1, two_hosts[0], out)


def _commands_on(devices: int, workdir: str, out) -> dict:
    return _commands_result(_start_commands(devices, workdir, out), devices)


def _start_commands(devices: int, workdir: str, out) -> tuple[subprocess.Popen, Any]:
    """The process and its stderr, in a file: a pipe nobody reads while this process works
    would fill."""
    log = tempfile.TemporaryFile('w+')  # noqa: SIM115 - closed in _commands_result
    command = [sys.executable, '-m', 'tests.topology_commands', workdir, str(out)]
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=log, text=True
    )
    return process, log


def _commands_result(started: tuple[subprocess.Popen, Any], devices: int) -> dict:
    process, log = started
    out, _ = process.communicate(timeout=600)
    with log:
        log.seek(0)
        assert process.returncode == 0, log.read()[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report['devices'] == devices
    return report


def _assert_same(a: dict, b: dict) -> None:
    """The same text everywhere; numbers equal to float32 round-off."""
    for key in ('evaluate', 'evaluate_average'):
        assert a[key]['samples'] == b[key]['samples']
        assert a[key]['sacrebleu'] == b[key]['sacrebleu']
        assert a[key]['perplexity'] == pytest.approx(b[key]['perplexity'], rel=1e-5)
    assert a['translate'] == b['translate']
    for key in ('attention', 'importance'):
        np.testing.assert_allclose(a['analyze'][key], b['analyze'][key], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        [p for _, p in a['analyze']['pruning']], [p for _, p in b['analyze']['pruning']], rtol=1e-5
    )
    assert a['average']['steps'] == b['average']['steps'] == [8, 12]
    np.testing.assert_allclose(a['average']['sums'], b['average']['sums'], rtol=1e-6, atol=1e-6)


def test_two_hosts_decode_at_the_end_as_one_device_does(two_hosts, one_device):
    _, report, _ = two_hosts
    assert report['step'] == 12
    test = report['test']
    assert test['examples'] == len(one_device['evaluate']['samples'])  # every example shown
    assert test['samples'] == one_device['evaluate']['samples']
    assert test['sacrebleu'] == one_device['evaluate']['sacrebleu']
    assert test['perplexity'] == pytest.approx(one_device['evaluate']['perplexity'], rel=1e-5)


def test_evaluate_on_two_hosts_equals_one_device(two_hosts, one_device, tmp_path):
    workdir = two_hosts[0]
    flags = [f'--workdir={workdir}', '--split=test', '--average_last=2']
    results = _two_hosts('evaluate', flags, tmp_path)
    assert [len(r['reports']) for r in results] == [1, 0]
    report = results[0]['reports'][0]
    expected = one_device['evaluate_average']
    assert report['checkpoint_steps'] == [8, 12]
    assert report['samples'] == expected['samples']
    assert report['sacrebleu'] == expected['sacrebleu']
    assert report['perplexity'] == pytest.approx(expected['perplexity'], rel=1e-5)


def test_commands_give_the_same_numbers_and_text_on_1_2_and_4_devices(
    two_hosts, one_device, tmp_path
):
    """This session's 2 devices, and 4 devices in a subprocess (running meanwhile), against
    1 device."""
    four = _start_commands(4, two_hosts[0], tmp_path / 'four')
    two = run_all(two_hosts[0], str(tmp_path / 'two'))
    assert two['devices'] == 2
    _assert_same(two, one_device)
    _assert_same(_commands_result(four, 4), one_device)


def test_sigterm_to_one_host_stops_both_at_one_step_and_the_rerun_equals(two_hosts, tmp_path):
    """SIGTERM reaches process 1 alone, once both have joined: both save the same step
    (agreed by JAX's preemption service) and exit 75, errors.PREEMPTED; the rerun finishes
    like a run that was never interrupted, bit for bit."""
    whole, _, flags = two_hosts
    workdir = str(tmp_path / 'workdir')
    flags = [f for f in flags if not f.startswith('--workdir')] + [f'--workdir={workdir}']

    def sigterm_process_1(processes, logs):
        deadline = time.monotonic() + 300
        while 'Process 1 of 2' not in logs[1].read_text():
            assert processes[1].poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGTERM)

    results = _two_hosts(
        'train', flags, tmp_path, on_start=sigterm_process_1, status=errors.PREEMPTED
    )
    report = results[0]['reports'][0]
    assert report['preempted'] and report['step'] < 12
    saved = sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints')))
    assert saved == [report['step']]  # one step, saved by both processes together
    assert 'Stopped at step' in results[1]['log']

    again = _two_hosts('train', flags, tmp_path)
    assert again[0]['reports'][0]['step'] == 12 and 'preempted' not in again[0]['reports'][0]
    step_a, params_a = toy.saved_params(whole)
    step_b, params_b = toy.saved_params(workdir)
    assert step_a == step_b == 12
    for a, b in zip(toy.leaves(params_a), toy.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_cluster_that_cannot_start_fails_at_once_and_writes_nothing(tmp_path):
    workdir = tmp_path / 'workdir'
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'attn.train',
            '--config=configs/l10n.py:size=tiny',
            f'--workdir={workdir}',
            f'--coordinator_address=127.0.0.1:{_port()}',  # nobody listens there
            '--num_processes=2',
            '--process_id=1',
            '--initialization_timeout=2',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert 'Traceback' not in result.stderr
    assert 'error: Could not start the multi-process run' in result.stderr
    assert '--coordinator_address' in result.stderr.splitlines()[-1]
    assert not workdir.exists()


def _train_alone(flags: list[str], devices: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'attn.train', *flags],
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        rows = [json.loads(line) for line in f]
    return {row['step']: row['loss'] for row in rows if 'loss' in row and 'split' not in row}


def _assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    """Equal to float32 round-off: the same batches, summed over the devices in another
    order (as in test_train's 2 processes against 1 process of 4 devices)."""
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


def test_a_two_process_run_resumes_on_one_process_exactly(two_hosts, tmp_path):
    """Step 4 of the two-host run, resumed by 1 process of 4 devices (the same global
    batch): the data order continues, so steps 8 and 12 are the uninterrupted run's."""
    whole, _, flags = two_hosts
    workdir = tmp_path / 'workdir'
    shutil.copytree(whole, workdir)
    for step in (8, 12):
        shutil.rmtree(workdir / 'checkpoints' / str(step))
    flags = [f for f in flags if not f.startswith('--workdir')] + [f'--workdir={workdir}']
    result = _train_alone(flags, devices=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Restored checkpoint of step 4' in result.stderr
    assert 'data order restarts' not in result.stderr
    losses = _losses(workdir)
    assert sorted(losses) == [4, 8, 12]
    _assert_same_losses(losses, _losses(whole))


def test_a_one_process_run_trains_and_resumes_on_two_processes_exactly(
    two_hosts, fixture_corpus, tmp_path
):
    """1 process of 4 devices trains as the two-host run did, and its step 4 resumed by 2
    processes of 2 devices continues as that run."""
    workdir = tmp_path / 'workdir'
    flags = [*TRAIN_FLAGS, f'--workdir={workdir}', f'--config.data.data_dir={fixture_corpus}']
    first = _train_alone([*flags, '--config.total_steps=4'], devices=4)
    assert first.returncode == 0, first.stderr[-3000:]
    results = _two_hosts('train', [*flags, '--config.total_steps=8'], tmp_path)
    assert not any('data order restarts' in result['log'] for result in results)
    assert results[0]['reports'][0]['step'] == 8
    losses = _losses(workdir)
    assert sorted(losses) == [4, 8]
    _assert_same_losses(losses, _losses(two_hosts[0]))
