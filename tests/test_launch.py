"""Launch scripts parse, and the configs they name exist."""

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
