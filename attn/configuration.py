"""Glue between `ml_collections` experiment configs and the library's typed settings, and
`validate`, which refuses any setting that cannot work before anything is built, compiled
or trained, naming the field and the fix.

`ModelConfig` (the model's hyperparameters and their checks) lives in `attn.model_config`,
free of ml_collections so that the model code can import it; it is re-exported here."""

from __future__ import annotations

import jax
from ml_collections import config_dict

from attn import config_lib, sharding
from attn import step as step_lib
from attn.errors import ConfigError
from attn.model_config import ModelConfig

__all__ = ['ModelConfig', 'model_config', 'validate']


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
    step_lib.StepConfig(
        config.model_kind, config.label_smoothing, config.grad_accum_steps, config.loss_chunk
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
    for source in config_lib.SEED_SOURCES:
        if config.seeds[source] is not None:  # None: config.seed
            _at_least(config, f'seeds.{source}', 0, f'the {source} seed (unset: config.seed).')
    _check_batch(config, jax.device_count() if devices is None else devices)
    mode = config.get('sharding', 'replicated')  # as step.setup reads it
    if mode not in sharding.SHARDING_MODES:
        raise ConfigError(
            f"config.sharding={mode!r} is not one of {sharding.SHARDING_MODES}: 'replicated' "
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
