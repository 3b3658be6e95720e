"""config.seeds: each of init, dropout and data order has its own seed (default
config.seed), so a seed study can tell which of them its spread comes from."""

import functools

import jax
import numpy as np
import pytest

from attn import configs
from attn.errors import ConfigError
from attn.model.config import ModelConfig
from attn.training import loop, sharding, step
from tests import test_launch, toy

# A model small enough that each setup compiles in seconds.
CFG = ModelConfig(vocab_size=toy.VOCAB_SIZE, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)
SEED = 3  # config.seed of every run here


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """run(init=, dropout=, data=) -> what a run of those config.seeds.* starts with: its
    initial parameters, the key of its dropout masks, its first batch and the training-mode
    loss of its first step."""
    data = toy.data(tmp_path_factory.mktemp('toy'))
    mesh = sharding.make_mesh()

    @functools.cache
    def start(init=None, dropout=None, data_seed=None):
        config = toy.config(
            seed=SEED, **{'seeds.init': init, 'seeds.dropout': dropout, 'seeds.data': data_seed}
        )
        steps = step.setup(config, CFG, mesh)
        params = toy.leaves(steps.state.params)  # before the step, which donates the state
        batches = data.train_iterator(config)
        batch = next(batches)
        batches.close()
        _, metrics = steps.train(steps.state, sharding.global_batch(mesh, batch), steps.rng)
        return {
            'params': params,
            'dropout': np.asarray(jax.random.key_data(steps.rng)),
            'batch': [np.asarray(batch[k]) for k in sorted(batch)],
            'loss': float(metrics['loss']),
        }

    return lambda init=None, dropout=None, data=None: start(init, dropout, data)


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_no_seeds_set_is_config_seed_for_every_source(run):
    unset, explicit = run(), run(init=SEED, dropout=SEED, data=SEED)
    assert same(unset['params'], explicit['params'])
    assert np.array_equal(unset['dropout'], explicit['dropout'])
    assert same(unset['batch'], explicit['batch'])
    assert unset['loss'] == explicit['loss']


def test_data_seed_changes_the_batches_alone(run):
    base, other = run(), run(data=SEED + 1)
    assert not same(base['batch'], other['batch'])
    assert same(base['params'], other['params'])
    assert np.array_equal(base['dropout'], other['dropout'])


def test_init_seed_changes_the_parameters_alone(run):
    base, other = run(), run(init=SEED + 1)
    assert not same(base['params'], other['params'])
    assert same(base['batch'], other['batch'])
    assert np.array_equal(base['dropout'], other['dropout'])


def test_dropout_seed_changes_the_training_loss_alone(run):
    base, other = run(), run(dropout=SEED + 1)
    assert same(base['params'], other['params'])
    assert same(base['batch'], other['batch'])
    assert not np.array_equal(base['dropout'], other['dropout'])
    assert base['loss'] != other['loss']  # same parameters and batch, other dropout masks


@pytest.mark.parametrize('source', configs.SEED_SOURCES)
def test_a_negative_seed_is_refused_naming_the_field(source):
    config = toy.config(**{f'seeds.{source}': -1})
    with pytest.raises(ConfigError, match=rf'config\.seeds\.{source}=-1 must be an integer >= 0'):
        configs.validate(config, devices=1)


def test_table3_takes_one_seed_per_source():
    table3 = configs.load_module(toy.CONFIGS / 'table3.py')
    config = table3.get_config('dataset=l10n,seed=2,init_seed=5,data_seed=0')
    assert config.seed == 2
    assert config.seeds.to_dict() == {'init': 5, 'dropout': None, 'data': 0}
    assert configs.source_seed(config, 'dropout') == 2
    assert table3.get_config('row=B1').seeds.to_dict() == dict.fromkeys(configs.SEED_SOURCES)


def _resume_mismatches(config, saved: dict) -> list[str]:
    resumed = loop.resumed_fields(config, configs.upgrade(saved))
    return [field for field, now, then in resumed if now != then]


def test_resume_keeps_the_data_and_dropout_seeds_not_the_init_seed():
    config = toy.config(seed=SEED)
    old = config.to_dict()
    del old['seeds']  # saved before the field existed: config.seed seeds every source
    assert _resume_mismatches(config, old) == []
    for source, refused in (('data', True), ('dropout', True), ('init', False)):
        other = toy.config(seed=SEED, **{f'seeds.{source}': SEED + 1})
        assert _resume_mismatches(other, old) == ([f'seeds.{source}'] if refused else [])


def test_table3_one_source_runs_are_named_and_reported_apart(tmp_path):
    sweep = configs.load_module(toy.CONFIGS.parent / 'experiments' / 'table3' / 'sweep.py')
    name, config_arg = sweep.get_sweep('data_seed=1')[0]
    assert (name, config_arg) == ('base-data1', 'configs/table3.py:row=base,data_seed=1')
    assert sweep.get_sweep('seed=2,init_seed=5')[0][0] == 'base-seed2-init5'
    for name, arg, perplexity in (
        ('base', '', 30.0),
        ('base-seed2', ',seed=2', 31.5),
        ('base-data1', ',data_seed=1', 30.5),
        ('base-data4', ',data_seed=4', 30.25),
    ):
        test_launch._finished_run(tmp_path / name, f'row=base,dataset=l10n{arg}', perplexity, 14.0)
    lines = test_launch._report(tmp_path)
    assert any(
        line.startswith('| base | 0, 2 | 30.00, 31.50 | 14.0, 14.0 | 1.50 | 0.0 |')
        for line in lines
    )
    data_only = '| base (data) | 0, 1, 4 | 30.00, 30.50, 30.25 | 14.0, 14.0, 14.0 | 0.50 | 0.0 |'
    assert any(line.startswith(data_only) for line in lines)
