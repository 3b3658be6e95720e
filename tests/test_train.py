"""Training runs: data parallelism, the workdir, checkpoints, resume and failures."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from attn import rundir
from attn.data import datasets
from attn.inference import bleu, evaluation
from attn.training import checkpoint, loop, sharding
from tests import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses_process(devices: int, *args: str, switches: str = '{}') -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    env['MODEL_SWITCHES'] = switches
    return subprocess.Popen(
        [sys.executable, '-m', 'tests.multidevice_losses', *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _losses_on(devices: int, switches: str = '{}') -> list[float]:
    result = _result(_losses_process(devices, switches=switches))
    assert result['devices'] == devices
    return result['losses']


@pytest.mark.parametrize(
    'switches',
    ['{}', '{"norm": "rmsnorm", "ffn": "swiglu", "qk_norm": true, "num_kv_heads": 2}'],
    ids=['paper', 'modern'],
)
def test_one_device_equals_four_devices_with_dropout(switches):
    """The paper's model, and with the switches beyond it (RMSNorm, SwiGLU, QK-norm, GQA)."""
    one, four = np.array(_losses_on(1, switches)), np.array(_losses_on(4, switches))
    assert len(one) == 20
    assert np.max(np.abs(one - four) / np.abs(one)) <= 1e-5


def test_two_processes_equal_one_process_of_four_devices():
    """jax.distributed on loopback: 2 processes x 2 CPU devices == 1 process x 4 devices,
    each step's loss and gradient norm, while the learning rate climbs to its peak of 5.6e-2
    (step 10). A gradient summed over the processes, not averaged, shows in the norm (Adam
    updates alike for any scale of it); one that misses a process's rows shows in both. They
    agree to float32 round-off (1e-5 after 20 steps: the same sums, taken over the devices
    in another order)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    coordinator = f'127.0.0.1:{port}'
    processes = [_losses_process(2, coordinator, '2', str(i)) for i in range(2)]
    results = [_result(p) for p in processes]
    assert all(r['devices'] == 4 for r in results)
    one = np.array(_losses_on(4))
    for result in results:
        assert np.max(np.abs(np.array(result['losses']) - one) / np.abs(one)) <= 1e-5


def _params(workdir):
    step, params = toy.saved_params(workdir)
    return step, jax.tree.leaves(params)


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    return toy.data(tmp_path_factory.mktemp('toy'))


def test_train_writes_the_workdir_and_resumes_exactly(toy_data, tmp_path):
    whole = str(tmp_path / 'whole')
    result = loop.train_and_evaluate(toy.config(), whole, toy_data)
    assert set(os.listdir(whole)) >= {'config.json', 'checkpoints', 'tensorboard', 'metrics.jsonl'}
    assert os.listdir(os.path.join(whole, 'tensorboard'))
    rows = [
        json.loads(line)
        for line in (pathlib.Path(whole) / 'metrics.jsonl').read_text().splitlines()
    ]
    assert [r['step'] for r in rows if 'split' not in r] == [2, 4, 6]
    assert [r['step'] for r in rows if r.get('split') == 'validation'] == [3, 6]
    assert result.step == 6 and not result.preempted
    assert np.isfinite(result.validation['perplexity']) and result.validation['perplexity'] > 1

    split = str(tmp_path / 'split')
    loop.train_and_evaluate(toy.config(total_steps=3), split, toy_data)  # stops at 3
    loop.train_and_evaluate(toy.config(), split, toy_data)  # resumes at 3 to 6
    step_a, params_a = _params(whole)
    step_b, params_b = _params(split)
    assert step_a == step_b == 6
    assert max(float(np.abs(a - b).max()) for a, b in zip(params_a, params_b, strict=True)) == 0.0


def test_resume_drops_metrics_logged_past_the_checkpoint(toy_data, tmp_path):
    """Killed after logging step 6 but before saving it: the rerun from step 3 logs 4-6
    again, once each."""
    loop.train_and_evaluate(toy.config(), str(tmp_path), toy_data)
    shutil.rmtree(tmp_path / 'checkpoints' / '6')
    loop.train_and_evaluate(toy.config(), str(tmp_path), toy_data)
    rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [(r['step'], r.get('split')) for r in rows] == [
        (2, None),
        (3, 'validation'),
        (4, None),
        (6, None),
        (6, 'validation'),
    ]


def _toy_run(workdir, tokenizer_dir, workers: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, '-m', 'tests.toy_train', str(workdir), str(tokenizer_dir), str(workers)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_and_restart_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL once a checkpoint exists (mid-run, possibly mid-save), then rerun; the
    killed run reads with 2 worker processes, the uninterrupted one in-process."""
    tokenizers = tmp_path / 'tokenizers'
    whole = _toy_run(tmp_path / 'whole', tokenizers)
    _, err = whole.communicate(timeout=300)  # reads stderr as it comes: no full pipe
    assert whole.returncode == 0, err[-3000:]

    killed = _toy_run(tmp_path / 'killed', tokenizers, workers=2)
    checkpoints = tmp_path / 'killed' / 'checkpoints'
    deadline = time.monotonic() + 300
    while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(float(np.random.default_rng().uniform(0, 2)))  # somewhere after it
    killed.kill()
    killed.communicate(timeout=60)  # EOF once its worker processes have exited too
    again = _toy_run(tmp_path / 'killed', tokenizers, workers=2)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]

    step_a, params_a = _params(str(tmp_path / 'whole'))
    step_b, params_b = _params(str(tmp_path / 'killed'))
    assert step_a == step_b == 12
    assert max(float(np.abs(a - b).max()) for a, b in zip(params_a, params_b, strict=True)) == 0.0


def test_periodic_bleu_scores_that_steps_model_on_a_sample(toy_data, tmp_path, monkeypatch):
    """Every 3 steps sacreBLEU scores the translations, by that step's model, of the first 8
    validation examples against their German side (recorded: the toy's BLEU is 0)."""
    scored = []

    def record(hypotheses, references):
        scored.append((list(hypotheses), list(references)))
        return {'bleu': float(len(scored)), 'signature': ''}

    monkeypatch.setattr(bleu, 'sacre_bleu', record)
    config = toy.config(bleu_every_steps=3, bleu_examples=8)
    loop.train_and_evaluate(config, str(tmp_path), toy_data)
    rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    logged = [(r['step'], r['split'], r['bleu']) for r in rows if 'bleu' in r]
    assert logged == [(3, 'validation', 1.0), (6, 'validation', 2.0)]
    sample = [toy_data.splits['validation'][i] for i in range(8)]
    subset = datasets.Data(toy_data.tokenizer, toy_data.features, {'validation': sample})
    for step, (hypotheses, references) in zip((3, 6), scored, strict=True):
        assert references == [example['de'].decode() for example in sample]
        run = rundir.load(str(tmp_path), step=step)
        expected, _, _ = evaluation.translate_split(
            run.model, config, subset, 'validation', beam_size=4, alpha=0.6, mesh=run.mesh
        )
        assert hypotheses == expected


def test_incompatible_config_is_refused(toy_data, tmp_path):
    workdir = str(tmp_path)
    loop.train_and_evaluate(toy.config(total_steps=3), workdir, toy_data)
    saved = (tmp_path / 'config.json').read_text()
    with pytest.raises(checkpoint.CheckpointError, match=r'has shape .* in the checkpoint but'):
        loop.train_and_evaluate(toy.config(**{'model.mlp_dim': 48}), workdir, toy_data)
    assert (tmp_path / 'config.json').read_text() == saved  # the trained config, not the refused


def test_sigterm_saves_and_stops(toy_data, tmp_path, monkeypatch):
    """SIGTERM arrives while step 2's batch is loaded: the run saves step 2 and stops."""
    calls = []
    global_batch = sharding.global_batch

    def global_batch_then_sigterm(mesh, batch):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return global_batch(mesh, batch)

    monkeypatch.setattr(sharding, 'global_batch', global_batch_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        outcome = loop.train_and_evaluate(
            toy.config(checkpoint_every_steps=100), str(tmp_path), toy_data
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    step, _ = _params(str(tmp_path))
    assert step == 2  # saved where it was asked to stop, not at the end (6)
    assert outcome.step == 2 and outcome.preempted


def test_a_failed_save_still_closes_the_metrics_writer(toy_data, tmp_path, monkeypatch):
    """The save fails (a full disk, as Orbax reports it when waiting): the error reaches
    the caller, and the reporter's writers are closed all the same."""

    def failing_wait(self):
        raise OSError(28, 'No space left on device')

    closed = []
    close = loop.Reporter.close
    monkeypatch.setattr(checkpoint.Checkpointer, 'wait', failing_wait)
    monkeypatch.setattr(loop.Reporter, 'close', lambda self: closed.append(close(self)))
    with pytest.raises(OSError, match='No space left'):
        loop.train_and_evaluate(toy.config(total_steps=3), str(tmp_path), toy_data)
    assert len(closed) == 1


def test_non_finite_loss_stops_with_the_last_good_checkpoint(toy_data, tmp_path):
    config = toy.config(**{'optimizer.lr_scale': 1e30, 'checkpoint_every_steps': 1})
    config.log_every_steps = 1
    with pytest.raises(FloatingPointError, match='Non-finite training loss'):
        loop.train_and_evaluate(config, str(tmp_path), toy_data)
    step, params = _params(str(tmp_path))
    assert step >= 1
    assert all(np.isfinite(p).all() for p in params)


def test_a_restarted_data_order_is_seeded_by_the_step(toy_data):
    """A resume whose iterator state cannot continue restarts the data order: the same for
    the same step (a rerun reproduces it), another for another step or none."""
    config = toy.config()

    def first_targets(restart_at):
        iterator = toy_data.train_iterator(config, restart_at=restart_at)
        try:
            return next(iterator)['targets']
        finally:
            iterator.close()

    again = first_targets(4)
    np.testing.assert_array_equal(again, first_targets(4))
    assert not np.array_equal(again, first_targets(None))
    assert not np.array_equal(again, first_targets(8))


def test_a_resume_with_another_global_batch_restarts_the_data_order(toy_data, tmp_path, caplog):
    """Rows per batch changed (tokens_per_batch): the saved iterator state does not fit, so
    the state resumes and the data order restarts at the resumed step, with one warning."""
    caplog.set_level('WARNING', logger='absl')
    loop.train_and_evaluate(toy.config(total_steps=3), str(tmp_path), toy_data)
    wider = toy.config(**{'data.tokens_per_batch': 2 * toy.config().data.tokens_per_batch})
    outcome = loop.train_and_evaluate(wider, str(tmp_path), toy_data)
    assert outcome.step == 6
    warned = [r.getMessage() for r in caplog.records if 'data order restarts' in r.getMessage()]
    assert len(warned) == 1 and 'restarts at step 3' in warned[0]
