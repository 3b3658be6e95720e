"""Decoding: cached steps == full forward, greedy/beam/sampling against independent references.

The references are the full (uncached) forward pass and, for beam search, exhaustive
enumeration of every output up to a short length limit.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn import decode
from attn.model import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    LanguageModel,
    ModelConfig,
    Transformer,
    shift_right,
)

# Untied output and strong learned positions: a random tiny model whose outputs change
# token to token and sometimes end in EOS (tied ones mostly repeat their input token).
TINY = ModelConfig(
    vocab_size=10,
    num_layers=2,
    emb_dim=16,
    num_heads=2,
    mlp_dim=32,
    dropout_rate=0.0,
    positions='learned',
    max_len=32,
    tie_output=False,
)
TOL = 1e-5

INPUTS = np.array([[5, 6, 7, 8, 9, 3], [8, 3, 0, 0, 0, 0], [4, 9, 5, 3, 0, 0]], np.int32)


def tiny(kind=Transformer, seed=1, **overrides):
    model = kind(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(seed))
    model.decoder.embedder.learned.embedding[...] *= 3.0
    return model


@pytest.fixture(scope='module')
def model():
    return tiny()


@pytest.fixture(scope='module')
def lm():
    return tiny(LanguageModel, seed=2)


def lengths(tokens):
    """Output lengths [B] (tokens before the PAD padding)."""
    return (np.asarray(tokens) != PAD_ID).sum(axis=-1)


def full_logprobs(model, inputs, tokens):
    """log p(token_t | tokens_<t, inputs) [B, T] by the full forward pass (0 at PAD)."""
    tokens = jnp.asarray(tokens)
    logits = model(jnp.asarray(inputs), tokens) if inputs is not None else model(tokens)
    logprobs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
    picked = np.take_along_axis(logprobs, np.asarray(tokens)[..., None], axis=-1)[..., 0]
    return np.where(np.asarray(tokens) != PAD_ID, picked, 0.0)


def lp(length, alpha=0.6):
    return ((5.0 + length) / 6.0) ** alpha


def check_well_formed(tokens, limits):
    """No PAD/BOS inside, at most one EOS and only at the end, within the length limit."""
    for row, limit in zip(np.asarray(tokens).reshape(-1, tokens.shape[-1]), limits, strict=True):
        n = int((row != PAD_ID).sum())
        assert np.all(row[n:] == PAD_ID) and np.all(row[:n] != BOS_ID)
        assert 1 <= n <= limit and EOS_ID not in row[: n - 1]
        assert row[n - 1] == EOS_ID or n == limit  # ends with EOS or at the limit


# ------------------------------------------------------------------------ basic pieces


def test_length_penalty_by_hand():
    assert float(decode.length_penalty(1, 0.6)) == pytest.approx(1.0)
    assert float(decode.length_penalty(7, 0.5)) == pytest.approx(np.sqrt(2.0))
    assert float(decode.length_penalty(10, 0.0)) == pytest.approx(1.0)


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda k, p: np.isfinite(np.asarray(decode.filter_logits(logits, k, p)))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(0, 1.0), [1, 1, 1, 1])
    np.testing.assert_array_equal(kept(2, 1.0), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(0, 0.5), [1, 0, 0, 0])  # 0.5 already reaches p
    np.testing.assert_array_equal(kept(0, 0.7), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(0, 0.82), [1, 1, 1, 0])  # 0.5 + 0.3 < 0.82
    np.testing.assert_array_equal(kept(3, 0.82), [1, 1, 0, 0])  # renormalized: 0.53 + 0.32
    np.testing.assert_array_equal(kept(0, 1e-6), [1, 0, 0, 0])


# ---------------------------------------------------------------- cached == uncached


def test_cached_steps_equal_full_forward(model, lm):
    targets = jnp.array([[4, 5, 6, 3, 0], [7, 3, 0, 0, 0], [9, 8, 7, 6, 5]])
    full = np.asarray(model(jnp.asarray(INPUTS), targets))
    cached = np.asarray(decode.forced_decode(model, INPUTS, shift_right(targets)))
    real = np.asarray(targets) != PAD_ID
    assert np.abs(cached - full)[real].max() < TOL  # every step of every sentence
    full_lm = np.asarray(lm(targets))
    cached_lm = np.asarray(decode.forced_decode(lm, None, shift_right(targets)))
    assert np.abs(cached_lm - full_lm)[real].max() < TOL


# ------------------------------------------------------------------------------ greedy


def test_greedy_is_argmax_of_full_forward_on_its_output(model):
    tokens = np.asarray(decode.greedy_search(model, INPUTS, max_extra_length=5))
    limits = lengths(INPUTS) + 5
    assert tokens.shape == (3, 11)
    check_well_formed(tokens, limits)
    assert len({tuple(row) for row in tokens}) == 3 and len(set(tokens[0])) > 2  # not degenerate
    logits = np.asarray(model(jnp.asarray(INPUTS), jnp.asarray(tokens)))
    logits[..., [PAD_ID, BOS_ID]] = -np.inf  # never decoded
    for row, n in enumerate(lengths(tokens)):
        np.testing.assert_array_equal(logits[row, :n].argmax(-1), tokens[row, :n])


@pytest.mark.parametrize('search', ['greedy', 'beam'])
def test_per_sentence_length_limit_and_min_length(model, search):
    """EOS suppressed (min_length): each sentence runs to its own len + max_extra_length."""
    if search == 'greedy':
        tokens = decode.greedy_search(model, INPUTS, max_extra_length=3, min_length=100)
    else:
        tokens, _ = decode.beam_search(model, INPUTS, max_extra_length=3, min_length=100)
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(lengths(tokens), lengths(INPUTS) + 3)  # 9, 5, 7
    assert tokens.shape == (3, 9) and EOS_ID not in tokens


def test_repeated_calls_do_not_recompile(model):
    decode.greedy_search(model, INPUTS, max_extra_length=5)
    before = decode._greedy._cache_size()
    decode.greedy_search(model, INPUTS[::-1].copy(), max_extra_length=5)
    decode.greedy_search(tiny(seed=5), INPUTS, max_extra_length=5)  # same graph, new weights
    assert decode._greedy._cache_size() == before


# ------------------------------------------------------------------------- beam search


def exhaustive_best(model, source, limit, alpha, k):
    """Scores (best first) and ids of the k best outputs over every output the search can
    produce: allowed non-EOS tokens, then EOS or the length limit; scored by the full pass."""
    vocab = model.config.vocab_size
    others = [t for t in range(vocab) if t not in (PAD_ID, BOS_ID, EOS_ID)]
    outputs = [list(p) + [EOS_ID] for n in range(limit) for p in itertools.product(others, repeat=n)]
    outputs += [list(p) for p in itertools.product(others, repeat=limit)]
    tokens = np.array([o + [PAD_ID] * (limit - len(o)) for o in outputs], np.int32)
    inputs = np.repeat(source[None], len(tokens), axis=0)
    scores = full_logprobs(model, inputs, tokens).sum(-1) / lp(lengths(tokens), alpha)
    order = np.argsort(-scores)[:k]
    return scores[order], tokens[order]


def test_beam_search_equals_exhaustive_enumeration():
    """With vocab 6 (4 decodable ids) and length limits 4 and 3, 3^3 = 27 beams hold every
    live prefix, so the search is exact: its K finished hypotheses are the true top K."""
    model = tiny(vocab_size=6, seed=3)
    inputs = np.array([[4, 5, 3], [5, 3, 0]], np.int32)  # limits 3 + 1 and 2 + 1
    k = 27
    tokens, scores = decode.beam_search(
        model, inputs, beam_size=k, max_extra_length=1, return_all=True
    )
    for row, limit in enumerate([4, 3]):
        want_scores, want_tokens = exhaustive_best(model, inputs[row], limit, 0.6, k)
        np.testing.assert_allclose(np.asarray(scores[row]), want_scores, atol=TOL)
        np.testing.assert_array_equal(np.asarray(tokens[row, 0, :limit]), want_tokens[0])
    best, best_scores = decode.beam_search(model, inputs, max_extra_length=1)  # beam 4
    assert np.all(np.asarray(best_scores) <= np.asarray(scores[:, 0]) + TOL)


def test_beam_scores_are_full_forward_logprobs_over_length_penalty(model):
    tokens, scores = decode.beam_search(model, INPUTS, max_extra_length=5, return_all=True)
    tokens, scores = np.asarray(tokens), np.asarray(scores)  # [B, K, L], [B, K]
    assert np.isfinite(scores).all() and np.all(np.diff(scores, axis=1) <= 0)  # best first
    check_well_formed(tokens, np.repeat(lengths(INPUTS) + 5, 4))
    inputs = np.repeat(INPUTS, 4, axis=0)
    flat = tokens.reshape(12, -1)
    want = full_logprobs(model, inputs, flat).sum(-1) / lp(lengths(flat))
    np.testing.assert_allclose(scores.reshape(-1), want, atol=1e-4)
    assert len({tuple(row) for row in flat}) == 12  # distinct hypotheses


def test_beam_size_one_without_length_penalty_is_greedy(model):
    greedy = decode.greedy_search(model, INPUTS, max_extra_length=5)
    beam, _ = decode.beam_search(model, INPUTS, beam_size=1, alpha=0.0, max_extra_length=5)
    np.testing.assert_array_equal(beam, greedy)


def test_length_penalty_favours_longer_outputs(model):
    short, _ = decode.beam_search(model, INPUTS, alpha=0.0, max_extra_length=5)
    long, _ = decode.beam_search(model, INPUTS, alpha=2.0, max_extra_length=5)
    assert lengths(long).sum() >= lengths(short).sum()


# ---------------------------------------------------------------------------- sampling

PROMPTS = np.array([[5, 6, 7, 8], [9, 0, 0, 0], [4, 5, 0, 0]], np.int32)
PROMPT_LENGTHS = np.array([4, 1, 2])


def lm_sample(lm, **settings):
    return np.asarray(decode.sample(lm, PROMPTS, PROMPT_LENGTHS, max_length=12, **settings))


def test_greedy_sampling_is_argmax_of_full_forward_and_keeps_prompts(lm):
    tokens = lm_sample(lm, temperature=0.0)
    check_well_formed(tokens, [12] * 3)
    logits = np.asarray(lm(jnp.asarray(tokens)))
    logits[..., [PAD_ID, BOS_ID]] = -np.inf
    for row, (n, p) in enumerate(zip(lengths(tokens), PROMPT_LENGTHS, strict=True)):
        np.testing.assert_array_equal(tokens[row, :p], PROMPTS[row, :p])
        np.testing.assert_array_equal(logits[row, p:n].argmax(-1), tokens[row, p:n])
    for row in range(3):  # a prompt decodes the same alone as beside longer/shorter ones
        p = PROMPT_LENGTHS[row]
        alone = decode.sample(lm, PROMPTS[row : row + 1, :p], [p], max_length=12, temperature=0)
        np.testing.assert_array_equal(np.asarray(alone)[0], tokens[row])


def test_top_k_one_and_tiny_top_p_are_greedy(lm):
    greedy = lm_sample(lm, temperature=0.0)
    np.testing.assert_array_equal(lm_sample(lm, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(lm_sample(lm, top_p=1e-6, temperature=2.0, seed=4), greedy)


def test_sampling_is_reproducible_and_seeded(lm):
    a, b = lm_sample(lm, seed=0), lm_sample(lm, seed=0)
    np.testing.assert_array_equal(a, b)
    check_well_formed(a, [12] * 3)
    np.testing.assert_array_equal(a[:, :1], PROMPTS[:, :1])
    others = [lm_sample(lm, seed=s) for s in (1, 2)]
    assert any(not np.array_equal(a, c) for c in others)
    top_k = lm_sample(lm, top_k=2, seed=0)
    logits = np.asarray(lm(jnp.asarray(top_k)))
    logits[..., [PAD_ID, BOS_ID]] = -np.inf
    second = np.sort(logits, axis=-1)[..., -2]
    for row, (n, p) in enumerate(zip(lengths(top_k), PROMPT_LENGTHS, strict=True)):
        picked = np.take_along_axis(logits[row, p:n], top_k[row, p:n, None], -1)[:, 0]
        assert np.all(picked >= second[row, p:n])  # only the 2 best tokens are sampled
