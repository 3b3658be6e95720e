"""Fail clearly, lose nothing: one trainer per workdir, resumes that refuse other data or a
finished run, damaged checkpoints skipped (and kept), unwritable paths named, Ctrl-C saves.

Each case works on its own copy of the session's toy run (checkpoints 3 and 6)."""

import copy
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from attn import rundir
from attn.data import datasets
from attn.errors import UserError
from attn.inference import evaluation
from attn.training import checkpoint, loop, sharding
from tests import toy
from tests.toy import l10n

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run(toy_run, tmp_path):
    """(a copy of the toy run's workdir, its data)."""
    workdir, data = toy_run
    copied = tmp_path / 'workdir'
    shutil.copytree(workdir, copied)
    return copied, data


@pytest.fixture
def sleeper():
    """A live process of this host (its pid holds a lock in these tests)."""
    process = subprocess.Popen(['sleep', '120'])
    yield process.pid
    process.kill()
    process.wait()


def _hashes(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob('*'))
        if p.is_file()
    }


def _write_lock(workdir: pathlib.Path, host: str, pid: int) -> str:
    text = json.dumps({'host': host, 'pid': pid, 'since': '2031-01-02T03:04:05+00:00'})
    (workdir / '.lock').write_text(text)
    return text


def _counting_batches(monkeypatch, each=None) -> list:
    """Counts the training steps run (and calls `each(n)` at the n-th, from 1)."""
    calls = []
    global_batch = sharding.global_batch

    def counted(mesh, batch):
        calls.append(1)
        if each is not None:
            each(len(calls))
        return global_batch(mesh, batch)

    monkeypatch.setattr(sharding, 'global_batch', counted)
    return calls


def _warnings(caplog) -> str:
    return '\n'.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------------ 1. one trainer per workdir


def test_a_second_trainer_is_refused_naming_the_holder(run, sleeper):
    workdir, data = run
    lock = _write_lock(workdir, socket.gethostname(), sleeper)
    before = _hashes(workdir)
    with pytest.raises(rundir.WorkdirError) as error:
        loop.train_and_evaluate(toy.config(total_steps=9), str(workdir), data)
    message = str(error.value)
    assert f'pid {sleeper}' in message and socket.gethostname() in message
    assert '2031-01-02T03:04:05' in message and 'Wait' in message and 'delete' in message
    assert (workdir / '.lock').read_text() == lock  # the holder keeps its lock
    assert _hashes(workdir) == before


def test_a_lock_of_another_host_is_refused(run):
    workdir, data = run
    _write_lock(workdir, 'node-elsewhere', 4242)
    with pytest.raises(rundir.WorkdirError, match=r'another host.*node-elsewhere.*delete'):
        loop.train_and_evaluate(toy.config(), str(workdir), data)
    assert (workdir / '.lock').exists()


def test_a_stale_lock_is_taken_over_and_released(run, caplog):
    workdir, data = run
    gone = subprocess.Popen(['true'])
    gone.wait()
    _write_lock(workdir, socket.gethostname(), gone.pid)
    outcome = loop.train_and_evaluate(toy.config(), str(workdir), data)  # finished: no steps
    assert outcome.already_finished
    assert f'left by process {gone.pid}, which has exited' in _warnings(caplog)
    assert not (workdir / '.lock').exists()


# --------------------------------------------------------- 2. resuming with other data or vocab


@pytest.mark.parametrize(
    'field, value',
    [
        ('data.config', 'en-fr'),
        ('data.name', 'wmt14_translate'),
        ('data.vocab_size', 8000),
        ('data.source_lang', 'fr'),
        ('data.worker_count', 2),  # the saved iterator state is laid out by it
    ],
)
def test_resume_with_other_data_is_refused_before_any_data_is_built(run, monkeypatch, field, value):
    workdir, _ = run

    def never(*args, **kwargs):
        raise AssertionError('data built before the refusal')

    monkeypatch.setattr(datasets, 'load', never)
    before = _hashes(workdir)
    with pytest.raises(UserError) as error:
        loop.train_and_evaluate(toy.config(**{field: value}), str(workdir))
    saved = json.loads((workdir / 'config.json').read_text())['data'][field.split('.')[1]]
    assert f'{field} is {value!r}' in str(error.value) and repr(saved) in str(error.value)
    assert _hashes(workdir) == before


def test_resume_with_another_tokenizer_is_refused(run):
    workdir, data = run
    other = copy.copy(data.tokenizer)
    other.id_to_piece = lambda i: 'x' if i == 7 else data.tokenizer.id_to_piece(i)
    before = _hashes(workdir)
    with pytest.raises(rundir.WorkdirError, match='another tokenizer'):
        loop.train_and_evaluate(
            toy.config(total_steps=9),
            str(workdir),
            datasets.Data(other, data.features, data.splits),
        )
    assert _hashes(workdir) == before


# ------------------------------------------------------------------ 3. finished, or past the end


def test_a_finished_run_does_nothing(run, monkeypatch, caplog):
    workdir, data = run
    calls = _counting_batches(monkeypatch)
    before = _hashes(workdir)
    outcome = loop.train_and_evaluate(toy.config(), str(workdir), data)
    assert outcome.step == 6 and outcome.already_finished and not calls
    assert 'already finished at step 6; nothing to do' in _warnings(caplog)
    assert _hashes(workdir) == before


def test_a_checkpoint_past_total_steps_is_refused(run):
    workdir, data = run
    with pytest.raises(UserError, match=r'step 6, past total_steps=4.*above 6.*new --workdir'):
        loop.train_and_evaluate(toy.config(total_steps=4), str(workdir), data)


def _cli(workdir, tokenizer_dir, *flags) -> subprocess.CompletedProcess:
    """`python -m attn.train` of the toy model, with `datasets.load` giving the toy data."""
    script = (
        'from attn import train; from attn.data import datasets; from tests import toy; '
        f'datasets.load = lambda config, splits=None: toy.data({str(tokenizer_dir)!r}); '
        'train.run()'
    )
    argv = ['--config=configs/l10n.py:size=tiny', f'--config.data.vocab_size={toy.VOCAB_SIZE}']
    return subprocess.run(
        [sys.executable, '-c', script, *argv, f'--workdir={workdir}', *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_command_reports_a_finished_run_and_refuses_one_past_its_end(run):
    workdir, data = run
    tokenizers = data.tokenizer.path.parent.parent
    finished = _cli(workdir, tokenizers, '--config.total_steps=6')
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert report['step'] == 6 and report['already_finished']
    assert 'already finished at step 6; nothing to do' in finished.stderr

    past = _cli(workdir, tokenizers, '--config.total_steps=4')
    assert past.returncode != 0 and 'Traceback' not in past.stderr
    errors = [line for line in past.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'past total_steps=4' in errors[0], past.stderr[-3000:]


# ------------------------------------------------------------------------ 4. damaged checkpoints


def _truncate_arrays(step: pathlib.Path) -> None:
    files = [p for p in (step / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    'truncated arrays': _truncate_arrays,
    'no _CHECKPOINT_METADATA': lambda step: (step / '_CHECKPOINT_METADATA').unlink(),
    'no state metadata': lambda step: (step / 'state' / '_METADATA').unlink(),
    'no iterator state': lambda step: shutil.rmtree(step / 'data'),
}


# A failed TensorStore read can leave a callback for Orbax's closed event loop: noise only.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', list(DAMAGES))
def test_a_damaged_checkpoint_falls_back_to_the_one_before(
    run, toy_run, monkeypatch, caplog, damage
):
    workdir, data = run
    checkpoints = workdir / 'checkpoints'
    DAMAGES[damage](checkpoints / '6')
    damaged = _hashes(checkpoints / '6')
    earlier = _hashes(checkpoints / '3')
    unchanged_at_start = []

    def check(n):
        if n == 1:  # the fallback has restored step 3 and is about to train from it
            unchanged_at_start.append(_hashes(checkpoints / '3') == earlier)

    _counting_batches(monkeypatch, check)
    caplog.set_level(logging.INFO, logger='absl')
    outcome = loop.train_and_evaluate(toy.config(), str(workdir), data)
    assert outcome.step == 6
    assert f'Restored checkpoint of step 3 from {checkpoints}' in caplog.text
    assert unchanged_at_start == [True]
    assert f'Checkpoint {checkpoints / "6"} cannot be read' in _warnings(caplog)
    assert 'different model' not in caplog.text
    assert _hashes(checkpoints / '6.unreadable') == damaged  # kept as it was, aside
    step, params = toy.saved_params(str(workdir))
    _, uninterrupted = toy.saved_params(toy_run[0])
    assert step == 6
    for a, b in zip(toy.leaves(params), toy.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)  # resumed exactly from 3, iterator included


def test_no_readable_checkpoint_is_one_line_naming_the_directory(run):
    workdir, data = run
    checkpoints = workdir / 'checkpoints'
    (checkpoints / '6' / '_CHECKPOINT_METADATA').unlink()
    shutil.rmtree(checkpoints / '3' / 'data')
    with pytest.raises(checkpoint.CheckpointError) as error:
        loop.train_and_evaluate(toy.config(), str(workdir), data)
    message = str(error.value)
    assert str(checkpoints / '6') in message and str(checkpoints / '3') in message
    assert '\n' not in message and 'different model' not in message
    assert sorted(os.listdir(checkpoints)) == ['3', '6']  # nothing moved or deleted


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', ['truncated arrays', 'no state metadata'])
def test_reading_commands_use_the_newest_readable_checkpoint(run, caplog, damage):
    """Without --step, a damaged latest checkpoint is named in one warning and the one
    before it read, nothing moved; asked for by --step, or averaged over, it is refused.
    (What a reading command never reads, the iterator state or the commit record, does not
    make a checkpoint unreadable to it.)"""
    workdir, _ = run
    checkpoints = workdir / 'checkpoints'
    DAMAGES[damage](checkpoints / '6')
    before = _hashes(checkpoints)
    caplog.set_level(logging.INFO, logger='absl')
    assert rundir.load(str(workdir)).steps == [3]
    warnings = [w for w in _warnings(caplog).splitlines() if 'cannot be read' in w]
    assert len(warnings) == 1 and f'Checkpoint {checkpoints / "6"} cannot be read' in warnings[0]
    assert 'using step 3, the newest readable one' in warnings[0]
    for asked in (dict(step=6), dict(average_last=2)):
        with pytest.raises(checkpoint.CheckpointError, match=r'the others kept are \[3\]'):
            rundir.load(str(workdir), **asked)
    assert _hashes(checkpoints) == before


def test_a_checkpoint_attn_did_not_write_is_one_line(tmp_path):
    """An Orbax checkpoint of something else under W/checkpoints, through attn.translate."""
    manager = ocp.CheckpointManager(tmp_path / 'checkpoints')
    manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave({'w': np.ones(3)})))
    manager.wait_until_finished()
    manager.close()
    result = subprocess.run(
        [sys.executable, '-m', 'attn.translate', f'--workdir={tmp_path}'],
        input='Hello.\n',
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert f'error: {tmp_path / "checkpoints" / "5"} is not a checkpoint attn.train wrote' in last
    assert "its items: ['params']" in last


# ------------------------------------------------------------------------- 5. disk, permissions


def test_a_workdir_under_a_file_is_named(toy_run, tmp_path):
    _, data = toy_run
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a directory')
    with pytest.raises(rundir.WorkdirError, match=f'{blocker} is a file, not a directory'):
        loop.train_and_evaluate(toy.config(), str(blocker / 'run'), data)


@pytest.fixture
def mount(tmp_path):
    """mount(kilobytes, populate=None, read_only=False): a fresh tmpfs of that size (the
    real ENOSPC and EROFS of a full or read-only disk), filled by `populate(directory)`."""
    mounted = []

    def make(kilobytes, populate=None, read_only=False):
        target = tmp_path / f'disk{len(mounted)}'
        target.mkdir()
        done = subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', f'size={kilobytes}k', 'tmpfs', str(target)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f'a tmpfs cannot be mounted here: {done.stderr.strip()}')
        mounted.append(target)
        if populate is not None:
            populate(target)
        if read_only:
            subprocess.run(['mount', '-o', 'remount,ro', str(target)], check=True)
        return target

    yield make
    for target in mounted:
        subprocess.run(['umount', '-l', str(target)], check=True)


def _kilobytes(directory) -> int:
    return sum(p.stat().st_size for p in pathlib.Path(directory).rglob('*') if p.is_file()) // 1024


def test_a_read_only_workdir_is_named(toy_run, mount):
    workdir, data = toy_run
    disk = mount(4 * _kilobytes(workdir), lambda d: shutil.copytree(workdir, d / 'w'), True)
    before = _hashes(disk / 'w')
    with pytest.raises(rundir.WorkdirError, match=f'Read-only file system: {disk / "w"}'):
        loop.train_and_evaluate(toy.config(total_steps=9), str(disk / 'w'), data)
    assert _hashes(disk / 'w') == before


@pytest.mark.parametrize('found', ['before the save', 'by the save'])
def test_a_full_disk_is_named_and_keeps_every_checkpoint(toy_run, mount, monkeypatch, found):
    workdir, data = toy_run
    # Room for the copy and a little more, not for a third checkpoint.
    disk = mount(_kilobytes(workdir) + 300, lambda d: shutil.copytree(workdir, d / 'w'))
    checkpoints = disk / 'w' / 'checkpoints'
    before = {step: _hashes(checkpoints / step) for step in ('3', '6')}
    if found == 'by the save':  # the free space ran out after the check (another writer)
        roomy = shutil.disk_usage(disk)._replace(free=2**40)
        monkeypatch.setattr(shutil, 'disk_usage', lambda path: roomy)
    what = 'needs .* nothing was written' if found == 'before the save' else r'failed \(.*\)'
    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf'No space left on device: saving checkpoint 9 in {checkpoints} {what}\. '
        'Checkpoints 3 and 6 are intact',
    ):
        loop.train_and_evaluate(toy.config(total_steps=12), str(disk / 'w'), data)
    assert {step: _hashes(checkpoints / step) for step in ('3', '6')} == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ['3', '6']  # no partial save left
    assert not (disk / 'w' / '.lock').exists()


def test_a_read_only_data_dir_is_read(fixture_corpus, mount):
    disk = mount(
        4 * _kilobytes(fixture_corpus) + 1024,
        lambda d: shutil.copytree(fixture_corpus, d / 'data'),
        read_only=True,
    )
    config = l10n.get_config('size=tiny')
    config.data.data_dir = str(disk / 'data')
    data = datasets.load(config)
    assert next(data.train_iterator(config))['inputs'].any()


def test_preparing_into_a_read_only_data_dir_is_named(mount):
    disk = mount(64, read_only=True)
    config = l10n.get_config('size=tiny')
    config.data.data_dir = str(disk / 'data')
    with pytest.raises(UserError, match=f'Read-only file system.*{disk}'):
        datasets.load(config)


def test_damage_inside_a_record_file_is_named_when_it_is_read(fixture_corpus, tmp_path):
    data_dir = tmp_path / 'data'
    shutil.copytree(fixture_corpus, data_dir)
    (train,) = data_dir.glob('l10n_translate/en-de/*/l10n_translate-train.array_record*')
    content = bytearray(train.read_bytes())
    quarter = len(content) // 4  # away from the first, middle and last records
    content[quarter : quarter + 64] = bytes(64)
    train.write_bytes(bytes(content))
    config = l10n.get_config('size=tiny')
    config.data.data_dir = str(data_dir)
    # The probed records are intact; the changed file gets a tokenizer of its own, whose
    # training reads every record, so the damage is found there, or else by the reader.
    with pytest.raises(datasets.DataError, match=rf"'train' split .* in {data_dir}.* damaged"):
        data = datasets.load(config)
        for _ in data.eval_batches(config, 'train'):
            pass


def test_an_unwritable_eval_report_is_a_warning(tmp_path, caplog):
    (tmp_path / 'eval').write_text('a file where the directory goes')
    assert evaluation.write_report(str(tmp_path), {'bleu': 1.0}, 'test-6') is None
    assert f'{tmp_path / "eval" / "test-6.json"}' in _warnings(caplog)


def test_an_eval_report_on_a_full_disk_is_a_warning_and_leaves_no_partial_file(mount, caplog):
    disk = mount(16)
    (disk / 'filler').write_bytes(bytes(16 * 1024 - 100))
    assert evaluation.write_report(str(disk), {'hypotheses': ['x' * 8192]}, 'test-6') is None
    assert f'{disk / "eval" / "test-6.json"}' in _warnings(caplog)
    assert not (disk / 'eval' / 'test-6.json').exists()


# ------------------------------------------------------------------------------------ 6. Ctrl-C


def test_ctrl_c_saves_at_the_next_step_and_releases_everything(toy_run, tmp_path, monkeypatch):
    _, data = toy_run
    workdir = tmp_path / 'interrupted'
    holders = []

    def interrupt(n):
        holders.append(json.loads((workdir / '.lock').read_text())['pid'])
        if n == 2:
            os.kill(os.getpid(), signal.SIGINT)

    _counting_batches(monkeypatch, interrupt)
    outcome = loop.train_and_evaluate(toy.config(checkpoint_every_steps=100), str(workdir), data)
    assert outcome.step == 2 and outcome.preempted
    assert toy.saved_params(str(workdir))[0] == 2
    assert holders == [os.getpid()] * 2  # this trainer held the lock while it ran
    assert not (workdir / '.lock').exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
