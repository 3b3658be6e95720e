"""Table 3: every row of the paper's variations on the base model, one run each.

    python launch/sweep.py experiments/table3 --dry_run     # one line per run
    python launch/sweep.py experiments/table3               # run them here, one after another
    python launch/sweep.py experiments/table3 --slurm       # one SLURM job per run
    python launch/sweep.py experiments/table3 --arg=dataset=l10n --root=runs/t3-l10n  # CPU scale

Each run trains configs/table3.py:row=R (WMT14 EN-DE, 100K steps; big 300K) and scores
newstest2013 (the validation split) without checkpoint averaging, as the paper's Table 3.
"""

import pathlib

from attn import configs

table3 = configs.load_module(pathlib.Path(__file__).parents[2] / 'configs' / 'table3.py')


def get_sweep(arg=None):
    """[(name, config argument for `--config`)], one per Table 3 row.

    `arg` is added to every row's config argument, e.g. --arg=dataset=l10n for the
    small-scale sweep on the embedded corpus; with seed=N (N > 0) the runs are named
    <row>-seedN, and with init_seed=N, dropout_seed=N or data_seed=N <row>-initN,
    <row>-dropoutN or <row>-dataN, beside the seed-0 runs, for the report's seed noise.
    """
    suffix = f',{arg}' if arg else ''
    config = table3.get_config(arg)
    seeds = {'seed': config.seed or None, **config.seeds}  # other seeds of a row: seed noise
    name = '{}' + ''.join(f'-{key}{seed}' for key, seed in seeds.items() if seed is not None)
    return [(name.format(row), f'configs/table3.py:row={row}{suffix}') for row in table3.ROWS]
