"""The NNX building blocks against float64 NumPy and hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn.model import attention, layers
from tests.test_attention import numpy_attention


def numpy_layer_norm(x, scale, bias, eps=1e-6):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


def numpy_mha(mha, x_q, x_kv, mask=None):
    """MultiHead(Q, K, V) in float64 from the module's own weights."""
    w = {
        name: np.asarray(getattr(mha, name)[...], np.float64)
        for name in ('query', 'key', 'value', 'out')
    }
    q = np.einsum('btd,dnk->btnk', x_q, w['query'])
    N, G = w['query'].shape[1], w['key'].shape[1]  # query heads, key/value heads
    kv_head = np.arange(N) // (N // G)  # GQA: query head n reads key/value head n // (N / G)
    w['key'], w['value'] = w['key'][:, kv_head], w['value'][:, kv_head]
    k = np.einsum('bsd,dnk->bsnk', x_kv, w['key'])
    if mha.query_norm is not None:  # QK-norm: over each head's d_k
        from tests.test_model import numpy_norm

        q, k = numpy_norm(mha.query_norm, q), numpy_norm(mha.key_norm, k)
    v = np.einsum('bsd,dnh->bsnh', x_kv, w['value'])
    heads, _ = numpy_attention(q, k, v, mask)
    heads = heads * np.asarray(mha.head_mask[...])[:, None]
    return np.einsum('btnh,nhd->btd', heads, w['out'])


def test_sinusoid_at_known_positions():
    D = 8
    pe = np.asarray(layers.sinusoidal_positions(jnp.array([[0, 1, 5]]), D))[0]
    np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1, 0, 1], atol=1e-7)  # sin 0, cos 0
    for dim in range(D):
        i = dim // 2
        angle = 5 / 10000 ** (2 * i / D)
        expected = math.sin(angle) if dim % 2 == 0 else math.cos(angle)
        assert pe[2, dim] == pytest.approx(expected, abs=1e-6)
    assert pe[1, 0] == pytest.approx(math.sin(1.0), abs=1e-7)
    assert pe[1, 1] == pytest.approx(math.cos(1.0), abs=1e-7)
    assert pe[1, 2] == pytest.approx(math.sin(1 / 10000 ** (2 / D)), abs=1e-7)


@pytest.mark.parametrize('implementation', ['reference', 'fused'])
def test_multi_head_attention_matches_float64(implementation):
    mha = layers.MultiHeadAttention(
        12, 3, 4, 5, implementation=implementation, rngs=nnx.Rngs(0)
    )  # d_k = 4 != d_v = 5
    rng = np.random.default_rng(0)
    x_q = rng.standard_normal((2, 3, 12)).astype(np.float32)
    x_kv = rng.standard_normal((2, 6, 12)).astype(np.float32)
    mask = attention.padding_mask(
        jnp.ones((2, 3), bool), jnp.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    )
    out, _ = mha(x_q, x_kv, mask=mask)
    assert out.shape == (2, 3, 12)
    assert np.abs(np.asarray(out) - numpy_mha(mha, x_q, x_kv, mask)).max() < 1e-5


def test_head_mask_removes_exactly_that_head():
    mha = layers.MultiHeadAttention(8, 2, 4, 4, rngs=nnx.Rngs(1))
    x = np.random.default_rng(1).standard_normal((1, 4, 8)).astype(np.float32)
    full = np.asarray(mha(x, x)[0])
    mha.head_mask[...] = jnp.array([1.0, 0.0])
    ablated = np.asarray(mha(x, x)[0])
    assert not np.allclose(full, ablated)
    np.testing.assert_allclose(ablated, numpy_mha(mha, x, x), atol=1e-5)
    # Only head 0 contributes: its share of W^O applied to its output.
    mha.head_mask[...] = jnp.array([1.0, 1.0])
    np.testing.assert_allclose(np.asarray(mha(x, x)[0]), full, atol=1e-6)


def test_sown_attention_weights():
    mha = layers.MultiHeadAttention(8, 2, 4, 4, implementation='fused', rngs=nnx.Rngs(2))
    x = jnp.ones((2, 5, 8))
    _, captured = nnx.capture(mha, nnx.Intermediate)(x, x)
    assert not captured  # nothing sown unless asked
    mha.capture_weights = True
    _, captured = nnx.capture(mha, nnx.Intermediate)(x, x, mask=attention.causal_mask(5))
    (weights,) = captured['attention_weights'].get_value()
    assert weights.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
    assert float(jnp.triu(weights, 1).max()) == 0.0  # causal: nothing above the diagonal


def test_feed_forward_matches_numpy():
    ffn = layers.FeedForward(6, 10, dtype=jnp.float32, rngs=nnx.Rngs(3))
    x = np.random.default_rng(3).standard_normal((2, 3, 6))
    w1, b1 = np.asarray(ffn.wi.kernel[...]), np.asarray(ffn.wi.bias[...])
    w2, b2 = np.asarray(ffn.wo.kernel[...]), np.asarray(ffn.wo.bias[...])
    expected = np.maximum(0, x @ w1 + b1) @ w2 + b2
    np.testing.assert_allclose(np.asarray(ffn(x.astype(np.float32))), expected, atol=1e-5)


def test_embedding_scaled():
    embed = layers.Embed(11, 4, dtype=jnp.float32, rngs=nnx.Rngs(4))
    table = np.asarray(embed.embedding[...])
    np.testing.assert_allclose(
        np.asarray(embed(jnp.array([[3, 7]])))[0], table[[3, 7]] * 2.0, rtol=1e-6
    )


def test_learned_positions_lookup():
    positions = layers.LearnedPositions(6, 4, rngs=nnx.Rngs(5))
    table = np.asarray(positions.embedding[...])
    np.testing.assert_array_equal(
        np.asarray(positions(jnp.array([[0, 5, 2]])))[0], table[[0, 5, 2]]
    )


def test_kv_cache_guards():
    """Attention needs keys/values from somewhere; a cache only grows."""
    mha = layers.MultiHeadAttention(8, 2, 4, 4, rngs=nnx.Rngs(8))
    with pytest.raises(ValueError, match='give inputs_kv, a cache, or both'):
        mha(jnp.ones((1, 1, 8)), None)
    cache = mha.empty_cache(1, 4)
    assert int(cache.index) == 0 and cache.length == 4
    _, cache = mha(jnp.ones((1, 1, 8)), jnp.ones((1, 1, 8)), cache=cache)
    assert int(cache.index) == 1
    with pytest.raises(ValueError, match='3 entries < the cache'):
        cache.grow(3)


def test_cached_self_attention_equals_causal_attention():
    """Step t attends to positions 0..t of the cache: the causal mask, one row at a time;
    a prompt's several positions at once are causal among themselves too."""
    mha = layers.MultiHeadAttention(8, 2, 4, 3, rngs=nnx.Rngs(9))
    x = np.random.default_rng(9).standard_normal((2, 5, 8)).astype(np.float32)
    full, _ = mha(x, x, mask=attention.causal_mask(5))
    cache, steps = mha.empty_cache(2, 5), []
    for t in range(5):
        out, cache = mha(x[:, t : t + 1], x[:, t : t + 1], cache=cache)
        steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), atol=1e-6)
    first, cache = mha(x[:, :3], x[:, :3], cache=mha.empty_cache(2, 5))  # a prefill of 3
    rest, _ = mha(x[:, 3:], x[:, 3:], cache=cache)
    np.testing.assert_allclose(np.concatenate([first, rest], 1), np.asarray(full), atol=1e-6)


def test_a_grown_cache_keeps_what_was_written():
    """Three steps in a cache of 3, grown to 5, two more steps: causal attention throughout."""
    mha = layers.MultiHeadAttention(8, 2, 4, 3, rngs=nnx.Rngs(13))
    x = np.random.default_rng(13).standard_normal((2, 5, 8)).astype(np.float32)
    full, _ = mha(x, x, mask=attention.causal_mask(5))
    cache, steps = mha.empty_cache(2, 3), []
    for t in range(5):
        if t == 3:
            cache = cache.grow(5)
        out, cache = mha(x[:, t : t + 1], x[:, t : t + 1], cache=cache)
        steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), atol=1e-6)


def test_projected_source_equals_attention_over_it():
    """A source projected once (`project`) and attended through the cache == full attention
    over it, padding masked."""
    mha = layers.MultiHeadAttention(8, 2, 4, 3, rngs=nnx.Rngs(10))
    rng = np.random.default_rng(10)
    y = rng.standard_normal((2, 3, 8)).astype(np.float32)
    source = rng.standard_normal((2, 6, 8)).astype(np.float32)
    mask = attention.padding_mask(
        jnp.ones((2, 3), bool), jnp.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    )
    cached, cache = mha(y, None, mask=mask, cache=mha.project(source))
    full, _ = mha(y, source, mask=mask)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-6)
    assert int(cache.index) == 6  # unchanged: nothing appended
