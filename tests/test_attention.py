"""Eq. (1) against a float64 NumPy reference; masks written out by hand; fused == reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.model import attention

FP32_TOL = 2e-6  # max abs error of float32 attention vs float64 (outputs are O(1))


def numpy_attention(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d_k)) V in float64. q [B,T,N,K], k [B,S,N,K], v [B,S,N,H]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum('btnk,bsnk->bnts', q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -1e300)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum('bnts,bsnh->btnh', probs, v), probs


def random_qkv(seed, B=2, T=5, S=7, N=3, K=4, H=6):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, K)).astype(np.float32)
    k = rng.standard_normal((B, S, N, K)).astype(np.float32)
    v = rng.standard_normal((B, S, N, H)).astype(np.float32)
    return q, k, v


def test_causal_mask_by_hand():
    expected = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(attention.causal_mask(3)[0, 0], expected)


def test_padding_mask_by_hand():
    mask = attention.padding_mask(jnp.array([[True, True, False]]), jnp.array([[True, False]]))
    expected = np.array([[1, 0], [1, 0], [0, 0]], bool)
    assert mask.shape == (1, 1, 3, 2)
    np.testing.assert_array_equal(mask[0, 0], expected)


def test_segment_mask_by_hand():
    segments = jnp.array([[1, 1, 2, 2, 0]])
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0],  # padding attends nowhere
        ],
        bool,
    )
    np.testing.assert_array_equal(attention.segment_mask(segments, segments)[0, 0], expected)


def test_combined_packed_causal_mask_by_hand():
    segments = jnp.array([[1, 1, 2, 2, 2]])
    mask = attention.combine_masks(
        attention.segment_mask(segments, segments), attention.causal_mask(5), None
    )
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask[0, 0], expected)
    assert attention.combine_masks(None, None) is None


@pytest.mark.parametrize('masked', [False, True])
def test_reference_matches_float64(masked):
    q, k, v = random_qkv(0)
    mask = None
    if masked:
        key_valid = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
        mask = attention.padding_mask(jnp.ones((2, 5), bool), key_valid)
    out, probs = attention.reference_attention(q, k, v, mask)
    expected_out, expected_probs = numpy_attention(q, k, v, mask)
    assert np.abs(np.asarray(out) - expected_out).max() < FP32_TOL
    assert np.abs(np.asarray(probs) - expected_probs).max() < FP32_TOL
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)


def _masks():
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 0, 0]])
    valid = segments != 0
    return {
        'none': None,
        'padding': attention.padding_mask(valid, valid),
        'causal': attention.causal_mask(7),
        'packed': attention.segment_mask(segments, segments),
        'packed+causal': attention.combine_masks(
            attention.segment_mask(segments, segments), attention.causal_mask(7)
        ),
    }


@pytest.mark.parametrize('mask_name', list(_masks()))
@pytest.mark.parametrize('dims', [(4, 4), (4, 6), (8, 2)], ids=['K=H', 'K<H', 'K>H'])
def test_fused_matches_reference(mask_name, dims):
    K, H = dims
    q, k, v = random_qkv(1, T=7, S=7, K=K, H=H)
    mask = _masks()[mask_name]
    fused = attention.dot_product_attention(q, k, v, mask, implementation='fused')
    reference = attention.dot_product_attention(q, k, v, mask, implementation='reference')
    assert fused.shape == (2, 7, 3, H)
    # Compare rows that can attend somewhere; fully masked (padding) rows are don't-care.
    live = np.ones((2, 7), bool)
    if mask is not None:
        live = np.broadcast_to(np.asarray(mask).any(-1)[:, 0], (2, 7))
    diff = np.abs(np.asarray(fused) - np.asarray(reference))[live]
    assert diff.max() < 2e-6


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fully_masked_rows_stay_finite(dtype):
    q, k, v = (x.astype(dtype) for x in map(jnp.asarray, random_qkv(2)))
    mask = jnp.zeros((2, 1, 5, 7), bool)
    out, probs = attention.reference_attention(q, k, v, mask)
    assert probs.dtype == jnp.float32  # softmax in float32 whatever the compute dtype
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())
    np.testing.assert_allclose(np.asarray(probs), 1.0 / 7, rtol=1e-6)


def test_attention_dropout_scales_kept_weights_by_one_over_keep():
    """With one-hot values the output is the dropped-out weights themselves, which
    recovers the mask: each weight is either 0 or p / (1 - rate), and about 1 - rate of
    them are kept (1024 weights: the kept fraction's std is 0.014, the bound is 5 std).
    rate != 0.5, so that confusing the keep and drop probabilities shows."""
    rate, S = 0.25, 8
    q, k, _ = random_qkv(3, B=4, T=8, S=S, N=4, K=4)
    v = np.broadcast_to(np.eye(S, dtype=np.float32)[None, :, None, :], (4, S, 4, S))
    out, probs = attention.reference_attention(
        q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(0)
    )
    dropped = np.asarray(out).transpose(0, 2, 1, 3)  # [B, N, T, S]: weights after dropout
    probs = np.asarray(probs)
    kept = dropped != 0.0
    np.testing.assert_allclose(dropped[kept], probs[kept] / (1.0 - rate), rtol=1e-6)
    assert abs(kept.mean() - (1.0 - rate)) < 0.07
    plain = attention.reference_attention(q, k, v)[0]
    np.testing.assert_allclose(np.asarray(plain).transpose(0, 2, 1, 3), probs, atol=1e-6)


def test_dispatch_guards_and_weights():
    q, k, v = random_qkv(3)
    with pytest.raises(ValueError, match='dropout_rate > 0 needs a dropout_rng'):
        attention.reference_attention(q, k, v, dropout_rate=0.5)
    with pytest.raises(ValueError, match='set attention_dropout_rate=0'):
        attention.dot_product_attention(
            q, k, v, implementation='fused', dropout_rate=0.1, dropout_rng=jax.random.key(0)
        )
    with pytest.raises(ValueError, match=r"Unknown attention implementation 'flash'"):
        attention.dot_product_attention(q, k, v, implementation='flash')
    # The fused kernels return no weights: asking for them runs the reference path.
    out, probs = attention.dot_product_attention(
        q, k, v, implementation='fused', return_weights=True
    )
    ref_out, ref_probs = attention.reference_attention(q, k, v)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(probs, ref_probs)
