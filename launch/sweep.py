"""Expands a sweep into runs, each in its own workdir, and runs or submits them.

    python launch/sweep.py experiments/table3 --dry_run
    python launch/sweep.py experiments/table3 [--root=runs/table3] [-- --config.seed=1]
    python launch/sweep.py experiments/table3 --slurm

A sweep is a folder with sweep.py defining get_sweep(arg) -> [(name, config)]. Each run
trains `python -m attn.train --config=CONFIG --workdir=ROOT/NAME` and then scores its
config's evaluation split with `python -m attn.evaluate`. Finished runs (an evaluation
report at the config's last step) are skipped; unfinished ones resume from their
checkpoints. Locally runs go one after another; --slurm submits one job per run with
launch/slurm.sbatch, which trains and then, in the same job, runs the same evaluation.
"""

import argparse
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

from attn import configs, rundir

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_sweep(folder: str, arg: str | None) -> list[tuple[str, str]]:
    path = pathlib.Path(folder) / 'sweep.py'
    if not path.exists():
        raise SystemExit(f'{path} does not exist: a sweep folder holds sweep.py with get_sweep().')
    spec = importlib.util.spec_from_file_location('sweep', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_sweep(arg)


def load_config(config: str):
    """The ConfigDict of 'configs/NAME.py:arg' (a path from the working directory)."""
    file, _, arg = config.partition(':')
    return configs.load(file, arg)


def status(workdir: pathlib.Path, config) -> str:
    split = config.data.eval_split
    if rundir.read_report(str(workdir), split, config.total_steps, config) is not None:
        return 'done'
    checkpoints = workdir / 'checkpoints'
    steps = (
        [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
        if checkpoints.exists()
        else []
    )
    return f'resume from {max(steps)}' if steps else 'new'


def commands(name: str, config: str, workdir: pathlib.Path, split: str, extra: list[str]):
    train = [
        sys.executable,
        '-m',
        'attn.train',
        f'--config={config}',
        f'--workdir={workdir}',
        *extra,
    ]
    evaluate = [sys.executable, '-m', 'attn.evaluate', f'--workdir={workdir}', f'--split={split}']
    return train, evaluate


def slurm_env(config_arg: str, workdir: pathlib.Path, config) -> dict[str, str]:
    """What launch/slurm.sbatch reads: the run to train and, once training has saved its
    last step, the split to evaluate (as `commands`' evaluate does here)."""
    return dict(
        os.environ,
        CONFIG=config_arg,
        WORKDIR=str(workdir),
        EVAL_SPLIT=config.data.eval_split,
        FINAL_STEP=str(config.total_steps),
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument('sweep', help='folder with sweep.py, e.g. experiments/table3')
    parser.add_argument('--arg', default=None, help='argument passed to get_sweep')
    parser.add_argument(
        '--root', default=None, help='parent of the run workdirs (default runs/<sweep>)'
    )
    parser.add_argument('--only', default=None, help='comma-separated run names to keep')
    parser.add_argument('--dry_run', action='store_true', help='print one line per run and stop')
    parser.add_argument('--slurm', action='store_true', help='submit each run with sbatch')
    parser.add_argument('extra', nargs='*', help='flags for every run, after --')
    # Split at '--' by hand: argparse binds the positional `extra` to the sweep folder's
    # position, so it would reject flags after '--' that follow any option.
    argv = sys.argv[1:]
    cut = argv.index('--') if '--' in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra += argv[cut + 1 :]
    runs = load_sweep(args.sweep, args.arg)
    if args.only:
        keep = args.only.split(',')
        unknown = set(keep) - {name for name, _ in runs}
        if unknown:
            raise SystemExit(f'--only names unknown runs {sorted(unknown)}')
        runs = [(name, config) for name, config in runs if name in keep]
    root = pathlib.Path(args.root or pathlib.Path('runs') / pathlib.Path(args.sweep).name)
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise SystemExit(f'Run names must be distinct: {names}')
    for name, config_arg in runs:
        config = load_config(config_arg)
        workdir = root / name
        state = status(workdir, config)
        train, evaluate = commands(name, config_arg, workdir, config.data.eval_split, args.extra)
        print(f'{name}\t{workdir}\t{state}\t{" ".join(train[1:])}', flush=True)
        if args.dry_run or state == 'done':
            continue
        if args.slurm:
            if not shutil.which('sbatch'):
                raise SystemExit('--slurm needs sbatch on this machine.')
            subprocess.run(
                ['sbatch', f'--job-name={name}', str(ROOT / 'launch' / 'slurm.sbatch')]
                + args.extra,
                env=slurm_env(config_arg, workdir, config),
                check=True,
            )
        else:
            subprocess.run(train, check=True)
            subprocess.run(evaluate, check=True)


if __name__ == '__main__':
    main()
