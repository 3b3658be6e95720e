"""Whole-model invariances: padding, packing, causality, incremental decoding, switches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn import attention, decode
from attn.model import (
    BOS_ID,
    PAD_ID,
    ConfigError,
    LanguageModel,
    ModelConfig,
    Transformer,
    shift_right,
)
from tests.test_layers import numpy_layer_norm, numpy_mha

TINY = ModelConfig(
    vocab_size=40, num_layers=2, emb_dim=16, num_heads=4, mlp_dim=32, dropout_rate=0.1
)
TOL = 1e-5

SOURCE_A, TARGET_A = [5, 6, 7, 8, 3], [9, 10, 11, 3]
SOURCE_B, TARGET_B = [12, 13, 3], [14, 15, 16, 17, 3]


def pad(ids, length):
    return ids + [PAD_ID] * (length - len(ids))


def transformer(**overrides):
    return Transformer(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(0))


def test_shift_right_by_hand():
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(shift_right(tokens)[0], [BOS_ID, 5, 6, 7, 8, 9])
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    positions = jnp.array([[0, 1, 0, 1, 2, 0]])
    np.testing.assert_array_equal(
        shift_right(tokens, segments, positions)[0], [BOS_ID, 5, BOS_ID, 7, 8, PAD_ID]
    )


def test_encoder_layer_matches_float64_post_ln():
    """One post-LN encoder layer by hand: LN(x + MHA(x)), then LN(h + FFN(h)) (§3.1)."""
    model = transformer(num_layers=1, dropout_rate=0.0)
    layer = model.encoder.layers[0]
    for residual in (layer.self_attention_residual, layer.feed_forward_residual):
        residual.norm.scale[...] = jnp.linspace(0.5, 2.0, 16)
        residual.norm.bias[...] = jnp.linspace(-0.3, 0.3, 16)
    x = np.random.default_rng(0).standard_normal((1, 4, 16))
    mask = attention.padding_mask(jnp.ones((1, 4), bool), jnp.array([[1, 1, 1, 0]], bool))
    got = np.asarray(layer(jnp.asarray(x, jnp.float32), mask))

    def norm(residual, h):
        return numpy_layer_norm(h, residual.norm.scale[...], residual.norm.bias[...])

    ffn = layer.feed_forward
    h = norm(layer.self_attention_residual, x + numpy_mha(layer.self_attention, x, x, mask))
    f = np.maximum(0, h @ np.asarray(ffn.wi.kernel[...]) + np.asarray(ffn.wi.bias[...]))
    f = f @ np.asarray(ffn.wo.kernel[...]) + np.asarray(ffn.wo.bias[...])
    expected = norm(layer.feed_forward_residual, h + f)
    assert np.abs(got - expected).max() < TOL


def test_padding_does_not_change_outputs():
    model = transformer()
    short = model(jnp.array([SOURCE_A]), jnp.array([TARGET_A]))
    padded = model(jnp.array([pad(SOURCE_A, 9)]), jnp.array([pad(TARGET_A, 7)]))
    assert np.abs(np.asarray(padded[:, :4]) - np.asarray(short)).max() < TOL


@pytest.mark.parametrize('kind', ['transformer', 'lm'])
def test_packed_equals_one_by_one(kind):
    if kind == 'transformer':
        model = transformer()
        alone = [
            model(jnp.array([s]), jnp.array([t]))
            for s, t in ((SOURCE_A, TARGET_A), (SOURCE_B, TARGET_B))
        ]
        packed = model(
            jnp.array([pad(SOURCE_A + SOURCE_B, 10)]),
            jnp.array([pad(TARGET_A + TARGET_B, 11)]),
            inputs_segmentation=jnp.array([pad([1] * 5 + [2] * 3, 10)]),
            targets_segmentation=jnp.array([pad([1] * 4 + [2] * 5, 11)]),
            inputs_position=jnp.array([pad(list(range(5)) + list(range(3)), 10)]),
            targets_position=jnp.array([pad(list(range(4)) + list(range(5)), 11)]),
        )
    else:
        model = LanguageModel(TINY, rngs=nnx.Rngs(0))
        alone = [model(jnp.array([t])) for t in (TARGET_A, TARGET_B)]
        packed = model(
            jnp.array([pad(TARGET_A + TARGET_B, 11)]),
            jnp.array([pad([1] * 4 + [2] * 5, 11)]),
            jnp.array([pad(list(range(4)) + list(range(5)), 11)]),
        )
    packed = np.asarray(packed)
    assert np.abs(packed[0, :4] - np.asarray(alone[0])[0]).max() < TOL
    assert np.abs(packed[0, 4:9] - np.asarray(alone[1])[0]).max() < TOL


def test_language_model_is_causal():
    model = LanguageModel(TINY, rngs=nnx.Rngs(1))
    a = np.asarray(model(jnp.array([[5, 6, 7, 8, 9]])))
    b = np.asarray(model(jnp.array([[5, 6, 7, 30, 31]])))
    assert np.abs(a[0, :4] - b[0, :4]).max() < TOL  # logits at t see tokens < t only
    assert np.abs(a[0, 4] - b[0, 4]).max() > 1e-3


def test_incremental_decoding_equals_full_forward():
    model = transformer(dropout_rate=0.0)
    inputs = jnp.array([pad(SOURCE_A, 6), pad(SOURCE_B, 6)])
    targets = jnp.array([pad(TARGET_A, 5), TARGET_B])
    full = np.asarray(model(inputs, targets))
    encoded = model.encode(inputs)
    decoder_inputs = shift_right(targets)
    model.decoder.init_cache(batch_size=2, max_length=5, encoded=encoded)
    steps = [
        model.decode(
            None,  # decode=True reads the source's keys/values from the cache
            inputs,
            decoder_inputs[:, t : t + 1],
            targets_position=jnp.full((2, 1), t),
            targets_segmentation=jnp.ones((2, 1), jnp.int32),
            decode=True,
        )
        for t in range(5)
    ]
    incremental = np.concatenate([np.asarray(s) for s in steps], axis=1)
    assert np.abs(incremental[0, :4] - full[0, :4]).max() < TOL  # real target positions
    assert np.abs(incremental[1] - full[1]).max() < TOL


def test_learned_positions_past_max_len_raise_at_trace_time():
    """Past the table a gather reads out of bounds (NaN, silently): raise instead."""
    model = transformer(positions='learned', max_len=8, dropout_rate=0.0)
    fits = jnp.full((1, 8), 5)
    assert np.isfinite(np.asarray(nnx.jit(lambda m, x, y: m(x, y))(model, fits, fits))).all()
    long = jnp.full((1, 9), 5)
    for source, target in ((long, fits), (fits, long)):
        with pytest.raises(ConfigError, match=r'9 positions .* model\.max_len=8 rows'):
            nnx.jit(lambda m, x, y: m(x, y))(model, source, target)
    lm = LanguageModel(dataclasses.replace(TINY, positions='learned', max_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r'Raise model\.max_len to at least 9'):
        lm(long)


def test_learned_positions_bound_decoding():
    """Translation caches the source padded to a power of two plus max_extra_length."""
    model = transformer(positions='learned', max_len=16, dropout_rate=0.0)
    inputs = np.array([[5, 6, 7, 8, 3]], np.int32)  # padded to width 8
    tokens = decode.translate(model, inputs, beam_size=1, max_extra_length=8)  # 8 + 8 = 16
    assert tokens.shape == (1, 16)
    for beam_size in (1, 2):
        with pytest.raises(ConfigError, match=r'decoding caches 17 positions.*max_extra_length'):
            decode.translate(model, inputs, beam_size=beam_size, max_extra_length=9)


def test_dropout_is_random_only_when_training():
    model = transformer()
    x, y = jnp.array([SOURCE_A]), jnp.array([TARGET_A])
    np.testing.assert_array_equal(model(x, y), model(x, y))
    a = model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=0))
    b = model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=1))
    c = model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=0))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)  # same key, same masks
    with pytest.raises(Exception):  # noqa: B017 - nnx raises its own error type
        model(x, y, deterministic=False)


def test_fused_model_equals_reference_model():
    x, y = jnp.array([pad(SOURCE_A, 7)]), jnp.array([pad(TARGET_B, 6)])
    reference = np.asarray(transformer(qk_dim=4, v_dim=6)(x, y))
    fused = np.asarray(transformer(qk_dim=4, v_dim=6, attention='fused')(x, y))
    assert np.abs(reference[0, :5] - fused[0, :5]).max() < TOL


@pytest.mark.parametrize(
    'overrides',
    [
        dict(pre_ln=True),
        dict(positions='learned', max_len=16),
        dict(share_embeddings=False, tie_output=False),
        dict(attention_dropout_rate=0.1),
        dict(dtype='bfloat16'),
    ],
    ids=lambda o: ','.join(o),
)
def test_switches_build_and_run(overrides):
    model = transformer(**overrides)
    x, y = jnp.array([pad(SOURCE_A, 7)]), jnp.array([pad(TARGET_B, 6)])
    logits = model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=0))
    assert logits.shape == (1, 6, TINY.vocab_size)
    assert bool(jnp.isfinite(logits.astype(jnp.float32)).all())
    params = nnx.state(model, nnx.Param)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_parameter_sharing():
    shared = transformer()
    untied = transformer(share_embeddings=False, tie_output=False)

    def count(model):
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    table = TINY.vocab_size * TINY.emb_dim
    assert count(untied) - count(shared) == 2 * table  # target embedding + output projection
    assert shared.encoder.embedder.embed is shared.decoder.embedder.embed


@pytest.mark.parametrize('tied', [True, False])
def test_hidden_states_project_to_the_logits(tied):
    """project=False gives the final hidden states; `Decoder.logits` is x @ W^T with W
    the target embedding (tied, §3.4) or the decoder's own matrix."""
    model = transformer(share_embeddings=tied, tie_output=tied)
    x, y = jnp.array([pad(SOURCE_A, 7)]), jnp.array([pad(TARGET_B, 6)])
    hidden = np.asarray(model(x, y, project=False), np.float64)
    assert hidden.shape == (1, 6, TINY.emb_dim)
    decoder = model.decoder
    assert decoder.output_matrix().dtype == jnp.float32  # the parameters themselves
    if tied:
        matrix = np.asarray(decoder.embedder.embed.embedding[...], np.float64)
    else:
        matrix = np.asarray(decoder.logits_dense.kernel[...], np.float64).T
    np.testing.assert_allclose(np.asarray(model(x, y)), hidden @ matrix.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_changes_memory_not_gradients(remat):
    """With dropout on, rematerialised layers give the same loss and gradients, taken as
    the train step takes them (the model merged inside `jax.grad`)."""
    x, y = jnp.array([pad(SOURCE_A, 7)]), jnp.array([pad(TARGET_B, 6)])

    def loss_and_grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            model = nnx.merge(graphdef, params, rest)
            logits = model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=3))
            return (jax.nn.logsumexp(logits, axis=-1) - logits[..., 5]).mean()

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        return jax.value_and_grad(loss)(params), 'remat' in jaxpr or 'checkpoint' in jaxpr

    (plain_loss, plain), plain_remat = loss_and_grads(transformer())
    (remat_loss, grads), has_remat = loss_and_grads(transformer(remat=remat))
    assert has_remat and not plain_remat
    assert float(plain_loss) == pytest.approx(float(remat_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
