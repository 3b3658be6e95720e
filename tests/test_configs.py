"""Every config builds a model of the right shapes; Table 3 parameter counts; bad configs raise."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attn import configs
from attn.inference import batching
from attn.model import build_model
from attn.model.config import ModelConfig
from attn.summary import summarize
from tests.toy import CONFIGS

table3 = configs.load_module(CONFIGS / 'table3.py')

# Every config file with the argument variants it documents.
VARIANTS = {
    'l10n': ['', 'size=tiny', 'size=base', 'pair=en-fr', 'runlocal'],
    'lm': ['', 'size=tiny', 'dataset=lm1b,size=base', 'runlocal'],
    'table3': [f'row={row}' for row in table3.ROWS]
    + [f'row={row},dataset=l10n' for row in ('base', 'A4', 'B1', 'C5', 'E', 'big')]
    + ['row=C1,runlocal', 'row=A1,shrink=2'],
    'wmt14': ['', 'size=big', 'pair=fr-en', 'size=big,pair=fr-en', 'runlocal'],
}
ALL = [(name, arg) for name, args in VARIANTS.items() for arg in args]


def load(name, arg):
    return configs.load(CONFIGS / f'{name}.py', arg)


def test_every_config_file_is_covered():
    studies = {'reference_window'}  # not attn.train configs; tests/test_reference_window.py
    files = {p.stem for p in CONFIGS.glob('*.py')} - studies
    assert files == set(VARIANTS)


@pytest.mark.parametrize('name,arg', ALL, ids=[f'{n}:{a}' for n, a in ALL])
def test_config_builds_with_right_shapes(name, arg):
    config = load(name, arg)
    cfg = configs.model_config(config)
    model = nnx.eval_shape(lambda: build_model(config.model_kind, cfg))
    B, S, T = 2, 11, 7
    src = jax.ShapeDtypeStruct((B, S), jnp.int32)
    tgt = jax.ShapeDtypeStruct((B, T), jnp.int32)
    if config.model_kind == 'transformer':
        logits = nnx.eval_shape(lambda m, x, y: m(x, y), model, src, tgt)
    else:
        logits = nnx.eval_shape(lambda m, y: m(y), model, tgt)
    assert logits.shape == (B, T, config.data.vocab_size)
    assert config.model.vocab_size == config.data.vocab_size
    assert config.total_steps > 0 and config.data.tokens_per_batch > 0


WMT14 = [
    (name, arg)
    for name, arg in ALL
    if load(name, arg).data.name == 'wmt14_translate'
    and load(name, arg).model_kind == 'transformer'
]


def test_wmt14_configs_are_found():
    assert {name for name, _ in WMT14} == {'wmt14', 'table3'}


@pytest.mark.parametrize('name,arg', WMT14, ids=[f'{n}:{a}' for n, a in WMT14])
def test_wmt14_trains_on_newstest2013_and_scores_newstest2014(name, arg):
    """Training watches the validation split; only the final score reads the test split."""
    data = load(name, arg).data
    assert (data.eval_split, data.test_split) == ('validation', 'test')


def test_learned_positions_cover_training_and_decoding():
    """Row E's learned table holds a training row and the decode length of its longest
    source (padded to a power of two, plus decode.max_extra_length)."""
    for arg in ('row=E', 'row=E,dataset=l10n', 'row=E,runlocal'):
        config = load('table3', arg)
        assert config.model.positions == 'learned'
        longest = batching.bucket(config.data.max_length) + config.decode.max_extra_length
        assert max(config.data.max_length, longest) <= config.model.max_len, arg


def test_table3_rows_change_what_the_paper_says():
    base = load('table3', 'row=base')
    assert (base.model.num_layers, base.model.emb_dim, base.model.mlp_dim) == (6, 512, 2048)
    assert (base.model.num_heads, base.model.dropout_rate, base.label_smoothing) == (8, 0.1, 0.1)
    b1 = configs.model_config(load('table3', 'row=B1'))
    assert (b1.head_qk_dim, b1.head_v_dim) == (16, 64)  # row B changes d_k alone
    a4 = configs.model_config(load('table3', 'row=A4'))
    assert (a4.num_heads, a4.head_qk_dim, a4.head_v_dim) == (32, 16, 16)
    assert load('table3', 'row=D4').label_smoothing == 0.2
    assert load('table3', 'row=E').model.positions == 'learned'
    big = load('table3', 'row=big')
    assert (big.model.emb_dim, big.model.num_heads, big.model.dropout_rate) == (1024, 16, 0.3)
    assert big.total_steps == 300_000


def test_small_scale_table3_keeps_each_rows_relation_to_base():
    small = {row: load('table3', f'row={row},dataset=l10n') for row in ('base', 'B1', 'C5', 'D3')}
    assert small['base'].data.name == 'l10n_translate' and small['base'].total_steps == 600
    assert all(config.model.pre_ln for config in small.values())
    base = configs.model_config(small['base'])
    assert (base.emb_dim, base.mlp_dim, base.num_heads, base.head_qk_dim) == (128, 512, 8, 16)
    assert configs.model_config(small['B1']).head_qk_dim == 4  # 16 / 4
    assert configs.model_config(small['C5']).emb_dim == 256  # 1024 / 4
    assert small['D3'].label_smoothing == 0.0


def table3_params():
    return {row: summarize(load('table3', f'row={row}'))['params'] for row in table3.ROWS}


def test_table3_parameter_differences_match_the_paper():
    """Each row's difference from base is the paper's within max(1M, 3% of it)."""
    ours = table3_params()
    paper_base = table3.PAPER['base'][2]
    for row, (_, _, paper_millions) in table3.PAPER.items():
        paper_diff = ((paper_millions or paper_base) - paper_base) * 1e6
        our_diff = ours[row] - ours['base']
        tolerance = max(1e6, 0.03 * abs(paper_diff))
        assert abs(our_diff - paper_diff) <= tolerance, (row, our_diff, paper_diff)
    assert 60e6 < ours['base'] < 66e6


def test_config_overrides_are_typed_and_locked():
    config = load('table3', 'row=base')
    config.model.qk_dim = 32  # placeholder accepts an int
    assert configs.model_config(config).head_qk_dim == 32
    config.data.vocab_size = 8000  # one vocabulary size for tokenizer and model
    assert config.model.vocab_size == 8000
    with pytest.raises(AttributeError, match='num_heads'):
        config.model.num_head = 4  # typo: the locked config names the near miss


@pytest.mark.parametrize(
    'fields,match',
    [
        (dict(num_heads=6), r'num_heads=6 does not divide model.emb_dim=512'),
        (dict(dropout_rate=1.5), r'dropout_rate=1.5 must be in \[0, 1\)'),
        (dict(dropout_rate=-0.1), r'dropout_rate'),
        (dict(attention_dropout_rate=1.0), r'attention_dropout_rate'),
        (dict(vocab_size=4), r'vocab_size=4 leaves no room'),
        (dict(num_layers=0), r'num_layers=0 must be a positive integer'),
        (dict(emb_dim=15, num_heads=3), r'must be even for sinusoidal'),
        (dict(positions='rotary'), r"positions='rotary' is not one of"),
        (dict(attention='flash'), r"attention='flash' is not one of"),
        (dict(dtype='int8'), r"dtype='int8'"),
        (dict(attention='fused', attention_dropout_rate=0.1), r'attention_dropout_rate=0'),
        (dict(attention='cudnn'), r'needs half-precision compute; set model.dtype="bfloat16"'),
        (dict(qk_dim=0), r'qk_dim=0'),
    ],
)
def test_bad_model_config_raises(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**fields)


def test_explicit_head_sizes_allow_any_head_count():
    cfg = ModelConfig(num_heads=6, qk_dim=64, v_dim=32)
    assert (cfg.head_qk_dim, cfg.head_v_dim) == (64, 32)


def test_unknown_model_field_names_the_near_miss():
    with pytest.raises(ValueError, match='Did you mean model.num_heads'):
        ModelConfig.from_mapping({'num_head': 4})


@pytest.mark.parametrize(
    'name,arg,match',
    [
        ('table3', 'row=F1', r"row='F1' is not one of"),
        ('table3', 'rows=A1', r"Unknown config argument 'rows'"),
        ('wmt14', 'size=huge', r"size='huge' is not one of"),
        ('wmt14', 'pair=en-xx', r"pair='en-xx'"),
        ('l10n', 'size=giant', r"size='giant'"),
        ('lm', 'dataset=c4', r"dataset='c4'"),
        ('l10n', 'size', r'needs a value'),
    ],
)
def test_bad_config_argument_raises(name, arg, match):
    with pytest.raises(ValueError, match=match):
        load(name, arg)


def test_parse_arg_types():
    arg = configs.parse_arg(
        'steps=5,runlocal,scale=0.5,name=x', steps=1, runlocal=False, scale=1.0, name=''
    )
    assert (arg.steps, arg.runlocal, arg.scale, arg.name) == (5, True, 0.5, 'x')


# A config.json as attn.train saved it when runs began to be saved (configs/common.py of
# the training loop's first commit, e06f456): the oldest a run directory can hold.
SAVED_BEFORE = {
    'model_kind': 'transformer',
    'seed': 3,
    'data': {
        'name': 'l10n_translate',
        'config': 'en-de',
        'source_lang': 'en',
        'target_lang': 'de',
        'data_dir': None,
        'vocab_size': 8000,
        'tokens_per_batch': 4096,
        'max_length': 128,
        'eval_split': 'validation',
        'eval_batch_size': 64,
    },
    'model': {
        'vocab_size': 8000,
        'num_layers': 3,
        'emb_dim': 256,
        'num_heads': 4,
        'qk_dim': None,
        'v_dim': None,
        'mlp_dim': 1024,
        'dropout_rate': 0.1,
        'attention_dropout_rate': 0.0,
        'positions': 'sinusoidal',
        'max_len': 512,
        'pre_ln': False,
        'share_embeddings': True,
        'tie_output': True,
        'attention': 'reference',
        'dtype': 'float32',
    },
    'total_steps': 20000,
    'label_smoothing': 0.1,
    'optimizer': {
        'b1': 0.9,
        'b2': 0.98,
        'eps': 1e-9,
        'warmup_steps': 4000,
        'lr_scale': 1.0,
        'grad_clip_norm': 0.0,
    },
    'grad_accum_steps': 1,
    'decode': {'beam_size': 4, 'alpha': 0.6, 'max_extra_length': 50},
    'log_every_steps': 100,
    'eval_every_steps': 1000,
    'checkpoint_every_steps': 1000,
    'keep_checkpoints': 5,
}


def _fields(config: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _fields(value, f'{prefix}{key}.')
        else:
            out[f'{prefix}{key}'] = value
    return out


def test_an_old_saved_config_is_upgraded_to_every_field_of_today():
    """Every field today's configs have (a field added to base_config without its old
    value in configs.ADDED_FIELDS fails here), saved values kept, the rest as old runs
    did; what reads a config works on it."""
    saved = json.loads(json.dumps(SAVED_BEFORE))
    upgraded = configs.upgrade(saved)
    assert saved == SAVED_BEFORE  # not changed in place
    fields = _fields(upgraded.to_dict())
    assert fields.keys() == _fields(configs.base_config().to_dict()).keys()
    assert _fields(SAVED_BEFORE).items() <= fields.items()
    assert {k: fields[k] for k in configs.ADDED_FIELDS} == configs.ADDED_FIELDS
    assert fields['model.remat'] == ModelConfig().remat
    configs.validate(upgraded, devices=1)
    assert [configs.source_seed(upgraded, s) for s in configs.SEED_SOURCES] == [3, 3, 3]
    assert configs.upgrade(upgraded).to_dict() == upgraded.to_dict()


def test_a_run_saved_before_worker_processes_resumes_only_without_them():
    from attn.training import loop

    config = configs.upgrade(SAVED_BEFORE)
    assert [f for f, now, then in loop.resumed_fields(config, config) if now != then] == []
    config.data.worker_count = 2  # the iterator state was saved by the training process
    resumed = loop.resumed_fields(config, configs.upgrade(SAVED_BEFORE))
    assert [f for f, now, then in resumed if now != then] == ['data.worker_count']
