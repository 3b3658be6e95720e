"""Experiment configs: what the files in configs/ build on (the paper's model sizes and
training settings, their `:key=value` arguments), loading a config file by path, and
`validate`, which refuses any setting that cannot work before anything is built, compiled
or trained, naming the field and the fix. `ModelConfig` (the model's hyperparameters and
their own checks) lives beside the model, in `attn.model.config`.

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

import jax
from ml_collections import config_dict

from attn.errors import ConfigError
from attn.model.config import ModelConfig
from attn.training.sharding import SHARDING_MODES

MODEL_KINDS = ('transformer', 'lm')  # `attn.model.build_model`'s kinds

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


def model_fields(size: str) -> config_dict.ConfigDict:
    """Every `ModelConfig` field, at one of `SIZES`."""
    check_choice('size', size, SIZES)
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    fields.update(SIZES[size])
    model = config_dict.ConfigDict(fields)
    # Unset head sizes are derived as emb_dim // num_heads; placeholders keep them
    # overridable from the command line (--config.model.qk_dim=32).
    model.qk_dim = config_dict.placeholder(int)
    model.v_dim = config_dict.placeholder(int)
    model.num_kv_heads = config_dict.placeholder(int)  # unset: num_heads (the paper)
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

    config.model = model_fields(size)
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
    (`config` as `base_config` builds it, or a saved one through `upgrade`)."""
    seed = config.seeds[source]
    return config.seed if seed is None else seed


# The fields added to `base_config` after runs began to be saved (the training loop's first
# commit), each with the value that does what runs did before it existed. `upgrade`
# fills them into such a run's saved config; a field added to `base_config` is added here.
ADDED_FIELDS = {
    'data.test_split': 'test',
    'bleu_at_end': False,
    'bleu_every_steps': 0,  # no BLEU during training
    'bleu_examples': 200,
    'prng_impl': 'threefry2x32',  # JAX's default key
    'loss_chunk': 0,  # the whole loss at once
    'sharding': 'replicated',
    'data.worker_count': 0,  # read in the training process (the iterator state's layout)
    'data.worker_buffer_size': 2,
    'data.prefetch': 0,  # no prefetch thread
    'seeds.init': None,  # None: config.seed seeds every source
    'seeds.dropout': None,
    'seeds.data': None,
}


def upgrade(config) -> config_dict.ConfigDict:
    """A run's saved config (a dict as read from its JSON, or a ConfigDict) with the fields
    that configs saved before they existed lack: `ADDED_FIELDS`, and model fields at
    `ModelConfig`'s defaults (the paper's settings, which such runs had). Saved values are
    kept; `config` itself is not changed. Every reader of a saved config calls this, so
    no other code needs a fallback for a missing field."""
    if isinstance(config, config_dict.ConfigDict):
        config = config.to_dict()
    upgraded = config_dict.ConfigDict(config)
    model = {
        f.name: f.default
        for f in dataclasses.fields(ModelConfig)
        if f.default is not dataclasses.MISSING
    }
    added = ADDED_FIELDS | {f'model.{name}': value for name, value in model.items()}
    for key, value in added.items():
        node = upgraded
        *parents, leaf = key.split('.')
        for parent in parents:
            if parent not in node:
                node[parent] = config_dict.ConfigDict()
            node = node[parent]
        if leaf not in node:
            node[leaf] = value
    return upgraded


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


# --------------------------------------------------------------------- validation


def model_config(config: config_dict.ConfigDict) -> ModelConfig:
    """The validated `ModelConfig` of an experiment config's `model` field."""
    return ModelConfig.from_mapping(config.model.to_dict())


def validate(config: config_dict.ConfigDict, *, devices: int | None = None) -> None:
    """Raises ConfigError (`config.<field>=<value> ...: <fix>`) on the first setting of an
    `attn.train` experiment config that cannot work.

    Args:
      config: a config of `configs/` (as `get_config` returns it, overrides applied).
      devices: the devices of all processes each batch is split over; default
        `jax.device_count()`, which starts JAX's backend. Before `jax.distributed` has
        started pass 1 (as `cli.config` does): the batch must then hold at least one row.
    """
    model_config(config)
    if config.model_kind not in MODEL_KINDS:
        raise ConfigError(
            f'config.model_kind={config.model_kind!r} is not one of {MODEL_KINDS}: '
            "'transformer' (encoder-decoder) or 'lm' (decoder-only)."
        )
    if config.model_kind == 'transformer' and config.model.positions == 'none':
        raise ConfigError(
            'model.positions="none" leaves the encoder without any order (self-attention is '
            'permutation-invariant): use it with config.model_kind="lm", or give '
            'model.positions="sinusoidal" or "learned".'
        )
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(
            f'config.label_smoothing={config.label_smoothing!r} must be in [0, 1): the weight '
            "of the uniform distribution in each target (0 = none; the paper's 0.1, §5.4)."
        )
    _at_least(config, 'grad_accum_steps', 1, '1 = no accumulation.')
    _at_least(
        config,
        'loss_chunk',
        0,
        '0 = the whole loss at once; e.g. 64 = 64 target positions at a time.',
    )
    if not _is_int(config.total_steps) or config.total_steps < 1:
        raise ConfigError(
            f'config.total_steps={config.total_steps!r} leaves nothing to train: set the number '
            "of updates, e.g. --config.total_steps=100000 (the paper's base model, §5.2)."
        )
    _at_least(config, 'log_every_steps', 1, 'the steps between training-loss reports, e.g. 100.')
    _at_least(config, 'eval_every_steps', 1, 'the steps between validation losses, e.g. 1000.')
    _at_least(config, 'checkpoint_every_steps', 1, 'the steps between checkpoints, e.g. 1000.')
    if config.keep_checkpoints is not None:  # None keeps every checkpoint
        _at_least(
            config,
            'keep_checkpoints',
            1,
            'fewer deletes each checkpoint as soon as it is written; keep at least 1 (5 to '
            'average the last 5, §6.1).',
        )
    _at_least(
        config,
        'optimizer.warmup_steps',
        1,
        'the learning-rate schedule divides by it (§5.3, Eq. 3; the paper warms up for 4000).',
    )
    _at_least(config, 'bleu_every_steps', 0, '0 = no BLEU during training, N = every N steps.')
    _at_least(config, 'bleu_examples', 1, 'the examples decoded for periodic BLEU, e.g. 200.')
    _at_least(config, 'data.eval_batch_size', 1, 'examples per evaluation batch, e.g. 64.')
    _at_least(config, 'data.worker_count', 0, 'processes reading training examples (0: none).')
    _at_least(config, 'data.worker_buffer_size', 1, 'chunks each worker holds ready, e.g. 2.')
    _at_least(config, 'data.prefetch', 0, 'batches a thread packs ahead (0: none), e.g. 2.')
    _at_least(config, 'decode.beam_size', 1, "1 = greedy search, the paper's 4 (§6.1).")
    for source in SEED_SOURCES:
        if config.seeds[source] is not None:  # None: config.seed
            _at_least(config, f'seeds.{source}', 0, f'the {source} seed (unset: config.seed).')
    _check_batch(config, jax.device_count() if devices is None else devices)
    if config.sharding not in SHARDING_MODES:
        raise ConfigError(
            f"config.sharding={config.sharding!r} is not one of {SHARDING_MODES}: 'replicated' "
            "keeps the train state whole on every device, 'fsdp' splits it over them."
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(config, name: str):
    for part in name.split('.'):
        config = config[part]
    return config


def _at_least(config, name: str, low: int, fix: str) -> None:
    value = _field(config, name)
    if not _is_int(value) or value < low:
        raise ConfigError(f'config.{name}={value!r} must be an integer >= {low}: {fix}')


def _check_batch(config, devices: int) -> None:
    """`pipeline.batch_rows`'s condition: at least one row of max_length per device."""
    _at_least(config, 'data.max_length', 1, 'the longest training example kept, e.g. 256.')
    _at_least(config, 'data.tokens_per_batch', 1, 'tokens per side per step, e.g. 25000.')
    tokens, length = config.data.tokens_per_batch, config.data.max_length
    if tokens // length < devices:
        shorter = (
            f', or lower config.data.max_length to {tokens // devices} or less'
            if tokens >= devices
            else ''
        )
        fewer = 'not one' if devices == 1 else f'fewer than one per device ({devices} devices)'
        raise ConfigError(
            f'config.data.tokens_per_batch={tokens} fills {tokens / length:.2f} rows of '
            f'config.data.max_length={length}, {fewer}: raise config.data.tokens_per_batch '
            f'to at least {length * devices}{shorter}.'
        )
