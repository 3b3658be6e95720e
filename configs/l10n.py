"""The default experiment: the embedded EN-DE (or EN-FR) corpus built from Debian's
LibreOffice translation packages, on a CPU in minutes.

    python -m attn.train --config=configs/l10n.py --workdir=runs/l10n
    python -m attn.train --config=configs/l10n.py:pair=en-fr,size=base --workdir=runs/l10n-fr

Sizes: tiny (tests), small (the quickstart), base (the paper's base, for a GPU).

Measured (size=small, the first command, 1 device, trained at commit 23bd3b4 on 2 CPU cores):
validation perplexity 19.86; test sacreBLEU 16.08 (paper-style tokenized BLEU 16.41), test
perplexity 20.88, beam 4; 31 to 39 minutes in all, corpus build to test BLEU, on a 2-core
Intel Xeon machine (at 2ab0dff). The README's results table has these; docs/results.md the rest.
"""

from attn import configs
from attn.data.l10n_translate import PAIRS


def get_config(arg=None):
    arg = configs.parse_arg(arg, size='small', pair='en-de', runlocal=False)
    configs.check_choice('pair', arg.pair, PAIRS)
    config = configs.base_config(arg.size)
    config.data.name = 'l10n_translate'
    config.data.config = arg.pair
    config.data.target_lang = PAIRS[arg.pair]
    config.data.vocab_size = 8000
    config.data.tokens_per_batch = 4096
    config.data.max_length = 128
    config.data.eval_split = 'validation'
    config.total_steps = 700  # ~15 minutes on 2 CPU cores (size=small)
    config.optimizer.warmup_steps = 200
    config.optimizer.lr_scale = 0.4  # peak 1.8e-3; 1.0 (peak 4.4e-3) stalled at loss ~7.3
    config.bleu_at_end = True  # the quickstart reports test BLEU
    config.log_every_steps = 25
    # Every checkpoint evaluated, so --step=best ranks each; the last 5 kept for averaging.
    config.eval_every_steps = config.checkpoint_every_steps = 100
    return configs.finalize(config, arg)
