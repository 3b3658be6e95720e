"""What the config files in configs/ build on: the paper's model sizes and training
settings, their `:key=value` arguments, and loading a config file by path.

Config files are loaded by path (`--config=configs/wmt14.py:size=big`), never imported as a
package, so each is one module whoever loads it: `attn.train`, a test, a sweep, or another
config (`load_module`). Sizes follow Table 3 of the paper (base and big); `tiny` and `small`
are ours, for CPU tests and the embedded-corpus quickstart.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types

from ml_collections import config_dict

from attn.errors import ConfigError
from attn.model_config import ModelConfig

# N, d_model, d_ff, h, P_drop (Table 3). d_k = d_v = d_model / h unless a row says otherwise.
SIZES = {
    'tiny': dict(num_layers=2, emb_dim=32, mlp_dim=64, num_heads=4, dropout_rate=0.1),
    'small': dict(num_layers=3, emb_dim=256, mlp_dim=1024, num_heads=4, dropout_rate=0.1),
    'base': dict(num_layers=6, emb_dim=512, mlp_dim=2048, num_heads=8, dropout_rate=0.1),
    'big': dict(num_layers=6, emb_dim=1024, mlp_dim=4096, num_heads=16, dropout_rate=0.3),
}


# Values of a boolean config argument ('runlocal=false'); a bare 'runlocal' is True.
_BOOLEANS = {'1': True, 'true': True, 'yes': True, '0': False, 'false': False, 'no': False}


def parse_arg(arg: str | None, **defaults) -> config_dict.ConfigDict:
    """Parses a config argument 'key=value,flag' against typed defaults.

    `configs/wmt14.py:size=big,pair=fr-en` gives arg 'size=big,pair=fr-en'. A bare
    word sets a boolean default to True (e.g. 'runlocal').
    """
    parsed = dict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, sep, value = item.partition('=')
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f' Did you mean {close[0]}?' if close else ''
            raise ConfigError(f'Unknown config argument {key!r}; known: {sorted(defaults)}.{hint}')
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(
                    f'Config argument {key!r} needs a value: {key}=... (default {default!r}).'
                )
            parsed[key] = True
        elif isinstance(default, bool):
            if value.lower() not in _BOOLEANS:
                raise ConfigError(
                    f'Config argument {key}={value!r} is not a boolean: write {key} '
                    f'(or {key}=true) or {key}=false.'
                )
            parsed[key] = _BOOLEANS[value.lower()]
        else:
            try:
                parsed[key] = type(default)(value)
            except ValueError:
                kind = {int: 'an integer', float: 'a number'}.get(type(default), 'of its type')
                raise ConfigError(
                    f'Config argument {key}={value!r} must be {kind}, e.g. {key}={default!r} '
                    '(the default).'
                ) from None
    return config_dict.ConfigDict(parsed)


def check_choice(name: str, value: str, choices) -> None:
    """Raises a ValueError naming the config argument and its valid values."""
    if value not in choices:
        raise ConfigError(f'Config argument {name}={value!r} is not one of {sorted(choices)}.')


def model_config(size: str) -> config_dict.ConfigDict:
    """Every `ModelConfig` field, at one of `SIZES`."""
    check_choice('size', size, SIZES)
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    fields.update(SIZES[size])
    model = config_dict.ConfigDict(fields)
    # Unset head sizes are derived as emb_dim // num_heads; placeholders keep them
    # overridable from the command line (--config.model.qk_dim=32).
    model.qk_dim = config_dict.placeholder(int)
    model.v_dim = config_dict.placeholder(int)
    return model


SEED_SOURCES = ('init', 'dropout', 'data')  # the noise sources `config.seeds` separates


def base_config(size: str = 'base') -> config_dict.ConfigDict:
    """The paper's training setup (§5) around a model of `size`; datasets set by callers."""
    config = config_dict.ConfigDict()
    config.model_kind = 'transformer'  # 'transformer' (encoder-decoder) or 'lm' (decoder-only)
    config.seed = 0  # every noise source's seed, unless `seeds` overrides it
    config.seeds = config_dict.ConfigDict()
    config.seeds.init = config_dict.placeholder(int)  # parameter initialization (None: seed)
    config.seeds.dropout = config_dict.placeholder(int)  # dropout masks (None: seed)
    config.seeds.data = config_dict.placeholder(int)  # training-data order (None: seed)
    # Dropout's PRNG: 'threefry2x32' gives the same masks on any number of devices;
    # 'rbg' / 'unsafe_rbg' are cheaper on GPUs but their masks depend on the sharding.
    config.prng_impl = 'threefry2x32'

    config.data = config_dict.ConfigDict()
    config.data.name = 'wmt14_translate'  # TFDS builder
    config.data.config = 'de-en'  # TFDS builder config
    config.data.source_lang = 'en'
    config.data.target_lang = 'de'
    config.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS default)
    config.data.vocab_size = 37000  # shared SentencePiece vocabulary (§5.1)
    config.data.tokens_per_batch = 25000  # per side, per step (§5.1)
    config.data.max_length = 256  # training examples longer than this are filtered
    config.data.eval_split = 'validation'
    config.data.test_split = 'test'  # scored by attn.evaluate (and by bleu_at_end)
    config.data.eval_batch_size = 64  # examples per evaluation batch (one per row, none dropped)
    config.data.worker_count = 0  # processes that read and tokenize training examples (0: none)
    config.data.worker_buffer_size = 2  # chunks of 64 examples each worker holds ready
    config.data.prefetch = 2  # packed batches a background thread holds ready (0: none)

    config.model = model_config(size)
    config.model.vocab_size = config.data.get_ref('vocab_size')

    config.total_steps = 100_000  # base: 100K steps, big: 300K (§5.2)
    config.label_smoothing = 0.1  # eps_ls (§5.4)
    config.optimizer = config_dict.ConfigDict()
    config.optimizer.b1 = 0.9  # Adam (§5.3)
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-9
    config.optimizer.warmup_steps = 4000
    config.optimizer.lr_scale = 1.0  # multiplies d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    config.optimizer.grad_clip_norm = 0.0  # 0 = no clipping (the paper clips nothing)
    config.grad_accum_steps = (
        1  # microbatches per update, to reach the paper's batch on fewer devices
    )
    # > 0: the logits and loss are computed this many target positions at a time, and
    # again in the backward pass, so the [batch, length, vocab] logits are never held
    # whole (memory for compute; the loss is the same). 0: all at once.
    config.loss_chunk = 0
    # Layout of parameters and Adam state over the devices. 'replicated': whole on every
    # device. 'fsdp': split over the data axis (ZeRO-3); XLA inserts the all-gathers and
    # reduce-scatters, for models whose replicated Adam state does not fit one device.
    config.sharding = 'replicated'

    config.decode = config_dict.ConfigDict()
    config.decode.beam_size = 4  # §6.1
    config.decode.alpha = 0.6  # length penalty
    config.decode.max_extra_length = 50  # max output length = input length + 50

    config.bleu_at_end = False  # decode the test split with beam search after the last step
    config.bleu_every_steps = 0  # > 0: sacreBLEU of a sample of the eval split every so often
    config.bleu_examples = 200  # size of that sample
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 5  # base averages the last 5 checkpoints (§6.1)
    return config


def source_seed(config, source: str) -> int:
    """The seed of one of `SEED_SOURCES`: config.seeds.<source> where set, else config.seed
    (also in configs, or their saved dicts, from before `seeds` existed)."""
    seed = (config.get('seeds') or {}).get(source)
    return config.get('seed', 0) if seed is None else seed


def apply_runlocal(config: config_dict.ConfigDict) -> None:
    """Shrinks the run (not the model) to a few CPU steps, for smoke tests."""
    config.total_steps = 10
    config.data.tokens_per_batch = 512
    config.data.max_length = 32
    config.optimizer.warmup_steps = 5
    config.log_every_steps = 1
    config.eval_every_steps = 5
    config.checkpoint_every_steps = 5


def finalize(config: config_dict.ConfigDict, arg: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """The shared last steps of every get_config: `size=tiny` shrinks the data to CPU-test
    scale, `runlocal` the run; then the config is locked against typos."""
    if arg.get('size') == 'tiny':
        config.data.vocab_size = 512
        config.data.tokens_per_batch = 512
        config.data.max_length = 32
        config.total_steps = 20
    if arg.runlocal:
        apply_runlocal(config)
    config.lock()
    return config


def load_module(path: str | os.PathLike) -> types.ModuleType:
    """The config file at `path` as a module (its `get_config` and tables such as
    table3's `ROWS`); a relative `path` is from the working directory, as for --config."""
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f'There is no config file {path}.')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: str | os.PathLike, arg: str | None = None) -> config_dict.ConfigDict:
    """`get_config(arg)` of the config file at `path`: what --config=PATH:ARG gives before
    any --config.a.b=v override."""
    return load_module(path).get_config(arg or None)


def set_fields(config: config_dict.ConfigDict, fields: dict) -> config_dict.ConfigDict:
    """`config` with each dotted field of `fields` ({'model.num_heads': 2, ...}) set."""
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split('.')
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config
