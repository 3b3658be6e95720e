"""Table 3 of the paper: variations on the base model, one config per row.

    python -m attn.train --config=configs/table3.py:row=B1 --workdir=runs/table3/B1
    python -m attn.train --config=configs/table3.py:row=B1,dataset=l10n --workdir=runs/t3-l10n/B1

`dataset=l10n` is the small-scale version for a CPU: the embedded corpus with the quickstart's
data settings, every width of the row (d_model, d_ff, d_k, d_v) divided by `shrink` (default
4; depth, heads, dropout and label smoothing as the row), so each row keeps its relation to
base, 600 steps, and pre-LN residuals. Pre-LN is the one departure from the rows: with the
paper's post-LN the 6+6-layer base row at d_model 128 stalled at the unigram loss (training
loss 6.6 after 700 steps at lr_scale 0.4 or 0.28, warmup 200), while pre-LN was at 6.53 and
falling after 150 steps where post-LN was at 7.08.

Rows (blank = as base): A changes heads at constant computation, B the key size
d_k alone, C the depth and widths, D dropout and label smoothing, E learned
positional embeddings; `big` is the big model. Scored on newstest2013 (the WMT14
validation split) without checkpoint averaging. `PAPER` holds the paper's numbers
for each row; `python -m attn.summary --config=configs/table3.py:row=R` gives ours.
`seed=N` changes initialization, dropout and data order, to measure seed noise;
`init_seed=N`, `dropout_seed=N` or `data_seed=N` changes that one alone (-1: as seed), to
tell which of them the noise comes from. Measured at small scale (13 rows, 3 seeds of base):
docs/results.md; no row has run on WMT14.
"""

import pathlib

from attn import configs

# Model overrides of each row relative to base (Table 3).
ROWS = {
    'base': {},
    'A1': dict(num_heads=1, qk_dim=512, v_dim=512),
    'A2': dict(num_heads=4, qk_dim=128, v_dim=128),
    'A3': dict(num_heads=16, qk_dim=32, v_dim=32),
    'A4': dict(num_heads=32, qk_dim=16, v_dim=16),
    'B1': dict(qk_dim=16),
    'B2': dict(qk_dim=32),
    'C1': dict(num_layers=2),
    'C2': dict(num_layers=4),
    'C3': dict(num_layers=8),
    'C4': dict(emb_dim=256, qk_dim=32, v_dim=32),
    'C5': dict(emb_dim=1024, qk_dim=128, v_dim=128),
    'C6': dict(mlp_dim=1024),
    'C7': dict(mlp_dim=4096),
    'D1': dict(dropout_rate=0.0),
    'D2': dict(dropout_rate=0.2),
    'D3': {},  # label smoothing 0.0, set below
    'D4': {},  # label smoothing 0.2
    'E': dict(positions='learned'),
    'big': dict(configs.SIZES['big']),
}
LABEL_SMOOTHING = {'D3': 0.0, 'D4': 0.2}
TOTAL_STEPS = {'big': 300_000}  # every other row: 100K steps

# The paper's results per row: (dev perplexity, dev BLEU, params in millions or None).
PAPER = {
    'base': (4.92, 25.8, 65),
    'A1': (5.29, 24.9, None),
    'A2': (5.00, 25.5, None),
    'A3': (4.91, 25.8, None),
    'A4': (5.01, 25.4, None),
    'B1': (5.16, 25.1, 58),
    'B2': (5.01, 25.4, 60),
    'C1': (6.11, 23.7, 36),
    'C2': (5.19, 25.3, 50),
    'C3': (4.88, 25.5, 80),
    'C4': (5.75, 24.5, 28),
    'C5': (4.66, 26.0, 168),
    'C6': (5.12, 25.4, 53),
    'C7': (4.75, 26.2, 90),
    'D1': (5.77, 24.6, None),
    'D2': (4.95, 25.5, None),
    'D3': (4.67, 25.3, None),
    'D4': (5.47, 25.7, None),
    'E': (4.92, 25.7, None),
    'big': (4.33, 26.4, 213),
}


def get_config(arg=None):
    arg = configs.parse_arg(
        arg,
        row='base',
        dataset='wmt14',
        shrink=0,
        seed=0,
        **{f'{source}_seed': -1 for source in configs.SEED_SOURCES},
        runlocal=False,
    )
    configs.check_choice('row', arg.row, ROWS)
    configs.check_choice('dataset', arg.dataset, ('wmt14', 'l10n'))
    config = configs.base_config('base')
    for field, value in ROWS[arg.row].items():
        config.model[field] = value
    config.label_smoothing = LABEL_SMOOTHING.get(arg.row, 0.1)
    config.total_steps = TOTAL_STEPS.get(arg.row, 100_000)
    if arg.dataset == 'l10n':
        _small_scale(config, arg.shrink or 4)
    elif arg.shrink:
        _shrink(config, arg.shrink)
    config.keep_checkpoints = 1  # Table 3 uses no checkpoint averaging
    config.seed = arg.seed  # initialization, dropout and data order: seed noise
    for source in configs.SEED_SOURCES:  # one of them alone; -1 leaves it to seed
        seed = arg[f'{source}_seed']
        config.seeds[source] = None if seed == -1 else seed
    return configs.finalize(config, arg)


def _shrink(config, factor: int) -> None:
    """Divides every width of the model by `factor`."""
    for field in ('emb_dim', 'mlp_dim', 'qk_dim', 'v_dim'):
        if config.model[field] is not None:
            config.model[field] = config.model[field] // factor


def _small_scale(config, factor: int) -> None:
    """The embedded corpus with the quickstart's data and learning rate; widths / factor."""
    quickstart = configs.load(pathlib.Path(__file__).with_name('l10n.py'))
    for field in ('name', 'config', 'source_lang', 'target_lang', 'vocab_size'):
        config.data[field] = quickstart.data[field]
    for field in ('tokens_per_batch', 'max_length', 'eval_split'):
        config.data[field] = quickstart.data[field]
    config.log_every_steps = quickstart.log_every_steps
    config.total_steps = 600  # ~12 minutes for the base row on 2 CPU cores
    config.eval_every_steps = config.checkpoint_every_steps = 300
    config.model.pre_ln = True  # post-LN stalls at this depth and step budget (above)
    config.optimizer.warmup_steps = quickstart.optimizer.warmup_steps
    config.optimizer.lr_scale = quickstart.optimizer.lr_scale
    _shrink(config, factor)
