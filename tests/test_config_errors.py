"""Every bad setting is refused before anything builds or trains: `configs.validate`
in-process, and through the commands one line on stderr (`error: ...`) naming the field,
a non-zero exit status and no traceback."""

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import pytest
import tensorflow_datasets as tfds

from attn import cli, configs
from attn.data import datasets
from attn.errors import ConfigError
from attn.training import loop
from tests.test_configs import ALL, load
from tests.toy import l10n

ROOT = pathlib.Path(__file__).parent.parent


def tiny(**fields):
    """configs/l10n.py:size=tiny with dotted `fields` set."""
    return configs.set_fields(l10n.get_config('size=tiny'), fields)


@pytest.mark.parametrize('name,arg', ALL, ids=[f'{n}:{a}' for n, a in ALL])
def test_every_config_validates(name, arg):
    config = load(name, arg)
    configs.validate(config)  # this session's devices
    configs.validate(config, devices=8)  # an 8-GPU host


@pytest.mark.parametrize(
    'fields,match',
    [
        (
            dict(checkpoint_every_steps=0),
            r'config.checkpoint_every_steps=0 must be an integer >= 1',
        ),
        (dict(eval_every_steps=-5), r'config.eval_every_steps=-5 must be an integer >= 1'),
        (dict(log_every_steps=0), r'config.log_every_steps=0 must be an integer >= 1'),
        (dict(total_steps=0), r'config.total_steps=0 leaves nothing to train'),
        (dict(total_steps=-1), r'config.total_steps=-1 leaves nothing to train'),
        ({'optimizer.warmup_steps': 0}, r'config.optimizer.warmup_steps=0 .*divides by it'),
        (dict(label_smoothing=1.0), r'config.label_smoothing=1.0 must be in \[0, 1\)'),
        (dict(label_smoothing=-0.1), r'config.label_smoothing=-0.1 must be in \[0, 1\)'),
        (dict(keep_checkpoints=0), r'config.keep_checkpoints=0 .*keep at least 1'),
        (dict(grad_accum_steps=0), r'config.grad_accum_steps=0 must be an integer >= 1'),
        (dict(loss_chunk=-1), r'config.loss_chunk=-1 must be an integer >= 0'),
        (dict(bleu_every_steps=-1), r'config.bleu_every_steps=-1 must be an integer >= 0'),
        (dict(bleu_examples=0), r'config.bleu_examples=0 must be an integer >= 1'),
        ({'data.eval_batch_size': 0}, r'config.data.eval_batch_size=0 must be an integer >= 1'),
        ({'data.tokens_per_batch': 0}, r'config.data.tokens_per_batch=0 must be an integer >= 1'),
        (
            {'data.tokens_per_batch': 31},
            r'tokens_per_batch=31 fills 0.97 rows of config.data.max_length=32',
        ),
        ({'data.max_length': 0}, r'config.data.max_length=0 must be an integer >= 1'),
        ({'decode.beam_size': 0}, r'config.decode.beam_size=0 must be an integer >= 1'),
        (dict(sharding='zero3'), r"config.sharding='zero3' is not one of \('replicated', 'fsdp'\)"),
        (dict(model_kind='encoder'), r"config.model_kind='encoder' is not one of"),
        ({'model.num_heads': 3}, r'model.num_heads=3 does not divide model.emb_dim=32'),
        ({'model.dropout_rate': 1.0}, r'model.dropout_rate=1.0 must be in \[0, 1\)'),
    ],
)
def test_validate_names_the_field_and_the_fix(fields, match):
    with pytest.raises(ConfigError, match=match):
        configs.validate(tiny(**fields))


def test_validate_checks_the_batch_against_the_devices():
    """One row of max_length per device, the condition `pipeline.batch_rows` raises on."""
    config = tiny(**{'data.tokens_per_batch': 64, 'data.max_length': 32})  # 2 rows
    configs.validate(config, devices=2)
    with pytest.raises(ConfigError, match=r'tokens_per_batch=64 fills 2.00 rows of config.data'):
        configs.validate(config, devices=4)
    with pytest.raises(ConfigError, match=r'per device \(4 devices\): raise .* at least 128, or'):
        configs.validate(config, devices=4)
    if jax.device_count() > 1:  # default: this session's devices
        config.data.tokens_per_batch = 32
        with pytest.raises(ConfigError, match=rf'\({jax.device_count()} devices\)'):
            configs.validate(config)


def test_keep_checkpoints_none_keeps_every_checkpoint():
    configs.validate(tiny(keep_checkpoints=None))


@pytest.mark.parametrize(
    'arg,match',
    [
        ('runlocal=maybe', r"runlocal='maybe' is not a boolean: write runlocal .* runlocal=false"),
        ('seed=x', r"seed='x' must be an integer, e.g. seed=0"),
        ('shrink=1.5', r"shrink='1.5' must be an integer"),
        ('rw=A1', r"Unknown config argument 'rw'.* Did you mean row\?"),
        ('row=Z9', r"row='Z9' is not one of"),
    ],
)
def test_bad_config_argument_names_it(arg, match):
    with pytest.raises(ConfigError, match=match):
        load('table3', arg)


def test_boolean_config_arguments():
    assert load('l10n', 'runlocal=false').total_steps == load('l10n', '').total_steps
    assert load('l10n', 'runlocal=True').total_steps == load('l10n', 'runlocal').total_steps


@pytest.fixture(scope='module')
def dummy_dataset(tmp_path_factory):
    """TFDS's 3-example `dummy_dataset` (a train split only), prepared as array_record."""
    directory = tmp_path_factory.mktemp('dummy_dataset')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, 'tempdir', str(directory))  # TFDS leaves a folder there
        builder = tfds.testing.DummyDataset(data_dir=str(directory), file_format='array_record')
        builder.download_and_prepare(file_format='array_record')
    return builder


def test_unknown_split_names_the_available_ones(dummy_dataset):
    assert len(datasets.sources(dummy_dataset, ['train'])['train']) == 3
    with pytest.raises(datasets.DataError, match=r"no split 'tset' .*splits are \['train'\]"):
        datasets.sources(dummy_dataset, ['tset'])
    with pytest.raises(datasets.DataError, match=r"'tain' .*did you mean 'train'"):
        datasets.sources(dummy_dataset, ['tain'])
    with pytest.raises(datasets.DataError, match=r"Split 'train\+test' .*Unknown split 'test'"):
        datasets.sources(dummy_dataset, ['train+test'])


def _nan_message(tmp_path, **known) -> str:
    reporter = loop.Reporter(str(tmp_path), 0, 10, lambda step: 1e-3, **known)
    reporter.add(1, {'loss': 1.0})
    reporter.add(2, {'loss': math.nan})
    with pytest.raises(FloatingPointError, match='Non-finite training loss') as raised:
        reporter.flush(2, write=True)
    reporter.close()
    return str(raised.value)


def test_non_finite_loss_suggests_only_what_applies(tmp_path):
    message = _nan_message(tmp_path / 'a', dtype='float32', grad_clip_norm=1.0)
    assert 'model.dtype' not in message and 'grad_clip_norm > 0' not in message
    assert 'optimizer.lr_scale' in message and 'grad_clip_norm (now 1.0)' in message
    message = _nan_message(tmp_path / 'b', dtype='bfloat16', grad_clip_norm=0.0)
    assert 'model.dtype="float32"' in message and 'grad_clip_norm > 0' in message
    message = _nan_message(tmp_path / 'c')  # not told: suggests both
    assert 'model.dtype="float32"' in message and 'grad_clip_norm > 0' in message
    assert '\n' not in message and 'within the 2 steps up to 2' in message


# ------------------------------------------------------------------------- commands


def _command(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    assert result.returncode != 0, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith('error: '), result.stderr
    for name in names:
        assert name in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize(
    'args,names',
    [
        (['--config=configs/nope.py'], ['configs/nope.py', 'configs/l10n.py']),
        (['--config=configs/l10n.py:size=tiny', '--config.model.num_head=3'], ['model.num_heads']),
        (['--config=configs/l10n.py:size=huge'], ["size='huge'", "'tiny'"]),
        (['--config=configs/table3.py:row=Z9'], ["row='Z9'", "'A1'"]),
        (['--config=configs/l10n.py:runlocal=maybe'], ["runlocal='maybe'"]),
        (['--config=configs/table3.py:seed=x'], ["seed='x'", 'integer']),
        (['--config=configs/l10n.py:size=tiny', '--config.total_steps=0'], ['total_steps=0']),
    ],
    ids=['no-file', 'misspelt-field', 'size', 'row', 'runlocal', 'seed', 'total_steps'],
)
def test_summary_refuses_a_bad_config_in_one_line(args, names):
    result = _command('-m', 'attn.summary', *args)
    _assert_one_line_error(result, *names)
    assert result.stdout == ''


def test_train_refuses_before_touching_the_workdir(tmp_path):
    workdir = tmp_path / 'run'
    result = _command(
        '-m',
        'attn.train',
        f'--workdir={workdir}',
        '--config=configs/l10n.py:size=tiny',
        '--config.keep_checkpoints=0',
    )
    _assert_one_line_error(result, 'config.keep_checkpoints=0', 'keep at least 1')
    assert not workdir.exists()


def test_a_non_finite_loss_and_a_missing_split_are_one_line(dummy_dataset, tmp_path):
    """What `attn.train` raises on a non-finite loss and `attn.evaluate` on an unknown split
    come out of `cli.run` as one line."""
    nan = (
        'import sys; from attn import cli; sys.argv = ["attn"]\n'
        'def main(argv): raise FloatingPointError("Non-finite training loss (nan) ... Try x.")\n'
        'cli.run(main)'
    )
    _assert_one_line_error(_command('-c', nan), 'Non-finite training loss')
    data_dir = dummy_dataset.data_dir_root
    split = (
        'import sys; import tensorflow_datasets as tfds; from attn import cli\n'
        'from attn.data import datasets; sys.argv = ["attn"]\n'
        f'b = tfds.testing.DummyDataset(data_dir={str(data_dir)!r}, file_format="array_record")\n'
        'cli.run(lambda argv: datasets.sources(b, ["tset"]))'
    )
    # TMPDIR: TFDS leaves a folder there for each builder.
    result = _command('-c', split, env=os.environ | {'TMPDIR': str(tmp_path)})
    _assert_one_line_error(result, "split 'tset'", "['train']")


@pytest.mark.parametrize('argv, code', [(['--help'], 0), (['-h'], 0), ([], 2), (['trian'], 2)])
def test_attn_lists_its_commands(argv, code, capsys, monkeypatch):
    """`attn --help` succeeds on stdout; no command or an unknown one fails on stderr."""
    monkeypatch.setattr(sys, 'argv', ['attn', *argv])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == code
    out, err = capsys.readouterr()
    assert 'train ' in (out if code == 0 else err) and 'evaluate ' in (out if code == 0 else err)


# Each bad flag of the commands that read a checkpoint, refused before any work (the
# workdir does not exist: reading it would be another error), and what the line says.
BAD_FLAGS = [
    ('translate', '--beam_size=0', 'give 1 or more (1 = greedy)'),
    ('evaluate', '--beam_size=0', 'give 1 or more (1 = greedy)'),
    ('translate', '--alpha=-0.5', 'give 0 (no length penalty) or more'),
    ('evaluate', '--alpha=-1', 'give 0 (no length penalty) or more'),
    ('evaluate', '--nbest=-1', 'up to --beam_size'),
    ('translate', '--top_p=0', 'a probability mass in (0, 1]'),
    ('translate', '--top_p=1.5', 'a probability mass in (0, 1]'),
    ('translate', '--temperature=-1', 'give 0 (greedy) or more'),
    ('translate', '--top_k=-1', 'give 0 (every token)'),
    ('translate', '--batch_size=0', 'give 1 or more lines per batch'),
    ('translate', '--max_input_tokens=0', 'give 1 or more tokens per line'),
    ('translate', '--max_new_tokens=0', 'give 1 or more tokens to add'),
    ('score', '--average_last=0', 'give 1 or more checkpoints to average'),
    ('analyze', '--sentences=0', 'give 1 or more sentences'),
    ('average', '--last=0', 'give 1 or more checkpoints to average'),
]


def test_every_bad_command_flag_is_one_line_before_any_work(toy_run, tmp_path):
    """Through the real commands (`cli.run`), forked from one process that imports them;
    and --average_last beyond the kept checkpoints (3 and 6) of a real run."""
    missing = f'--workdir={tmp_path / "missing"}'
    cases = [(command, [missing, flag]) for command, flag, _ in BAD_FLAGS]
    cases.append(('translate', [f'--workdir={toy_run[0]}', '--average_last=3']))
    result = subprocess.run(
        [sys.executable, '-m', 'tests.command_flags'],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout)
    expected = [(flag, fix) for _, flag, fix in BAD_FLAGS]
    expected.append(('--average_last', 'the kept ones up to it are [3, 6]. Average 2 or fewer'))
    for (status, stderr), (flag, fix) in zip(outcomes, expected, strict=True):
        assert status == 2, stderr
        lines = stderr.strip().splitlines()
        assert 'Traceback' not in stderr and lines[-1].startswith('error: '), stderr
        assert flag in lines[-1] and fix in lines[-1], lines[-1]


def test_a_machine_without_apt_get_is_one_line_naming_the_packages(tmp_path):
    (tmp_path / 'bin').mkdir()  # PATH: no apt-get, nothing else
    result = _command(
        '-m',
        'attn.prepare',
        '--config=configs/l10n.py:size=tiny',
        f'--config.data.data_dir={tmp_path / "data"}',
        env=os.environ | {'PATH': str(tmp_path / 'bin'), 'TMPDIR': str(tmp_path)},
    )
    assert result.returncode == 2
    _assert_one_line_error(result, 'apt-get is not available', 'libreoffice-help-de_*.deb')


@pytest.mark.parametrize('setting', ['dir', 'off'])
def test_every_command_keeps_its_compiled_programs(tmp_path, setting):
    """cli.run turns JAX's persistent compilation cache on (ATTN_COMPILATION_CACHE), unless
    it is off; a JAX_COMPILATION_CACHE_DIR set by the user would be kept."""
    cache = tmp_path / 'cache'
    program = (
        'import sys, jax; from attn import cli; sys.argv = ["attn"]\n'
        'cli.run(lambda argv: print(jax.jit(lambda x: x * 2)(1.0)))'
    )
    env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
    env |= {'ATTN_COMPILATION_CACHE': str(cache) if setting == 'dir' else 'off'}
    env |= {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'HOME': str(tmp_path)}
    result = _command('-c', program, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [p for p in tmp_path.rglob('*') if p.is_file()]
    if setting == 'dir':
        assert written and all(cache in p.parents for p in written)
    else:
        assert written == []
