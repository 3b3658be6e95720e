"""WMT14 English-German or English-French, base or big, as in Table 2 of the paper.

    python -m attn.train --config=configs/wmt14.py:size=big,pair=de-en --workdir=runs/wmt14-big

Paper (newstest2014 BLEU, tokenized, compound-split): base EN-DE 27.3, EN-FR 38.1;
big EN-DE 28.4, EN-FR 41.8. Base: 100K steps, average of the last 5 checkpoints;
big: 300K steps, average of the last 20. Big EN-FR uses P_drop 0.1, not 0.3 (§6.1).
Not yet run here: no figure of ours (README, "Not yet reproduced").
"""

from attn import configs

PAIRS = {
    # TFDS wmt14_translate config: (target language, shared vocabulary size) (§5.1)
    'de-en': ('de', 37000),
    'fr-en': ('fr', 32000),
}


def get_config(arg=None):
    arg = configs.parse_arg(arg, size='base', pair='de-en', runlocal=False)
    configs.check_choice('size', arg.size, ('base', 'big'))
    configs.check_choice('pair', arg.pair, PAIRS)
    target_lang, vocab_size = PAIRS[arg.pair]
    config = configs.base_config(arg.size)
    config.data.config = arg.pair
    config.data.target_lang = target_lang
    config.data.vocab_size = vocab_size
    config.data.eval_split = 'validation'  # newstest2013: watched during training
    config.data.test_split = 'test'  # newstest2014: scored once, at the end
    if arg.size == 'big':
        config.total_steps = 300_000
        config.keep_checkpoints = 20
        if arg.pair == 'fr-en':
            config.model.dropout_rate = 0.1
    return configs.finalize(config, arg)
