"""Whole-model checks: layers and embeddings against float64 NumPy, padding, packing,
causality, incremental decoding, and each switch (pre-LN, learned positions, untied
embeddings, bfloat16, attention dropout, remat) against a reference or an invariance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from attn.configs import ModelConfig
from attn.errors import ConfigError
from attn.inference import batching
from attn.model import LanguageModel, Transformer, attention, shift_right
from attn.model.tokens import BOS_ID, PAD_ID
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


def batch():
    return jnp.array([pad(SOURCE_A, 7)]), jnp.array([pad(TARGET_B, 6)])


def test_shift_right_by_hand():
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(shift_right(tokens)[0], [BOS_ID, 5, 6, 7, 8, 9])
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    positions = jnp.array([[0, 1, 0, 1, 2, 0]])
    np.testing.assert_array_equal(
        shift_right(tokens, segments, positions)[0], [BOS_ID, 5, BOS_ID, 7, 8, PAD_ID]
    )


# ------------------------------------------------------------ float64 references


def test_parameter_paths_and_shapes():
    """The state paths and shapes checkpoints hold (restore and export read these names),
    for a one-layer model without and with every switch that adds parameters."""
    attn = {'query': (16, 4, 2), 'key': (16, 4, 2), 'value': (16, 4, 3), 'out': (4, 3, 16)}
    ffn = {'wi.kernel': (16, 32), 'wi.bias': (32,), 'wo.kernel': (32, 16), 'wo.bias': (16,)}
    norm = {'scale': (16,), 'bias': (16,)}

    def block(prefix, sublayers):
        return {
            f'{prefix}.{name}{suffix}.{leaf}': shape
            for name, params in sublayers.items()
            for suffix, group in (('', params), ('_residual.norm', norm))
            for leaf, shape in group.items()
        }

    encoder = block('encoder.layers.0', {'self_attention': attn, 'feed_forward': ffn})
    layer = {'self_attention': attn, 'cross_attention': attn, 'feed_forward': ffn}
    decoder = block('decoder.layers.0', layer)
    lm = block('decoder.layers.0', {'self_attention': attn, 'feed_forward': ffn})
    embed = {'decoder.embedder.embed.embedding': (40, 16)}  # shared: listed once
    extras = {
        'encoder.embedder.embed.embedding': (40, 16),
        'decoder.logits_dense.kernel': (16, 40),
        **{f'{side}.embedder.learned.embedding': (8, 16) for side in ('encoder', 'decoder')},
        **{f'{side}.final_norm.{leaf}': (16,) for side in ('encoder', 'decoder') for leaf in norm},
    }
    lm_extras = {k: v for k, v in extras.items() if not k.startswith('encoder')}
    base = dataclasses.replace(TINY, num_layers=1, qk_dim=2, v_dim=3)
    variant = dict(pre_ln=True, positions='learned', max_len=8)
    variant |= dict(share_embeddings=False, tie_output=False)
    for kind, switches, want in (
        (Transformer, {}, encoder | decoder | embed),
        (Transformer, variant, encoder | decoder | embed | extras),
        (LanguageModel, {}, lm | embed),
        (LanguageModel, variant, lm | embed | lm_extras),
    ):
        model = kind(dataclasses.replace(base, **switches), rngs=nnx.Rngs(0))
        state = nnx.to_flat_state(nnx.state(model, nnx.Param))
        got = {'.'.join(map(str, path)): v.get_value().shape for path, v in state}
        assert got == want, (kind.__name__, switches)


def numpy_linear(dense, x):
    return x @ np.asarray(dense.kernel[...], np.float64) + np.asarray(dense.bias[...], np.float64)


def numpy_ffn(ffn, x):
    """§3.3 in float64, or a gated FFN (Shazeer 2020): SwiGLU's SiLU, GEGLU's exact GELU."""
    h = numpy_linear(ffn.wi, x)
    if ffn.wv is None:
        return numpy_linear(ffn.wo, np.maximum(0, h))
    if ffn.kind == 'swiglu':
        gate = h / (1 + np.exp(-h))
    else:
        gate = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
    return numpy_linear(ffn.wo, gate * numpy_linear(ffn.wv, x))


def numpy_norm(norm, h):
    """LayerNorm, or RMSNorm (Zhang & Sennrich 2019: no mean taken out, no bias), float64."""
    if isinstance(norm, nnx.RMSNorm):
        h = np.asarray(h, np.float64)
        return h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
    return numpy_layer_norm(h, norm.scale[...], norm.bias[...])


def numpy_residual(x, residual, sublayer, pre_ln):
    """§3.1 in float64: Norm(x + Sublayer(x)), or x + Sublayer(Norm(x)) pre-LN."""

    def layer_norm(h):
        return numpy_norm(residual.norm, h)

    return x + sublayer(layer_norm(x)) if pre_ln else layer_norm(x + sublayer(x))


# The switches beyond 2017, alone and together (ModelConfig overrides).
VARIANTS = {
    'rmsnorm': {'norm': 'rmsnorm'},
    'swiglu': {'ffn': 'swiglu'},
    'geglu': {'ffn': 'geglu'},
    'qk_norm': {'qk_norm': True},
    'gqa': {'num_kv_heads': 2},
    'mqa': {'num_kv_heads': 1},
    'modern': {
        'norm': 'rmsnorm',
        'ffn': 'swiglu',
        'qk_norm': True,
        'num_kv_heads': 2,
        'pre_ln': True,
    },
}
WITH_VARIANTS = pytest.mark.parametrize(
    'variant', [{}, *VARIANTS.values()], ids=['paper', *VARIANTS]
)


@pytest.mark.parametrize('pre_ln', [False, True], ids=['post_ln', 'pre_ln'])
@pytest.mark.parametrize('side', ['encoder', 'decoder'])
@WITH_VARIANTS
def test_layer_matches_float64(side, pre_ln, variant):
    """One layer against float64 NumPy from its own weights. Every norm has its own
    scale and bias away from (1, 0), so a norm in the wrong place (post- for pre-LN,
    the residual stream normalized in pre-LN), a sub-layer's norm swapped for another's,
    or cross-attention keys from the wrong side all show; the inputs' mean is far from 0,
    so an RMSNorm that takes it out shows too."""
    model = transformer(num_layers=1, dropout_rate=0.0, **(variant | {'pre_ln': pre_ln}))
    layer = getattr(model, side).layers[0]
    names = ['self_attention', 'cross_attention', 'feed_forward'][:: 1 if side == 'decoder' else 2]
    for i, name in enumerate(names):
        norm = getattr(layer, f'{name}_residual').norm
        norm.scale[...] = jnp.linspace(0.5, 2.0, 16) + i
        if not isinstance(norm, nnx.RMSNorm):
            norm.bias[...] = jnp.linspace(-0.3, 0.3, 16) * (i + 1)
    rng = np.random.default_rng(0)
    x, encoded = rng.standard_normal((1, 4, 16)) + 2.0, rng.standard_normal((1, 5, 16))
    source_mask = attention.padding_mask(jnp.ones((1, 4), bool), jnp.array([[1] * 4 + [0]], bool))
    self_mask = attention.causal_mask(4)
    if side == 'encoder':
        self_mask = attention.padding_mask(jnp.ones((1, 4), bool), jnp.array([[1, 1, 1, 0]], bool))
        got = layer(jnp.asarray(x, jnp.float32), mask=self_mask)
    else:
        got, _ = layer(
            jnp.asarray(x, jnp.float32),
            self_mask=self_mask,
            encoded=jnp.asarray(encoded, jnp.float32),
            cross_mask=source_mask,
        )
    sublayers = {
        'self_attention': lambda h: numpy_mha(layer.self_attention, h, h, self_mask),
        'cross_attention': lambda h: numpy_mha(layer.cross_attention, h, encoded, source_mask),
        'feed_forward': lambda h: numpy_ffn(layer.feed_forward, h),
    }
    expected = x
    for name in names:
        residual = getattr(layer, f'{name}_residual')
        expected = numpy_residual(expected, residual, sublayers[name], pre_ln)
    # float32 round-off grows with the values (pre-LN's residual stream is not normalized)
    assert np.abs(np.asarray(got) - expected).max() < TOL * max(1.0, np.abs(expected).max())


def test_pre_ln_stacks_end_with_a_layer_norm():
    """Pre-LN leaves the residual stream unnormalized, so both stacks end in a LayerNorm:
    at its initial scale 1 and bias 0, every row of their outputs has mean 0, variance 1."""
    model = transformer(pre_ln=True, dropout_rate=0.0)
    x, y = batch()
    for out in (model.encode(x), model(x, y, project=False)):
        out = np.asarray(out, np.float64)
        np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
        np.testing.assert_allclose(out.var(-1), 1.0, atol=1e-3)


def numpy_sinusoid(positions, emb_dim):
    angles = positions[..., None] / 10000.0 ** (np.arange(0, emb_dim, 2) / emb_dim)
    return np.stack([np.sin(angles), np.cos(angles)], -1).reshape(*positions.shape, emb_dim)


@pytest.mark.parametrize(
    'overrides',
    [{}, dict(positions='learned', max_len=8, share_embeddings=False)],
    ids=['sinusoidal,shared', 'learned,separate'],
)
def test_embeddings_match_float64(overrides):
    """Each stack's input (§3.4, §3.5): its table (one shared, or the target's own with
    share_embeddings=False) x sqrt(d_model), plus the position code at the given positions,
    which restart in a packed row. Catches the decoder reading the source table, a learned
    table indexed by token or by 0..T-1, a missing scale."""
    model = transformer(dropout_rate=0.0, **overrides)
    tokens, positions = np.array([[5, 6, 7, 9, 10, 0]]), np.array([[0, 1, 2, 0, 1, 0]])
    for stack in (model.encoder, model.decoder):
        embedder = stack.embedder
        table = np.asarray(embedder.embed.embedding[...], np.float64)
        if embedder.learned is None:
            pe = numpy_sinusoid(positions, 16)
        else:
            pe = np.asarray(embedder.learned.embedding[...], np.float64)[positions]
        got = embedder(
            jnp.asarray(tokens), positions=jnp.asarray(positions), deterministic=True, rngs=None
        )
        assert np.abs(np.asarray(got) - (table[tokens] * 4.0 + pe)).max() < TOL
    shared = model.encoder.embedder.embed is model.decoder.embedder.embed
    assert shared == (not overrides)


@pytest.mark.parametrize('tied', [True, False])
def test_hidden_states_project_to_the_logits(tied):
    """project=False gives the final hidden states; `Decoder.logits` is x @ W^T with W
    the target embedding (tied, §3.4) or the decoder's own matrix."""
    model = transformer(share_embeddings=tied, tie_output=tied)
    x, y = batch()
    hidden = np.asarray(model(x, y, project=False), np.float64)
    assert hidden.shape == (1, 6, TINY.emb_dim)
    decoder = model.decoder
    assert decoder.output_matrix().dtype == jnp.float32  # the parameters themselves
    if tied:
        matrix = np.asarray(decoder.embedder.embed.embedding[...], np.float64)
    else:
        matrix = np.asarray(decoder.logits_dense.kernel[...], np.float64).T
    np.testing.assert_allclose(np.asarray(model(x, y)), hidden @ matrix.T, rtol=1e-5, atol=1e-5)


def test_parameter_sharing():
    shared = transformer()
    untied = transformer(share_embeddings=False, tie_output=False)

    def count(model):
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    table = TINY.vocab_size * TINY.emb_dim
    assert count(untied) - count(shared) == 2 * table  # target embedding + output projection


def test_bfloat16_logits_match_float32():
    """The same float32 parameters computing in bfloat16 (8 significant bits, eps 2^-8):
    through two layers the logits (|logit| < 4 here) stay within 0.08 of float32's
    (measured 0.02-0.035 over seeds 0-2); a float32 accumulation lost or a cast in the
    wrong place would not."""
    x, y = batch()
    f32, bf16 = transformer(dropout_rate=0.0), transformer(dropout_rate=0.0, dtype='bfloat16')
    for a, b in zip(
        jax.tree.leaves(nnx.state(f32, nnx.Param)),
        jax.tree.leaves(nnx.state(bf16, nnx.Param)),
        strict=True,
    ):
        assert b.dtype == jnp.float32 and np.array_equal(a, b)  # parameters stay float32
    logits = bf16(x, y)
    assert logits.dtype == jnp.bfloat16
    assert np.abs(np.asarray(logits, np.float32) - np.asarray(f32(x, y))).max() < 0.08


# -------------------------------------------------------------------- invariances


@WITH_VARIANTS
def test_padding_does_not_change_outputs(variant):
    model = transformer(**variant)
    short = model(jnp.array([SOURCE_A]), jnp.array([TARGET_A]))
    padded = model(jnp.array([pad(SOURCE_A, 9)]), jnp.array([pad(TARGET_A, 7)]))
    assert np.abs(np.asarray(padded[:, :4]) - np.asarray(short)).max() < TOL


@pytest.mark.parametrize('kind', ['transformer', 'lm'])
@WITH_VARIANTS
def test_packed_equals_one_by_one(kind, variant):
    """Packed rows restart positions per example; the language model's are learned
    (a table lookup by position, which must follow the given positions)."""
    if kind == 'transformer':
        model = transformer(**variant)
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
        cfg = dataclasses.replace(TINY, positions='learned', max_len=16, **variant)
        model = LanguageModel(cfg, rngs=nnx.Rngs(0))
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


@WITH_VARIANTS
def test_incremental_decoding_equals_full_forward(variant):
    model = transformer(dropout_rate=0.0, **variant)
    inputs = jnp.array([pad(SOURCE_A, 6), pad(SOURCE_B, 6)])
    targets = jnp.array([pad(TARGET_A, 5), TARGET_B])
    full = np.asarray(model(inputs, targets))
    decoder_inputs = shift_right(targets)
    cache, steps = model.init_cache(inputs, 5), []
    for t in range(5):
        logits, cache = model.extend(
            decoder_inputs[:, t : t + 1], positions=jnp.full((2, 1), t), cache=cache, inputs=inputs
        )
        steps.append(logits)
    incremental = np.concatenate([np.asarray(s) for s in steps], axis=1)
    assert np.abs(incremental[0, :4] - full[0, :4]).max() < TOL  # real target positions
    assert np.abs(incremental[1] - full[1]).max() < TOL


def test_decoding_caches_are_this_batchs():
    """Decoding starts from this batch's encoder output, never from a source cached for
    another batch; a decoder-only model has no source to cache."""
    model = transformer(dropout_rate=0.0)
    with pytest.raises(ValueError, match=r'attends to a source; pass encoded=\[B, S, D\]'):
        model.decoder.init_cache(2, 5)
    with pytest.raises(ValueError, match='encoded has 2 rows, not 3'):
        model.decoder.init_cache(3, 5, encoded=jnp.zeros((2, 4, 16)))
    lm = LanguageModel(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='a decoder-only model takes no `encoded`'):
        lm.decoder.init_cache(1, 5, encoded=jnp.zeros((1, 4, 16)))


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
    tokens = batching.translate(model, inputs, beam_size=1, max_extra_length=8)  # 8 + 8 = 16
    assert tokens.shape == (1, 16)
    for beam_size in (1, 2):
        with pytest.raises(ConfigError, match=r'decoding caches 17 positions.*max_extra_length'):
            batching.translate(model, inputs, beam_size=beam_size, max_extra_length=9)


# ------------------------------------------------------------------------ dropout


def test_dropout_is_random_only_when_training():
    model = transformer()
    x, y = jnp.array([SOURCE_A]), jnp.array([TARGET_A])
    np.testing.assert_array_equal(model(x, y), model(x, y))
    a = model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=0))
    b = model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=1))
    c = model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=0))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)  # same key, same masks
    with pytest.raises(ValueError, match='no `rngs` argument was provided to Dropout'):
        model(x, y, deterministic=False)


def test_attention_dropout_only_when_training():
    """Attention dropout (its 1/(1 - p) scaling: tests/test_attention.py) is the only
    dropout here: evaluation equals the model without it, training does not."""
    x, y = batch()
    plain = np.asarray(transformer(dropout_rate=0.0)(x, y))
    model = transformer(dropout_rate=0.0, attention_dropout_rate=0.3)
    np.testing.assert_array_equal(np.asarray(model(x, y)), plain)
    trained = np.asarray(model(x, y, deterministic=False, rngs=nnx.Rngs(dropout=0)))
    assert np.abs(trained - plain).max() > 1e-3


def test_fused_model_equals_reference_model():
    x, y = jnp.array([pad(SOURCE_A, 7)]), jnp.array([pad(TARGET_B, 6)])
    reference = np.asarray(transformer(qk_dim=4, v_dim=6)(x, y))
    fused = np.asarray(transformer(qk_dim=4, v_dim=6, attention='fused')(x, y))
    assert np.abs(reference[0, :5] - fused[0, :5]).max() < TOL


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_changes_memory_not_gradients(remat):
    """With dropout on, rematerialised layers give the same loss and gradients, taken as
    the train step takes them (the model merged inside `jax.grad`)."""
    x, y = batch()

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


def test_a_gated_ffn_keeps_the_parameters_of_d_ff():
    """SwiGLU and GEGLU take round(2/3 d_ff) hidden units for their two input matrices: the
    base model keeps its parameter count within 0.01%, and the FLOPs per token with it."""
    from attn import summary

    base = ModelConfig(vocab_size=37000)

    def params(cfg):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    for ffn in ('swiglu', 'geglu'):
        gated = dataclasses.replace(base, ffn=ffn)
        assert gated.ffn_dim == 1365 and base.ffn_dim == 2048
        assert params(gated) == pytest.approx(params(base), rel=1e-4)
        flops = [summary.forward_flops(c, 'transformer', 30, 30) for c in (base, gated)]
        assert flops[1] == pytest.approx(flops[0], rel=1e-3)
    with pytest.raises(ConfigError, match=r"model.ffn='glu' is not one of"):
        dataclasses.replace(base, ffn='glu')
    # The state paths checkpoints hold: a value matrix beside wi; RMSNorm has no bias.
    model = transformer(num_layers=1, ffn='geglu', norm='rmsnorm')
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    got = {'.'.join(map(str, path)): v.get_value().shape for path, v in state}
    ffn = 'encoder.layers.0.feed_forward'
    assert got[f'{ffn}.wi.kernel'] == got[f'{ffn}.wv.kernel'] == (16, 21)  # round(2/3 32)
    assert got[f'{ffn}.wo.kernel'] == (21, 16)
    norms = [k for k in got if '_residual.norm' in k]
    assert norms and all(k.endswith('.scale') for k in norms)


def test_grouped_query_attention_shrinks_the_caches_and_is_validated():
    """num_kv_heads G: W^K and W^V and every cache hold G heads (the point of GQA and MQA is
    decode memory); a G that does not divide the heads is refused naming the ones that do."""
    for G in (4, 2, 1):
        model = transformer(num_kv_heads=G)
        mha = model.decoder.layers[0].self_attention
        assert mha.key.shape == (16, G, 4) and mha.value.shape == (16, G, 4)
        cache = model.init_cache(jnp.array([pad(SOURCE_A, 6)]), 5, width=4)
        assert cache[0]['self'].keys.shape == (1, G, 4, 20)  # [B, G, K, L x width]
        assert cache[0]['source'].values.shape == (1, G, 6, 4)  # [B, G, S, H]
    with pytest.raises(ConfigError, match=r'model.num_kv_heads=3 must divide .* \[1, 2, 4\]'):
        dataclasses.replace(TINY, num_kv_heads=3)


def test_a_language_model_without_positions_caches_packs_and_refuses_an_encoder():
    """positions='none' (no positional encoding): a language model's cached steps equal its
    full forward pass and packed rows equal rows alone; the causal mask still orders the
    tokens (swapping the first two changes a later position's logits, with 2 layers); a
    Transformer's encoder would have no order at all, so it is refused in one line."""
    cfg = dataclasses.replace(TINY, positions='none', dropout_rate=0.0)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array([[5, 6, 7, 8, 9]])
    full = np.asarray(model(tokens))
    decoder_inputs, cache, steps = shift_right(tokens), model.init_cache(1, 5), []
    for t in range(5):
        logits, cache = model.extend(
            decoder_inputs[:, t : t + 1], positions=jnp.full((1, 1), t), cache=cache
        )
        steps.append(np.asarray(logits))
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < TOL
    alone = [np.asarray(model(jnp.array([t]))) for t in (TARGET_A, TARGET_B)]
    packed = np.asarray(
        model(
            jnp.array([pad(TARGET_A + TARGET_B, 11)]),
            jnp.array([pad([1] * 4 + [2] * 5, 11)]),
            jnp.array([pad(list(range(4)) + list(range(5)), 11)]),
        )
    )
    assert np.abs(packed[0, :4] - alone[0][0]).max() < TOL
    assert np.abs(packed[0, 4:9] - alone[1][0]).max() < TOL
    swapped = np.asarray(model(jnp.array([[6, 5, 7, 8, 9]])))
    assert np.abs(swapped[0, 4] - full[0, 4]).max() > 1e-4
    with pytest.raises(ConfigError, match='model_kind="lm"'):
        Transformer(cfg, rngs=nnx.Rngs(0))
    from attn import configs
    from tests import toy

    with pytest.raises(ConfigError, match='model_kind="lm"'):  # before anything is built
        configs.validate(toy.config(**{'model.positions': 'none'}), devices=1)
