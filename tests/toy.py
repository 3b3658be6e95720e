"""A toy EN-DE corpus (word-for-word translation) and its tokenizer, for training tests; the
config files the tests load by path."""

import pathlib
import random

from attn import configs
from attn.data import datasets
from attn.data import tokenizer as tokenizer_lib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / 'configs'
l10n = configs.load_module(CONFIGS / 'l10n.py')  # the default experiment's config file

EN = 'the a cat dog sees runs house garden red blue small big quickly slowly under over and with'
DE = (
    'der ein katze hund sieht läuft haus garten rot blau klein groß schnell langsam unter über '
    'und mit'
)
VOCAB_SIZE = 320


def corpus(size: int, seed: int) -> list[dict[str, bytes]]:
    rng = random.Random(seed)
    lexicon = dict(zip(EN.split(), DE.split(), strict=True))
    examples = []
    for _ in range(size):
        words = [rng.choice(list(lexicon)) for _ in range(rng.randint(3, 10))]
        examples.append(
            {'en': ' '.join(words).encode(), 'de': ' '.join(lexicon[w] for w in words).encode()}
        )
    return examples


def data(directory) -> datasets.Data:
    train = corpus(2000, seed=0)
    tokenizer = tokenizer_lib.train_or_load(
        lambda: (text for example in train for text in example.values()),
        directory=directory,
        name='toy',
        vocab_size=VOCAB_SIZE,
    )
    splits = {'train': train, 'validation': corpus(40, seed=1), 'test': corpus(24, seed=2)}
    return datasets.Data(tokenizer, ('en', 'de'), splits)


def config(**overrides):
    """configs/l10n.py:size=tiny on the toy vocabulary, with `overrides` (dotted keys)."""
    config = l10n.get_config('size=tiny')
    config.data.vocab_size = VOCAB_SIZE
    config.total_steps = 6
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    return configs.set_fields(config, overrides)


def saved_params(workdir, step: int | None = None) -> tuple[int, dict]:
    """(step, the parameters of checkpoint `step` (default: latest) as saved, on one device)."""
    import jax

    from attn.training import checkpoint

    ckpt = checkpoint.Checkpointer(f'{workdir}/checkpoints', keep=None, create=False)
    step = ckpt.latest_step() if step is None else step
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = ckpt.restore_params(step, lambda tree: jax.tree.map(lambda _: device, tree))
    ckpt.close()
    return step, params


def leaves(params: dict) -> list:
    """The arrays of a parameter tree, in a fixed order, as NumPy."""
    import jax
    import numpy as np

    return [np.asarray(x) for x in jax.tree.leaves(params)]
