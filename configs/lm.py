"""A decoder-only Transformer language model.

    python -m attn.train --config=configs/lm.py --workdir=runs/lm  # embedded corpus, English side
    python -m attn.train --config=configs/lm.py:dataset=lm1b,size=base --workdir=runs/lm1b

Same layers as the paper's decoder without encoder-decoder attention. Measured on the
embedded corpus (the first command): docs/results.md, "The language model".
"""

from attn import configs

DATASETS = {
    # dataset: (TFDS builder, builder config, text feature, vocabulary size)
    'l10n': ('l10n_translate', 'en-de', 'en', 8000),
    'lm1b': ('lm1b', None, 'text', 32000),
}


def get_config(arg=None):
    arg = configs.parse_arg(arg, size='small', dataset='l10n', runlocal=False)
    configs.check_choice('dataset', arg.dataset, DATASETS)
    name, builder_config, text_feature, vocab_size = DATASETS[arg.dataset]
    config = configs.base_config(arg.size)
    config.model_kind = 'lm'
    config.data.name = name
    config.data.config = builder_config
    config.data.source_lang = text_feature
    config.data.target_lang = text_feature
    config.data.vocab_size = vocab_size
    config.data.tokens_per_batch = 8192
    config.data.max_length = 256
    config.total_steps = 10_000
    config.label_smoothing = 0.0  # a language model is scored by perplexity
    if arg.dataset == 'l10n':  # the embedded corpus: the quickstart's CPU-sized schedule
        config.data.tokens_per_batch = 4096
        config.data.max_length = 128
        config.total_steps = 700
        config.optimizer.warmup_steps = 200
        config.optimizer.lr_scale = 0.4
        config.log_every_steps = 25
        config.eval_every_steps = config.checkpoint_every_steps = 350
    return configs.finalize(config, arg)
