"""Launch scripts parse, and the configs they name exist."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import pytest

from attn import configs
from attn.inference import significance

ROOT = pathlib.Path(__file__).parent.parent
SCRIPTS = sorted(p for p in (ROOT / 'launch').iterdir() if p.suffix in ('.sh', '.sbatch')) + [
    ROOT / 'experiments' / 'benchmark' / 'gpu.sh'
]


def test_there_are_launch_scripts():
    assert {p.name for p in SCRIPTS} >= {'local.sh', 'slurm.sbatch', 'tpu_vm.sh'}


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(['bash', '-n', str(script)], check=True)
    if shutil.which('shellcheck'):
        subprocess.run(['shellcheck', str(script)], check=True)


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_named_configs_exist(script):
    named = set(re.findall(r'configs/(\w+)\.py', script.read_text()))
    assert named, f'{script.name} names no config in its usage'
    for name in named:
        assert (ROOT / 'configs' / f'{name}.py').exists(), name


def test_local_launcher_needs_config_and_workdir():
    result = subprocess.run(
        ['bash', str(ROOT / 'launch' / 'local.sh')], capture_output=True, text=True
    )
    assert result.returncode == 2 and 'usage' in result.stderr


def test_sweep_dry_run_lists_every_table3_row():
    result = subprocess.run(
        [
            'python',
            str(ROOT / 'launch' / 'sweep.py'),
            'experiments/table3',
            '--dry_run',
            '--root=/tmp/x',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split('\t') for line in result.stdout.strip().splitlines()]
    assert len(rows) == 20
    assert len({workdir for _, workdir, _, _ in rows}) == 20
    assert {name for name, *_ in rows} >= {'base', 'A1', 'B1', 'C7', 'D4', 'E', 'big'}
    assert all(state == 'new' and 'attn.train' in command for _, _, state, command in rows)


def _fake_commands(bin_dir: pathlib.Path, scripts: dict[str, str]) -> None:
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text('#!/usr/bin/env bash\nset -eu\n' + body)
        (bin_dir / name).chmod(0o755)


def _fake_slurm(bin_dir: pathlib.Path) -> None:
    """sbatch that runs the job script here at once, srun that logs its command (and, for
    training, saves the final checkpoint when FAKE_TRAINING_FINISHES is set, or exits 75,
    stopped early, when FAKE_PREEMPTED is), and scontrol that logs its command."""
    _fake_commands(
        bin_dir,
        {
            'sbatch': 'while [[ $1 == --* ]]; do echo "sbatch $1" >> "$LOG"; shift; done\n'
            'exec bash "$@"\n',
            'srun': 'echo "srun $*" >> "$LOG"\n'
            'if [[ $* == *attn.train* && -n ${FAKE_PREEMPTED:-} ]]; then exit 75; fi\n'
            'if [[ $* == *attn.train* && -n ${FAKE_TRAINING_FINISHES:-} ]]; then\n'
            '  mkdir -p "$WORKDIR/checkpoints/$FINAL_STEP"\n'
            'fi\n',
            'scontrol': 'echo "scontrol $*" >> "$LOG"\n',
        },
    )


@pytest.mark.parametrize('finishes', [True, False], ids=['finished', 'stopped_early'])
def test_sweep_slurm_job_trains_then_evaluates(tmp_path, finishes):
    """--slurm submits a job that trains and then runs the local sweep's evaluation,
    only once training has saved the last step (a job stopped at its time limit resumes)."""
    _fake_slurm(tmp_path / 'bin')
    log = tmp_path / 'log'
    env = dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}', LOG=str(log))
    if finishes:
        env['FAKE_TRAINING_FINISHES'] = '1'
    result = subprocess.run(
        ['python', str(ROOT / 'launch' / 'sweep.py'), 'experiments/table3', '--slurm']
        + ['--arg=dataset=l10n', '--only=E', f'--root={tmp_path / "runs"}']
        + ['--', '--config.seed=3'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    workdir = tmp_path / 'runs' / 'E'
    lines = log.read_text().splitlines()
    assert lines[:2] == [
        'sbatch --job-name=E',
        'srun python -m attn.train --config=configs/table3.py:row=E,dataset=l10n '
        f'--workdir={workdir} --config.seed=3',
    ]
    if finishes:
        assert lines[2:] == [f'srun python -m attn.evaluate --workdir={workdir} --split=validation']
    else:
        assert lines[2:] == []
        assert 'Training stopped before step 600' in result.stderr


def _slurm_job(tmp_path, **settings) -> tuple[subprocess.CompletedProcess, list[str]]:
    """launch/slurm.sbatch run here with the fake SLURM commands, CONFIG=configs/l10n.py,
    FINAL_STEP=700 and `settings` in its environment: its result and the commands it ran."""
    _fake_slurm(tmp_path / 'bin')
    log = tmp_path / 'log'
    env = dict(
        os.environ,
        PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}',
        LOG=str(log),
        CONFIG='configs/l10n.py',
        WORKDIR=str(tmp_path / 'run'),
        FINAL_STEP='700',
        **settings,
    )
    if 'EVAL_SPLIT' not in settings:
        env.pop('EVAL_SPLIT', None)
    result = subprocess.run(
        ['bash', str(ROOT / 'launch' / 'slurm.sbatch')], env=env, capture_output=True, text=True
    )
    return result, log.read_text().splitlines()


def test_slurm_job_without_eval_split_only_trains(tmp_path):
    result, commands = _slurm_job(tmp_path, FAKE_TRAINING_FINISHES='1')
    assert result.returncode == 0, result.stderr
    assert commands == [
        f'srun python -m attn.train --config=configs/l10n.py --workdir={tmp_path / "run"}'
    ]


def test_slurm_job_stopped_early_is_requeued(tmp_path):
    """attn.train exits 75 (errors.PREEMPTED) after saving at the time limit's SIGTERM:
    the job requeues itself, and does not evaluate."""
    result, commands = _slurm_job(
        tmp_path, FAKE_PREEMPTED='1', SLURM_JOB_ID='1234', EVAL_SPLIT='validation'
    )
    assert result.returncode == 0, result.stderr
    assert commands == [
        f'srun python -m attn.train --config=configs/l10n.py --workdir={tmp_path / "run"}',
        'scontrol requeue 1234',
    ]
    assert '#SBATCH --requeue' in (ROOT / 'launch' / 'slurm.sbatch').read_text()


# A `python` that logs its arguments and exits with the next of $CODES, counted per
# --process_id: its k-th start exits with the k-th code.
FAKE_PYTHON = (
    'echo "$*" >> "$LOG"\n'
    'id=-1\n'
    'for arg in "$@"; do [[ $arg == --process_id=* ]] && id=${arg#--process_id=}; done\n'
    'read -ra codes <<< "$CODES"\n'
    'calls=$(grep -c -- "process_id=$id\\b" "$LOG" || true)\n'
    '[[ $id == -1 ]] && calls=$(wc -l < "$LOG")\n'
    'exit "${codes[$((calls - 1))]}"\n'
)


@pytest.mark.parametrize(
    'processes,retries,codes,status,starts',
    [
        (1, 3, '75 75 0', 0, 3),  # stopped twice, resumed, finished
        (1, 1, '75 75 0', 75, 2),  # out of retries: 75 for whoever runs it next
        (1, 3, '2', 2, 1),  # a bad setting: never retried
        (2, 3, '75 0', 0, 4),  # both processes stopped, both restarted
        # a crash: never retried; the other process is stopped, maybe before it logged
        (2, 3, '1 0', 1, (1, 2)),
    ],
)
def test_local_launcher_restarts_a_run_stopped_early(
    tmp_path, processes, retries, codes, status, starts
):
    _fake_commands(tmp_path / 'bin', {'python': FAKE_PYTHON})
    log = tmp_path / 'log'
    log.touch()
    env = dict(
        os.environ,
        PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}',
        LOG=str(log),
        CODES=codes,
        PROCESSES=str(processes),
        RETRIES=str(retries),
    )
    result = subprocess.run(
        ['bash', str(ROOT / 'launch' / 'local.sh'), 'configs/l10n.py', 'runs/x', '--config.seed=1'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == status, result.stderr
    lines = log.read_text().splitlines()
    assert len(lines) in (starts if isinstance(starts, tuple) else (starts,))
    if status not in (0, 75):  # a failure: no process started twice
        assert len(set(lines)) == len(lines), lines
    assert all(
        line.startswith('-m attn.train --config=configs/l10n.py --workdir=runs/x')
        and line.endswith('--config.seed=1')
        for line in lines
    )
    attempts = max(starts) if isinstance(starts, tuple) else starts
    assert result.stderr.count('restarting it to resume') == (attempts // processes) - 1


def test_local_launcher_passes_a_sigterm_on_and_does_not_restart(tmp_path):
    """A SIGTERM to the script reaches every process (which save and exit 75), and the run
    is not started again: the user asked it to stop."""
    waiting = 'echo "$*" >> "$LOG"\ntrap \'exit 75\' TERM\nsleep 60 2>/dev/null &\nwait $!\n'
    _fake_commands(tmp_path / 'bin', {'python': waiting})
    log = tmp_path / 'log'
    log.touch()
    env = dict(
        os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}', LOG=str(log), PROCESSES='2'
    )
    script = subprocess.Popen(
        ['bash', str(ROOT / 'launch' / 'local.sh'), 'configs/l10n.py', 'runs/x'],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while len(log.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    script.send_signal(signal.SIGTERM)
    _, stderr = script.communicate(timeout=30)
    assert script.returncode == 75, stderr
    assert len(log.read_text().splitlines()) == 2 and 'restarting' not in stderr


def _finished_run(workdir, config_arg, perplexity, bleu):
    """A workdir as a finished small-scale Table 3 run leaves it."""
    (workdir / 'eval').mkdir(parents=True)
    config = configs.load(ROOT / 'configs' / 'table3.py', config_arg)
    (workdir / 'config.json').write_text(config.to_json())
    (workdir / 'metrics.jsonl').write_text(
        '{"step": 25, "time": 1000.0, "loss": 5.0}\n{"step": 600, "time": 1600.0, "loss": 3.0}\n'
    )
    report = {'perplexity': perplexity, 'paper_bleu': {'bleu': bleu}, 'sacrebleu': {'bleu': 11.9}}
    (workdir / 'eval' / 'validation-600.json').write_text(json.dumps(report))


def _report(root) -> list[str]:
    """The lines of report.md that experiments/table3/report.py writes for `root`."""
    subprocess.run(
        ['python', str(ROOT / 'experiments' / 'table3' / 'report.py'), f'--root={root}'],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return (root / 'report.md').read_text().splitlines()


def test_table3_report_lists_finished_and_missing_rows(tmp_path):
    _finished_run(tmp_path / 'B1', 'row=B1,dataset=l10n', 21.5, 12.3)
    lines = _report(tmp_path)
    b1 = next(line for line in lines if line.startswith('| B1 |'))
    # No base run, so no change from base for ours; the paper's B1 is +0.24 PPL, -0.7 BLEU.
    assert '| 600 | 10.0 | 21.50 | 12.3 | 11.9 | — | — | 58 | 5.16 | 25.1 | +0.24 | -0.7 |' in b1
    assert 'Data `l10n_translate/en-de`' in lines[2] and 'pre-LN' in lines[2]
    assert sum('| missing |' in line for line in lines) == 19
    assert (tmp_path / 'table3.png').stat().st_size > 0
    assert '## Seed noise' not in lines  # one seed of each row


def test_table3_seeds_are_named_apart_and_reported_as_noise(tmp_path):
    result = subprocess.run(
        ['python', str(ROOT / 'launch' / 'sweep.py'), 'experiments/table3', '--dry_run']
        + ['--arg=dataset=l10n,seed=2', '--only=base-seed2', f'--root={tmp_path}'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    name, workdir, _, command = result.stdout.strip().split('\t')
    assert name == 'base-seed2' and workdir == str(tmp_path / 'base-seed2')
    assert 'row=base,dataset=l10n,seed=2' in command

    _finished_run(tmp_path / 'base', 'row=base,dataset=l10n', 30.0, 14.0)
    saved = json.loads((tmp_path / 'base' / 'config.json').read_text())
    del saved['model']['remat']  # written before the field existed: its default applies
    (tmp_path / 'base' / 'config.json').write_text(json.dumps(saved))
    _finished_run(tmp_path / 'base-seed2', 'row=base,dataset=l10n,seed=2', 31.5, 13.2)
    lines = _report(tmp_path)
    assert next(line for line in lines if line.startswith('| base |')).count('30.00') == 1
    mean, low, high = significance.t_interval([30.0, 31.5])
    assert any(
        line.startswith('| base | 0, 2 | 30.00, 31.50 | 14.0, 13.2 | 1.50 | 0.8 | ')
        and f'{mean:.2f} [{low:.2f}, {high:.2f}]' in line
        for line in lines
    )


def test_table3_changes_from_base_get_seed_intervals_and_agree_or_not(tmp_path):
    """Base and B1 at 3 seeds each: B1's change from base gets Welch's interval over the
    seeds; its perplexity rises clearly (as the paper's), its BLEU moves within noise; D2,
    one run without checkpoints, gets no interval."""
    for seed, (ppl, bleu) in enumerate([(30.0, 14.0), (30.4, 13.6), (29.8, 14.3)]):
        suffix = '' if seed == 0 else f'-seed{seed + 1}'
        arg = '' if seed == 0 else f',seed={seed + 1}'
        _finished_run(tmp_path / f'base{suffix}', f'row=base,dataset=l10n{arg}', ppl, bleu)
        _finished_run(tmp_path / f'B1{suffix}', f'row=B1,dataset=l10n{arg}', ppl + 2, bleu - 0.1)
    _finished_run(tmp_path / 'D2', 'row=D2,dataset=l10n', 31.0, 14.0)
    lines = _report(tmp_path)
    b1 = next(line for line in lines if line.startswith('| B1 | +'))
    difference, low, high = significance.welch_interval([32.0, 32.4, 31.8], [30.0, 30.4, 29.8])
    assert f'{difference:+.2f} [{low:+.2f}, {high:+.2f}]' in b1
    assert '| seeds (3 and 3 runs) |' in b1 and b1.endswith('| yes | within noise |')
    assert next(line for line in lines if line.startswith('| D2 | — |')).endswith('| — | — |')
