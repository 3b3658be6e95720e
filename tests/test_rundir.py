"""A run's directory is self-contained: a copy of W alone, with an empty data directory,
translates, scores and exports (the commands), analyses and averages (their library
entry points: the analyze command, in a new process, compiles the analysis's eager ops
again, ~50 s here). Run directories written before W/tokenizer/ existed, their configs
saved before today's fields, keep working."""

import copy
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from attn import average, configs, rundir
from attn.analysis import report
from attn.data import datasets
from attn.inference import scoring
from attn.training import checkpoint, sharding
from tests import toy

REPO = pathlib.Path(__file__).resolve().parent.parent


def _files(base: pathlib.Path, data: datasets.Data, split='test', count=3) -> tuple[str, str]:
    """en.txt and de.txt under `base`: the first `count` toy pairs of `split`."""
    examples = data.splits[split][:count]
    for name in ('en', 'de'):
        (base / f'{name}.txt').write_text(''.join(datasets.text(x[name]) + '\n' for x in examples))
    return str(base / 'en.txt'), str(base / 'de.txt')


def _pieces(data: datasets.Data, text: str) -> list[str]:
    return [data.tokenizer.id_to_piece(i) for i in data.tokenizer.encode(text)]


def test_training_keeps_the_tokenizer_in_the_run_directory(toy_run):
    workdir, data = toy_run
    model = pathlib.Path(workdir, rundir.TOKENIZER_DIR, rundir.MODEL_FILE)
    assert model.read_bytes() == pathlib.Path(data.tokenizer.path).read_bytes()
    assert (model.parent / 'meta.json').exists()  # how it was trained
    record = json.loads(pathlib.Path(workdir, rundir.TOKENIZER).read_text())
    assert record['sha256'] == rundir.tokenizer_fingerprint(data.tokenizer)
    found = rundir.tokenizer(workdir)
    assert str(found.path) == str(model)
    assert rundir.tokenizer_fingerprint(found) == record['sha256']


# ----------------------------------------------------------- a copy of W, without the data


@pytest.fixture(scope='module')
def laptop(toy_run, tmp_path_factory) -> pathlib.Path:
    """A folder holding a copy of the toy run's workdir (run/) and an empty data
    directory (tensorflow_datasets/), as on a machine the run was copied to."""
    base = tmp_path_factory.mktemp('laptop')
    shutil.copytree(toy_run[0], base / 'run')
    (base / 'tensorflow_datasets').mkdir()
    return base


def _refuse(*args, **kwargs):
    raise AssertionError('the dataset was read')


def _command(laptop: pathlib.Path, name: str, *flags: str, stdin: str = '') -> str:
    """`python -m attn.<name> --workdir=<the copy> FLAGS` with TFDS's data_dir (the toy
    config sets none) empty and `datasets.load` refusing: the command fails if it reads
    the dataset, and never builds the embedded corpus (which would download packages)."""
    program = (
        'import sys\n'
        'from attn.data import datasets\n'
        'def refuse(*args, **kwargs):\n'
        '    raise AssertionError("the dataset was read")\n'
        'datasets.load = refuse\n'
        f'from attn import {name}\n'
        f'sys.argv = ["attn {name}", "--workdir={laptop / "run"}", *{list(flags)!r}]\n'
        f'{name}.run()\n'
    )
    env = dict(os.environ, TFDS_DATA_DIR=str(laptop / 'tensorflow_datasets'))
    done = subprocess.run(
        [sys.executable, '-c', program],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_copied_run_directory_needs_no_dataset(laptop, toy_run, tmp_path):
    _, data = toy_run
    source, target = _files(tmp_path, data)
    lines = pathlib.Path(source).read_text().splitlines()

    translations = _command(laptop, 'translate', '--beam_size=2', stdin='\n'.join(lines) + '\n')
    assert len(translations.splitlines()) == len(lines)

    scores = _command(laptop, 'score', f'--source={source}', f'--target={target}')
    records = [json.loads(line) for line in scores.splitlines()]
    targets = pathlib.Path(target).read_text().splitlines()
    assert [r['tokens'] for r in records] == [_pieces(data, t) for t in targets]


def test_a_copied_run_directory_is_exported_without_its_dataset(laptop, toy_run, tmp_path):
    pytest.importorskip('ctranslate2')  # pip install -e '.[export]'
    _, data = toy_run
    exported = tmp_path / 'ct2'
    flags = (f'--out={exported}', '--format=ct2')
    assert _command(laptop, 'export', *flags).split() == [str(exported)]
    vocabulary = json.loads((exported / 'shared_vocabulary.json').read_text())
    assert vocabulary == [data.tokenizer.id_to_piece(i) for i in range(toy.VOCAB_SIZE)]


def test_a_copied_run_directory_is_analysed_without_its_dataset(
    laptop, toy_run, monkeypatch, tmp_path
):
    """The sentences test_analysis reads from the dataset, given as files (same shapes:
    its compiled ops are reused)."""
    _, data = toy_run
    monkeypatch.setattr(datasets, 'load', _refuse)
    source, target = _files(tmp_path, data, 'validation', count=4)
    out = tmp_path / 'analysis'
    summary = report.analyze(
        str(laptop / 'run'), str(out), sentences=4, prune_steps=4, source=source, target=target
    )
    assert summary['sentences'] == 4 and summary['heads'] == 24
    bertviz = json.loads((out / 'bertviz.json').read_text())
    first = pathlib.Path(source).read_text().splitlines()[0]
    assert bertviz['tokens']['encoder_self_attention']['key'] == _pieces(data, first)


def test_an_average_is_a_self_contained_run_directory(laptop, monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, 'load', _refuse)
    run, out = laptop / 'run', tmp_path / 'average'
    assert average.average(str(run), last=2, out=str(out))['steps'] == [3, 6]
    for name in (rundir.TOKENIZER, f'{rundir.TOKENIZER_DIR}/{rundir.MODEL_FILE}'):
        assert (out / name).read_bytes() == (run / name).read_bytes()
    assert str(rundir.tokenizer(str(out)).path).startswith(str(out))


# ------------------------------------------------- run directories written before this


def _saved_before(config) -> dict:
    """`config` as a run saved it before the fields of `configs.ADDED_FIELDS` (and
    model.remat) existed."""
    saved = config.to_dict()
    for key in configs.ADDED_FIELDS:
        *parents, leaf = key.split('.')
        node = saved
        for parent in parents:
            node = node[parent]
        del node[leaf]
    del saved['seeds'], saved['model']['remat']  # `seeds` is empty now
    return saved


@pytest.fixture(scope='module')
def old_run(toy_run, tmp_path_factory) -> pathlib.Path:
    """The toy run's last parameters in a workdir as written before W/tokenizer/ existed:
    W/config.json, W/tokenizer.json and one checkpoint, with the config saved then."""
    workdir, _ = toy_run
    old = tmp_path_factory.mktemp('old') / 'run'
    saved = _saved_before(toy.config())
    _, [step], params = rundir.load_params(workdir, mesh=sharding.make_mesh())
    ckpt = checkpoint.Checkpointer(rundir.checkpoints(old), keep=None, async_save=False)
    ckpt.save(step, {'step': jnp.asarray(step, jnp.int32), 'params': params}, config=saved)
    ckpt.close()
    (old / 'config.json').write_text(json.dumps(saved))
    shutil.copyfile(os.path.join(workdir, rundir.TOKENIZER), old / rundir.TOKENIZER)
    return old


def test_an_old_run_directory_reads_its_tokenizer_from_the_dataset(
    old_run, toy_run, monkeypatch, caplog, tmp_path
):
    """Upgraded config, the dataset's tokenizer (with one warning saying so), and the
    same scores as the run it was copied from."""
    workdir, data = toy_run
    read = []
    monkeypatch.setattr(datasets, 'load', lambda config, splits=None: read.append(splits) or data)
    run = rundir.load(str(old_run))
    assert run.config.sharding == 'replicated' and run.config.seeds.data is None  # upgraded
    source, target = _files(tmp_path, data)
    caplog.clear()  # the checkpoint's warnings
    with caplog.at_level(logging.WARNING):
        given, split = scoring.open_data(str(old_run), run.config, None, source, target)
    assert read == [['train']]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and 'has no tokenizer/' in warnings[0], warnings
    assert rundir.tokenizer_fingerprint(given.tokenizer) == rundir.tokenizer_fingerprint(
        data.tokenizer
    )
    got = list(scoring.score_split(run, given, split))
    want = list(scoring.score_split(rundir.load(workdir), given, split))
    assert [r['tokens'] for r in got] == [r['tokens'] for r in want]
    for mine, theirs in zip(got, want, strict=True):
        assert mine['logprob'] == pytest.approx(theirs['logprob'], abs=1e-5)


def test_another_tokenizer_than_the_recorded_one_is_refused(
    old_run, toy_run, monkeypatch, tmp_path
):
    workdir, data = toy_run
    other = copy.copy(data.tokenizer)
    other.id_to_piece = lambda i: 'x' if i == 7 else data.tokenizer.id_to_piece(i)
    monkeypatch.setattr(
        datasets, 'load', lambda config, splits=None: datasets.Data(other, data.features, {})
    )
    with pytest.raises(rundir.WorkdirError, match='another tokenizer.*data_dir'):
        rundir.tokenizer(str(old_run))  # the dataset's tokenizer has changed since

    copied = tmp_path / 'run'
    shutil.copytree(workdir, copied)
    record = json.loads((copied / rundir.TOKENIZER).read_text())
    (copied / rundir.TOKENIZER).write_text(json.dumps(record | {'sha256': '0' * 64}))
    with pytest.raises(rundir.WorkdirError, match='another tokenizer.*together'):
        rundir.tokenizer(str(copied))  # W/tokenizer/ is not the model recorded
    os.remove(copied / rundir.TOKENIZER)
    with pytest.raises(rundir.WorkdirError, match='another tokenizer'):
        rundir.check_tokenizer(str(copied), other)  # resuming with other data
    rundir.check_tokenizer(str(copied), data.tokenizer)


def test_reports_are_named_by_what_produced_them(tmp_path):
    """Split, steps and search in the name; the sweep and the Table 3 report read the one of
    the config's own search, or a report named before names said the search."""
    assert rundir.report_name('test', [700], (4, 0.6)) == 'test-700-beam4-alpha0.6'
    assert rundir.report_name('test', [300, 700], (1, 0.0)) == 'test-700-avg2-beam1-alpha0'
    assert rundir.report_name('validation', [350], None) == 'validation-350'  # a language model
    config = toy.config()  # beam 4, alpha 0.6
    (tmp_path / 'eval').mkdir()
    assert rundir.read_report(str(tmp_path), 'test', 6, config) is None
    (tmp_path / 'eval' / 'test-6.json').write_text('{"from": "before"}')
    assert rundir.read_report(str(tmp_path), 'test', 6, config) == {'from': 'before'}
    (tmp_path / 'eval' / 'test-6-beam1-alpha0.6.json').write_text('{"from": "greedy"}')
    (tmp_path / 'eval' / 'test-6-beam4-alpha0.6.json').write_text('{"from": "beam"}')
    assert rundir.read_report(str(tmp_path), 'test', 6, config) == {'from': 'beam'}
