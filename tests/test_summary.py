"""`attn.summary`: parameter counts and analytic FLOPs, checked against the model and XLA."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attn.model import build_model
from attn.model.config import ModelConfig
from attn.summary import forward_flops, module_params


@pytest.mark.parametrize('kind', ['transformer', 'lm'])
@pytest.mark.parametrize('heads', [(None, None), (16, 48)], ids=['derived', 'dk!=dv'])
@pytest.mark.parametrize(
    'switches', [{}, {'num_kv_heads': 2, 'ffn': 'swiglu'}], ids=['paper', 'gqa+swiglu']
)
def test_forward_flops_match_xla_cost_analysis(kind, heads, switches):
    """Matmuls are all but ~2% of XLA's count of a forward pass (it adds elementwise ops)."""
    qk_dim, v_dim = heads
    cfg = ModelConfig(
        vocab_size=1000,
        num_layers=2,
        emb_dim=128,
        num_heads=4,
        qk_dim=qk_dim,
        v_dim=v_dim,
        mlp_dim=512,
        dropout_rate=0.0,
        **switches,
    )
    graphdef, state = nnx.split(build_model(kind, cfg))
    tokens = jnp.ones((1, 64), jnp.int32)

    def forward(state, tokens):
        model = nnx.merge(graphdef, state)
        return model(tokens, tokens) if kind == 'transformer' else model(tokens)

    cost = jax.jit(forward).lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = forward_flops(cfg, kind, 64, 64) / cost['flops']
    assert 0.95 < ratio <= 1.0


def run_summary(*args):
    result = subprocess.run(
        [sys.executable, '-m', 'attn.summary', *args], capture_output=True, text=True, check=True
    )
    return result.stdout


def test_summary_json_counts_the_models_parameters():
    out = json.loads(run_summary('--config=configs/l10n.py:size=tiny', '--json'))
    from tests.toy import l10n

    config = l10n.get_config('size=tiny')
    from attn.configs import model_config

    model = build_model('transformer', model_config(config))
    expected = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert out['params'] == expected == sum(module_params(model).values())
    assert out['train_flops_per_token'] == pytest.approx(3 * out['forward_flops_per_token'])
    assert set(out['modules']) >= {'encoder.layers.0', 'decoder.layers.1'}


def test_summary_table_and_overrides():
    table = run_summary('--config=configs/table3.py:row=C1', '--config.model.num_layers=1')
    assert 'encoder.layers.0' in table and 'encoder.layers.1' not in table
    assert 'total' in table
    # A field unset by default (None) is a flag too: fewer key/value heads, fewer parameters.
    grouped = run_summary(
        '--config=configs/table3.py:row=C1',
        '--config.model.num_layers=1',
        '--config.model.num_kv_heads=1',
    )

    def total(text):
        line = next(line for line in text.splitlines() if line.startswith('total'))
        return int(line.split()[-1].replace(',', ''))

    assert total(grouped) < total(table)


def test_console_script_dispatches():
    out = subprocess.run(
        ['attn', 'summary', '--config=configs/lm.py:size=tiny', '--json'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)['params'] > 0
    bad = subprocess.run(['attn', 'nonsense'], capture_output=True, text=True)
    assert bad.returncode == 2 and 'summary' in bad.stderr


def test_summary_bad_config_names_the_field():
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'attn.summary',
            '--config=configs/table3.py',
            '--config.model.num_heads=7',
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert 'num_heads=7 does not divide model.emb_dim=512' in result.stderr
