"""The commands README.md and docs/*.md show can run: each fenced shell command that starts
`python -m attn.`, `attn `, `python experiments/` or `python -m experiments.` names a command
module or script that exists, and passes only flags that command defines (`--config.a.b=v`:
a field of the config it loads). Nothing is trained or downloaded.

The flags are collected in one subprocess (`python -m tests.test_docs TARGET ...`): each
command defines its flags and is asked for `--helpfull`, which exits before its main runs;
its flags are then removed, so the next command defines its own.
"""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import pathlib
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
SHELL_FENCES = ('', 'bash', 'sh', 'shell', 'console')
SEPARATORS = {'|', '||', '&&', ';', '&', '(', ')'}
ENV = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*=')
COMMAND = re.compile(r'python (-m )?(attn\.|experiments)|(^|\s)attn \w')


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # file:line, for the failure message
    target: str  # 'attn.train', 'experiments.x.y' (modules) or 'experiments/x/y.py' (scripts)
    flags: tuple[str, ...]  # every --flag argument, as written (name=value)

    @property
    def is_script(self) -> bool:
        return self.target.endswith('.py')


def fenced_lines(text: str):
    """(line number, line) of the shell fences of a markdown text, continuations joined."""
    fence, pending, start = None, '', 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith('```'):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        pending += line.rstrip()
        if pending.endswith('\\'):
            pending = pending[:-1] + ' '
            continue
        yield start, pending.strip()
        pending = ''


def _segments(line: str):
    """The simple commands of a shell line, as token lists (no env assignments, no `$ `)."""
    line = line[2:] if line.startswith('$ ') else line
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segment = []
    for token in [*lexer, ';']:
        if token in SEPARATORS:
            while segment and ENV.match(segment[0]):
                segment.pop(0)
            if segment:
                yield segment
            segment = []
        else:
            segment.append(token)


def commands(text: str, name: str) -> list[Command]:
    """The attn and experiments commands of a markdown text's shell fences."""
    found = []
    for number, line in fenced_lines(text):
        try:
            segments = list(_segments(line))
        except ValueError as error:  # unbalanced quotes: an output line, unless a command
            assert not COMMAND.search(line), f'{name}:{number}: {error}: {line}'
            continue
        for tokens in segments:
            target, rest = None, []
            if tokens[:2] == ['python', '-m'] and len(tokens) > 2:
                if tokens[2].startswith(('attn.', 'experiments.')):
                    target, rest = tokens[2], tokens[3:]
            elif tokens[0] == 'python' and len(tokens) > 1:
                if tokens[1].startswith('experiments/'):
                    target, rest = tokens[1], tokens[2:]
            elif tokens[0] == 'attn' and len(tokens) > 1:
                target, rest = f'attn.{tokens[1]}', tokens[2:]
            if target is not None:
                flags = tuple(t.strip('[]') for t in rest if t.lstrip('[').startswith('--'))
                found.append(Command(f'{name}:{number}', target, flags))
    return found


def documented() -> list[Command]:
    found = []
    for path in DOCS:
        found += commands(path.read_text(encoding='utf-8'), path.relative_to(ROOT).as_posix())
    return found


def defined_flags(targets: list[str]) -> dict[str, dict[str, bool]]:
    """{target: {flag name: is boolean}}, from one subprocess (see the module docstring)."""
    result = subprocess.run(
        [sys.executable, '-m', 'tests.test_docs', *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _config_fields(value: str) -> set[str]:
    """Every dotted field of the config that --config=`value` (PATH[:ARG]) loads."""
    from attn import configs

    path, _, arg = value.partition(':')
    fields = set()

    def walk(node, prefix):
        for key, child in node.items():
            fields.add(prefix + key)
            if hasattr(child, 'items'):
                walk(child, f'{prefix}{key}.')

    walk(configs.load(ROOT / path, arg or None), '')
    return fields


def problems(command: Command, defined: dict[str, bool]) -> list[str]:
    """What is wrong with one command's flags (empty: nothing)."""
    found, config = [], None
    for flag in command.flags:
        name, _, value = flag[2:].partition('=')
        if name == 'config':
            config = value
    for flag in command.flags:
        name = flag[2:].partition('=')[0]
        if name.startswith('config.'):
            if 'config' not in defined:
                found.append(f'{command.where}: {command.target} has no --config for {flag}')
            elif config is None:
                found.append(f'{command.where}: {flag} without --config=...')
            elif name.removeprefix('config.') not in _config_fields(config):
                found.append(f'{command.where}: {config} has no field {name[7:]!r}')
            continue
        negated = name.startswith('no') and defined.get(name[2:]) is True
        if name not in defined and not negated:
            found.append(f'{command.where}: {command.target} defines no --{name}')
    return found


def missing(command: Command) -> bool:
    """True when the command's module or script does not exist."""
    if command.is_script:
        return not (ROOT / command.target).is_file()
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.util.find_spec(command.target) is None
    except ModuleNotFoundError:
        return True
    finally:
        sys.path.remove(str(ROOT))


# ----------------------------------------------------------------------------- tests


def test_the_parser_finds_commands_and_flags():
    text = (
        'prose `python -m attn.train --not=checked`\n'
        '```bash\n'
        "pip install -e '.[dev]' && python -m attn.train --config=configs/l10n.py \\\n"
        '    --workdir=runs/l10n   # a comment --ignored\n'
        '$ echo hi | TFDS_DATA_DIR=/tmp/x attn evaluate --workdir=W [--beam_size=1]\n'
        'XLA_FLAGS=--xla_x=4 python experiments/benchmark/speed.py --what=train\n'
        '```\n'
        '```python\n'
        'python -m attn.summary --json\n'
        '```\n'
    )
    found = commands(text, 'T')
    assert [(c.where, c.target) for c in found] == [
        ('T:3', 'attn.train'),
        ('T:5', 'attn.evaluate'),
        ('T:6', 'experiments/benchmark/speed.py'),
    ]
    assert found[0].flags == ('--config=configs/l10n.py', '--workdir=runs/l10n')
    assert found[1].flags == ('--workdir=W', '--beam_size=1')
    assert found[2].flags == ('--what=train',)


def test_problems_names_unknown_flags_and_config_fields():
    defined = {'config': False, 'workdir': False, 'json': True}
    good = Command('T:1', 'attn.summary', ('--config=configs/l10n.py', '--nojson'))
    assert problems(good, defined) == []
    bad = Command(
        'T:2',
        'attn.summary',
        ('--config=configs/table3.py:row=B1', '--config.model.num_head=7', '--nbest=3'),
    )
    assert problems(bad, defined) == [
        "T:2: configs/table3.py:row=B1 has no field 'model.num_head'",
        'T:2: attn.summary defines no --nbest',
    ]


@pytest.fixture(scope='module')
def attention_error():
    """`experiments/parity/attention_error.py` on small shapes, on CPU, started once by the
    first test that asks, so that it runs beside the flag collection."""
    process = subprocess.Popen(
        [sys.executable, 'experiments/parity/attention_error.py', '--length=32', '--head_dim=16'],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_documented_commands_exist_and_take_their_flags(attention_error):
    del attention_error  # started now, to overlap the subprocess below
    found = documented()
    targets = sorted({c.target for c in found})
    assert 'attn.train' in targets, 'the quickstart command was not found in README.md'
    absent = [f'{c.where}: {c.target}' for c in found if missing(c)]
    assert absent == [], 'commands that do not exist: ' + '; '.join(absent)
    defined = defined_flags(targets)
    assert 'workdir' in defined['attn.train'], defined['attn.train']
    wrong = [line for c in found for line in problems(c, defined[c.target])]
    assert wrong == [], '\n'.join(wrong)


def test_readme_quickstart_is_what_ci_runs():
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    quickstart = re.search(r'## Quickstart\s+```bash\n(.*?)```', readme, re.S)
    assert quickstart, 'README.md has no Quickstart fence'
    lines = quickstart.group(1).strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[1].endswith('python -m pytest'), lines
    assert 'python -m pytest' in ci.splitlines()[-1]


def test_attention_error_runs_without_a_gpu(attention_error):
    stdout, stderr = attention_error.communicate(timeout=120)
    assert attention_error.returncode == 0, stderr[-3000:]
    report = json.loads(stdout)
    assert set(report['max_abs_error']) == {'none', 'padding', 'causal', 'packed+causal'}
    for errors in report['max_abs_error'].values():
        assert errors['reference_vs_float64'] < 1e-5, errors
        assert errors['fused_vs_reference'] < 1e-5, errors
    assert 'cudnn' in report['skipped'], report  # this session has no GPU (conftest)


# ------------------------------------------------------------ the flag collector


def _run_for_help(target: str) -> None:
    """Defines `target`'s flags and parses --helpfull (which exits before any main)."""
    sys.argv = [target, '--helpfull']
    if target.endswith('.py'):  # as `python SCRIPT`: its folder first on the path
        folder = str(ROOT / os.path.dirname(target))
        sys.path.insert(0, folder)
        try:
            runpy.run_path(target, run_name='__main__')
        finally:
            sys.path.remove(folder)
    elif target.startswith('attn.'):
        importlib.import_module(target).run()
    else:
        runpy.run_module(target, run_name='__main__', alter_sys=True)


def _collect(targets: list[str]) -> dict[str, dict[str, bool]]:
    from absl import app, flags

    from attn import cli

    for target in targets:  # import first: imports define no flags, so none is lost below
        if target.startswith('attn.'):
            assert target.removeprefix('attn.') in cli.COMMANDS, f'{target} is no command'
            importlib.import_module(target)
    app.define_help_flags()
    FLAGS = flags.FLAGS
    common = set(FLAGS)
    defined = {}
    for target in targets:
        modules = set(sys.modules)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            _run_for_help(target)
        defined[target] = {name: isinstance(FLAGS[name], flags.BooleanFlag) for name in FLAGS}
        for name in set(FLAGS) - common:
            delattr(FLAGS, name)
        for name in set(sys.modules) - modules:  # a script's sibling defines flags at import
            if str(getattr(sys.modules[name], '__file__', '')).startswith(
                str(ROOT / 'experiments')
            ):
                del sys.modules[name]
    return defined


if __name__ == '__main__':
    sys.path.insert(0, str(ROOT))
    # No command runs here, so no torch: tensorboardX (attn.training.metrics) imports it when
    # installed, which would take most of this process's time; it works without it.
    sys.modules['torch'] = None
    print(json.dumps(_collect(sys.argv[1:])))  # noqa: T201 - read by defined_flags
