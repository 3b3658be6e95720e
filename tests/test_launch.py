"""Launch scripts parse, and the configs they name exist."""

import json
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parent.parent
SCRIPTS = sorted(p for p in (ROOT / 'launch').iterdir() if p.suffix in ('.sh', '.sbatch'))


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


def test_table3_report_lists_finished_and_missing_rows(tmp_path):
    from configs import table3

    config = table3.get_config('row=B1,dataset=l10n')
    workdir = tmp_path / 'B1'
    (workdir / 'eval').mkdir(parents=True)
    (workdir / 'config.json').write_text(config.to_json())
    (workdir / 'metrics.jsonl').write_text(
        '{"step": 25, "time": 1000.0, "loss": 5.0}\n{"step": 700, "time": 1600.0, "loss": 3.0}\n'
    )
    report = {'perplexity': 21.5, 'paper_bleu': {'bleu': 12.3}, 'sacrebleu': {'bleu': 11.9}}
    (workdir / 'eval' / 'validation-700.json').write_text(json.dumps(report))
    subprocess.run(
        ['python', str(ROOT / 'experiments' / 'table3' / 'report.py'), f'--root={tmp_path}'],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    lines = (tmp_path / 'report.md').read_text().splitlines()
    b1 = next(line for line in lines if line.startswith('| B1 |'))
    assert '| 700 | 10.0 | 21.50 | 12.3 | 11.9 | 58 | 5.16 | 25.1 |' in b1
    assert sum('| missing |' in line for line in lines) == 19
    assert (tmp_path / 'table3.png').stat().st_size > 0
