"""Decoding: cached steps == full forward, greedy/beam/sampling against independent references.

The references are the full (uncached) forward pass and, for beam search, exhaustive
enumeration of every output up to a short length limit.
"""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn import decoding
from attn.configs import ModelConfig
from attn.decoding import beam, greedy
from attn.inference import batching
from attn.model import LanguageModel, Transformer, shift_right
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID

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
LIMITS = np.array([6, 2, 4]) + 5  # source length + max_extra_length=5
TARGETS = np.array([[4, 5, 6, 3] + [0] * 8, [7, 3] + [0] * 10, [9, 8, 7, 6, 5, 4] * 2], np.int32)
PROMPTS = np.array([[5, 6, 7, 8], [9, 0, 0, 0], [4, 5, 0, 0]], np.int32)
PROMPT_LENGTHS = np.array([4, 1, 2])


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


@nnx.jit
def forward(model, *args):
    """The full (uncached, teacher-forced) forward pass, jitted to keep the tests quick."""
    return model(*args)


def full_logits(model, inputs, tokens):
    """Logits [B, T, V] (float64) predicting `tokens` [B, T]; PAD and BOS at -inf, as they
    are never decoded."""
    args = (tokens,) if inputs is None else (inputs, tokens)
    logits = np.array(forward(model, *map(jnp.asarray, args)), np.float64)
    logits[..., [PAD_ID, BOS_ID]] = -np.inf
    return logits


def full_logprobs(model, inputs, tokens):
    """log p(token_t | tokens_<t, inputs) [B, T] by the full forward pass (0 at PAD)."""
    args = (tokens,) if inputs is None else (inputs, tokens)
    logits = np.array(forward(model, *map(jnp.asarray, args)), np.float64)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    return np.where(tokens != PAD_ID, picked, 0.0)


def lengths(tokens):
    """Output lengths [...] (tokens before the PAD padding)."""
    return (np.asarray(tokens) != PAD_ID).sum(axis=-1)


def lp(length, alpha=0.6):
    return ((5.0 + length) / 6.0) ** alpha


def check_well_formed(tokens, limits):
    """No PAD/BOS inside, EOS only at the end, PAD after; ends with EOS or at the limit."""
    tokens = np.asarray(tokens)
    for row, limit in zip(tokens.reshape(-1, tokens.shape[-1]), limits, strict=True):
        n = int((row != PAD_ID).sum())
        assert np.all(row[n:] == PAD_ID) and np.all(row[:n] != BOS_ID)
        assert 1 <= n <= limit and EOS_ID not in row[: n - 1]
        assert row[n - 1] == EOS_ID or n == limit


# ------------------------------------------------------------------------ basic pieces


def test_length_penalty_by_hand():
    assert float(decoding.length_penalty(1, 0.6)) == pytest.approx(1.0)
    assert float(decoding.length_penalty(7, 0.5)) == pytest.approx(np.sqrt(2.0))
    assert float(decoding.length_penalty(10, 0.0)) == pytest.approx(1.0)


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))

    def kept(top_k, top_p):
        return np.isfinite(np.asarray(decoding.filter_logits(logits, top_k, top_p)))[0]

    np.testing.assert_array_equal(kept(0, 1.0), [1, 1, 1, 1])
    np.testing.assert_array_equal(kept(2, 1.0), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(0, 0.5), [1, 0, 0, 0])  # 0.5 already reaches p
    np.testing.assert_array_equal(kept(0, 0.7), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(0, 0.82), [1, 1, 1, 0])  # 0.5 + 0.3 < 0.82
    np.testing.assert_array_equal(kept(3, 0.82), [1, 1, 0, 0])  # renormalized: 0.53 + 0.32
    np.testing.assert_array_equal(kept(0, 1e-6), [1, 0, 0, 0])


@pytest.mark.parametrize('top_k, top_p', [(0, 0.9), (5, 1.0), (5, 0.5), (1, 1.0), (0, 0.3)])
def test_filter_logits_matches_sorting(top_k, top_p):
    """The bisection thresholds against the textbook sort/cumsum in float64."""
    logits = np.random.default_rng(top_k).standard_normal((4, 50)) * 2
    got = np.isfinite(
        np.asarray(decoding.filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p))
    )
    order = np.argsort(-logits, axis=-1)
    ranked = np.take_along_axis(logits, order, -1)
    ranked[:, top_k or 50 :] = -np.inf
    probs = np.exp(ranked - ranked[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    keep_ranked = np.isfinite(ranked) & ((np.cumsum(probs, -1) - probs < top_p) | (top_p >= 1))
    want = np.zeros_like(got)
    np.put_along_axis(want, order, keep_ranked, -1)
    np.testing.assert_array_equal(got, want)


def test_early_stop_criterion_by_hand():
    """Done once the worst of the K finished (or, when only the best is returned, the best)
    beats the best live hypothesis' best case: its log-prob over the largest length penalty
    it can still get (at the limit)."""

    def done(live, finished, t=2, limit=10, needed=None):
        beams = beam.Beams(
            t=jnp.array(t),
            live_seqs=None,
            live_logprobs=jnp.array([live]),
            last=None,
            cache=None,
            slots=None,
            finished_seqs=None,
            finished_scores=jnp.array([finished]),
            finished_logprobs=None,
        )
        return bool(beam.beams_done(beams, jnp.array([limit]), 0.6, needed)[0])

    bound = -3.0 / lp(10)  # -1.73: lp(10) > lp(3), longer outputs are penalized less
    assert not done([-3.0, -5.0], [-1.0, bound - 0.01])
    assert done([-3.0, -5.0], [-1.0, bound + 0.01])
    assert not done([-3.0, -5.0], [-1.0, -np.inf])  # fewer than K finished: go on
    assert done([-np.inf, -np.inf], [-1.0, -np.inf])  # nothing live (past the limit)
    # Only the best is returned: it is final once no live hypothesis can beat it.
    assert done([-3.0, -5.0], [-1.0, -np.inf], needed=1)
    assert not done([-3.0, -5.0], [bound - 0.01, -np.inf], needed=1)


# ---------------------------------------------------------------- cached == uncached


def test_cached_steps_equal_full_forward(model, lm):
    real = TARGETS[:, :11] != PAD_ID
    full = np.asarray(forward(model, jnp.asarray(INPUTS), jnp.asarray(TARGETS[:, :11])))
    cached = np.asarray(decoding.forced_decode(model, INPUTS, shift_right(TARGETS[:, :11])))
    assert np.abs(cached - full)[real].max() < TOL  # every step of every sentence
    full_lm = np.asarray(forward(lm, jnp.asarray(TARGETS)))
    cached_lm = np.asarray(decoding.forced_decode(lm, None, shift_right(TARGETS)))
    assert np.abs(cached_lm - full_lm)[TARGETS != PAD_ID].max() < TOL


# ------------------------------------------------------------------------------ greedy


def test_greedy_is_argmax_of_full_forward_on_its_output(model):
    tokens = np.asarray(decoding.greedy_search(model, INPUTS, max_extra_length=5))
    assert tokens.shape == (3, 11)
    check_well_formed(tokens, LIMITS)
    assert EOS_ID in tokens and np.any(lengths(tokens) == LIMITS)  # both kinds of ending
    assert len({tuple(row) for row in tokens}) == 3 and len(set(tokens[0])) > 2
    logits = full_logits(model, INPUTS, tokens)
    for row, n in enumerate(lengths(tokens)):
        np.testing.assert_array_equal(logits[row, :n].argmax(-1), tokens[row, :n])


@pytest.mark.parametrize('search', ['greedy', 'beam'])
def test_per_sentence_length_limit_and_min_length(model, search):
    """EOS suppressed (min_length): each sentence runs to its own len + max_extra_length."""
    if search == 'greedy':
        tokens = decoding.greedy_search(model, INPUTS, max_extra_length=5, min_length=100)
    else:
        tokens, _ = decoding.beam_search(model, INPUTS, max_extra_length=5, min_length=100)
    np.testing.assert_array_equal(lengths(tokens), LIMITS)  # 11, 7, 9
    assert EOS_ID not in np.asarray(tokens)


def test_repeated_calls_do_not_recompile(model):
    decoding.greedy_search(model, INPUTS, max_extra_length=5)
    before = greedy._greedy._cache_size()
    decoding.greedy_search(model, INPUTS[::-1].copy(), max_extra_length=5, min_length=3)
    decoding.greedy_search(tiny(seed=5), INPUTS, max_extra_length=5)  # same graph, new weights
    assert greedy._greedy._cache_size() == before


def test_bfloat16_decoding_agrees_with_float32(model):
    """The same (float32) parameters computing in bfloat16: on this toy model greedy and
    beam search produce the same tokens as float32, and the beam scores differ by less
    than 0.02 (measured 0.008; bfloat16's eps is 2^-8)."""
    bf16 = tiny(dtype='bfloat16')
    np.testing.assert_array_equal(
        decoding.greedy_search(bf16, INPUTS, max_extra_length=5),
        decoding.greedy_search(model, INPUTS, max_extra_length=5),
    )
    tokens, scores = decoding.beam_search(bf16, INPUTS, max_extra_length=5)
    want_tokens, want_scores = decoding.beam_search(model, INPUTS, max_extra_length=5)
    np.testing.assert_array_equal(tokens, want_tokens)
    assert scores.dtype == jnp.float32
    assert np.abs(np.asarray(scores) - np.asarray(want_scores)).max() < 0.02


# ------------------------------------------------------------------------- beam search


def exhaustive_top(model, source, limit, width, k, alpha=0.6):
    """The k best (scores, ids [k, width]) among every output the search can produce:
    decodable non-EOS ids, then EOS or the length limit; scored by the full forward pass."""
    others = [t for t in range(model.config.vocab_size) if t not in (PAD_ID, BOS_ID, EOS_ID)]
    prefixes = [list(p) for n in range(limit + 1) for p in itertools.product(others, repeat=n)]
    with_eos = [p + [EOS_ID] for p in prefixes if len(p) < limit]
    outputs = with_eos + [p for p in prefixes if len(p) == limit]  # stopped by the limit
    tokens = np.array([o + [PAD_ID] * (width - len(o)) for o in outputs], np.int32)
    inputs = np.repeat(source[None], len(tokens), axis=0)
    scores = full_logprobs(model, inputs, tokens).sum(-1) / lp(lengths(tokens), alpha)
    order = np.argsort(-scores)[:k]
    return scores[order], tokens[order]


@pytest.mark.parametrize(
    'variant',
    [{}, {'norm': 'rmsnorm', 'ffn': 'swiglu', 'qk_norm': True, 'num_kv_heads': 1, 'pre_ln': True}],
    ids=['paper', 'modern'],
)
def test_beam_search_equals_exhaustive_enumeration(variant):
    """Vocab 6 (4 decodable ids: 3 + EOS) and length limits 4 and 3: 3^3 = 27 beams hold every
    live prefix, so the search is exact and its 27 finished hypotheses are the true top 27;
    with the paper's model and with the switches beyond it (RMSNorm, SwiGLU, QK-norm,
    multi-query attention, pre-LN)."""
    model = tiny(vocab_size=6, seed=6, **variant)
    inputs = np.array([[4, 5, 3], [5, 3, 0]], np.int32)  # limits 3 + 1 and 2 + 1
    tokens, scores, _ = decoding.beam_search(
        model, inputs, beam_size=27, max_extra_length=1, return_all=True
    )
    for row, limit in enumerate([4, 3]):
        want_scores, want_tokens = exhaustive_top(model, inputs[row], limit, 4, 27)
        np.testing.assert_allclose(np.asarray(scores[row]), want_scores, atol=TOL)
        np.testing.assert_array_equal(np.asarray(tokens[row, 0]), want_tokens[0])
    if not variant:  # this model's best for row 1 runs to the limit
        assert lengths(tokens[1, 0]) == 3 and EOS_ID not in np.asarray(tokens[1, 0])


def test_beam_scores_are_full_forward_logprobs_over_length_penalty(model):
    tokens, scores, logprobs = decoding.beam_search(
        model, INPUTS, max_extra_length=5, return_all=True
    )
    tokens, scores = np.asarray(tokens), np.asarray(scores)  # [B, K, L], [B, K]
    assert np.isfinite(scores).all() and np.all(np.diff(scores, axis=1) <= 0)  # best first
    check_well_formed(tokens, np.repeat(LIMITS, 4))
    assert all(len({tuple(row) for row in beams}) == 4 for beams in tokens)  # distinct
    assert len(set(lengths(tokens).ravel())) > 2  # ended at several lengths
    for k in range(4):
        logprob = full_logprobs(model, INPUTS, tokens[:, k]).sum(-1)
        np.testing.assert_allclose(np.asarray(logprobs)[:, k], logprob, atol=1e-4)
        np.testing.assert_allclose(scores[:, k], logprob / lp(lengths(tokens[:, k])), atol=1e-4)


def test_length_penalty_favours_longer_outputs(model):
    short, _ = decoding.beam_search(model, INPUTS, alpha=0.0, max_extra_length=5)
    long, _ = decoding.beam_search(model, INPUTS, alpha=2.0, max_extra_length=5)
    assert lengths(long).sum() > lengths(short).sum()


# ---------------------------------------------------------------------------- sampling


def lm_sample(lm, **settings):
    return np.asarray(decoding.sample(lm, PROMPTS, PROMPT_LENGTHS, max_length=12, **settings))


def test_greedy_sampling_is_argmax_of_full_forward_and_keeps_prompts(lm):
    tokens = lm_sample(lm, temperature=0.0)
    check_well_formed(tokens, [12] * 3)
    logits = full_logits(lm, None, tokens)
    for row, (n, p) in enumerate(zip(lengths(tokens), PROMPT_LENGTHS, strict=True)):
        np.testing.assert_array_equal(tokens[row, :p], PROMPTS[row, :p])
        np.testing.assert_array_equal(logits[row, p:n].argmax(-1), tokens[row, p:n])
    for row, p in enumerate(PROMPT_LENGTHS):  # the same alone as beside other prompt lengths
        alone = decoding.sample(lm, PROMPTS[row : row + 1], [p], max_length=12, temperature=0)
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
    assert all(not np.array_equal(a, lm_sample(lm, seed=s)) for s in (1, 2))


def test_top_k_samples_only_the_k_best(lm):
    tokens = lm_sample(lm, top_k=2, temperature=5.0, seed=0)  # hot: the rest would show up
    logits = full_logits(lm, None, tokens)
    second = np.sort(logits, axis=-1)[..., -2]
    for row, (n, p) in enumerate(zip(lengths(tokens), PROMPT_LENGTHS, strict=True)):
        picked = np.take_along_axis(logits[row, p:n], tokens[row, p:n, None], -1)[:, 0]
        assert np.all(picked >= second[row, p:n] - TOL)


@pytest.mark.parametrize('beam_size', [1, 3])
def test_translate_pads_batches_without_changing_results(model, beam_size):
    """batching.translate buckets shapes (3 x 6 -> 4 x 8); the sentences come out the same."""
    if beam_size == 1:
        direct = np.asarray(decoding.greedy_search(model, INPUTS, max_extra_length=5))
    else:
        direct, _ = decoding.beam_search(model, INPUTS, beam_size=3, max_extra_length=5)
        direct = np.asarray(direct)
    padded = batching.translate(model, INPUTS, beam_size=beam_size, max_extra_length=5)
    assert padded.shape[0] == 3
    width = max(direct.shape[1], padded.shape[1])

    def widen(x):
        return np.pad(x, ((0, 0), (0, width - x.shape[1])))

    np.testing.assert_array_equal(widen(padded), widen(direct))


def test_translate_nbest_lists_the_beam_best_first_with_the_one_best_first(model):
    """--nbest=K: the first of the K is translate's 1-best output (the same padding), the
    scores fall, and a list longer than the beam is refused."""
    best = batching.translate(model, INPUTS, beam_size=4, max_extra_length=5)
    nbest = batching.translate(model, INPUTS, beam_size=4, max_extra_length=5, nbest=3)
    assert nbest.tokens.shape[:2] == (3, 3) and nbest.logprobs.shape == (3, 3)
    np.testing.assert_array_equal(nbest.tokens[:, 0], best)
    assert np.all(np.diff(nbest.scores, axis=1) <= 0) and np.isfinite(nbest.scores).all()
    assert all(len({tuple(row) for row in beams}) == 3 for beams in nbest.tokens)
    for bad in ({'beam_size': 4, 'nbest': 5}, {'beam_size': 1, 'nbest': 1}):
        with pytest.raises(batching.SearchError, match='--beam_size >='):
            batching.translate(model, INPUTS, max_extra_length=5, **bad)
