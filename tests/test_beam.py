"""The beam search against a plain reference search written here: a log-softmax and
`lax.top_k` over beam x vocabulary, every layer's cache gathered by parent, one cache of the
whole length, no early stop. Each fast part of `attn.decoding.beam` is checked on its own:
the blocked top-k (`candidates`) exactly, at vocabularies of one block and of many; the slot
table (`slot_mask`, `follow_parents`) against caches reordered by gather; and the phases
and the early stop through the whole search.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn import decoding
from attn.decoding import beam, common
from attn.model import attention, layers
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID
from tests import test_decode

NEG_INF = float('-inf')


# -------------------------------------------------------------- the reference search


def reference_candidates(live_logprobs, logits, log_norm):
    """The 2K best extensions: log-softmax over each hypothesis' vocabulary, plus its
    log-prob, then `lax.top_k` over all K x V. ([B, 2K] log-probs, parents, tokens)."""
    B, K, V = logits.shape
    totals = (logits - log_norm[..., None]) + live_logprobs[..., None]  # [B, K, V]
    top, flat = jax.lax.top_k(totals.reshape(B, K * V), min(2 * K, K * V))
    return top, flat // V, flat % V


@jax.jit
def _reference_step(graphdef, state, cache, tokens, t, inputs):
    """One step of B * K rows, each with its own (gathered) cache and its own source copy."""
    model = nnx.merge(graphdef, state)
    positions = jnp.full(tokens.shape, t, jnp.int32)
    logits, cache = model.extend(tokens, positions=positions, cache=cache, inputs=inputs)
    return logits[:, 0].astype(jnp.float32), cache


def reference_beam_search(model, inputs, *, beam_size, alpha=0.6, max_extra_length, min_length=0):
    """Plain beam search: the same hypotheses and ranking as `decoding.beam_search`, written
    the obvious way. Returns `Hypotheses` as NumPy arrays."""
    inputs = np.asarray(inputs, np.int32)
    B, S = inputs.shape
    K, L = beam_size, S + max_extra_length
    limits = (inputs != PAD_ID).sum(1) + max_extra_length  # [B]
    rows_inputs = jnp.asarray(np.repeat(inputs, K, axis=0))  # [B * K, S]: the source per row
    graphdef, state = nnx.split(model)
    cache = model.init_cache(rows_inputs, L)  # every row its own cache of L positions
    live_seqs = np.full((B, K, L), PAD_ID, np.int32)
    live = np.where(np.arange(K) == 0, 0.0, NEG_INF)[None].repeat(B, 0).astype(np.float32)
    last = np.full((B, K), BOS_ID, np.int32)
    finished = [np.full((B, K, L), PAD_ID, np.int32), np.full((B, K), NEG_INF, np.float32)]
    finished.append(np.full((B, K), NEG_INF, np.float32))
    for t in range(L):  # no early stop: run to the longest limit
        logits, cache = _reference_step(
            graphdef, state, cache, jnp.asarray(last.reshape(B * K, 1)), t, rows_inputs
        )
        log_norm = jax.nn.logsumexp(logits, axis=-1).reshape(B, K)
        logits = common.mask_tokens(logits, t < min_length).reshape(B, K, -1)
        top, parents, tokens = map(
            np.asarray, reference_candidates(jnp.asarray(live), logits, log_norm)
        )
        seqs = np.take_along_axis(live_seqs, parents[..., None], axis=1)
        seqs[:, :, t] = tokens
        ended = (tokens == EOS_ID) | (t + 1 >= limits[:, None])
        live, keep = map(np.asarray, jax.lax.top_k(jnp.where(ended, NEG_INF, top), K))
        rows = (np.arange(B)[:, None] * K + np.take_along_axis(parents, keep, 1)).reshape(-1)
        cache = [  # reorder every layer's cache by parent (the index is shared)
            {
                **c,
                'self': c['self']._replace(
                    keys=c['self'].keys[rows], values=c['self'].values[rows]
                ),
            }
            for c in cache
        ]
        live_seqs = np.take_along_axis(seqs, keep[..., None], axis=1)
        last = np.take_along_axis(tokens, keep, axis=1)
        lp = ((5.0 + t + 1) / 6.0) ** alpha
        scores = np.where(ended, top / np.float32(lp), NEG_INF)
        all_scores = np.concatenate([finished[1], scores], 1)
        all_seqs = np.concatenate([finished[0], seqs], 1)
        all_logprobs = np.concatenate([finished[2], np.where(ended, top, NEG_INF)], 1)
        best_scores, best = map(np.asarray, jax.lax.top_k(jnp.asarray(all_scores), K))
        finished = [
            np.take_along_axis(all_seqs, best[..., None], 1),
            best_scores,
            np.take_along_axis(all_logprobs, best, 1),
        ]
    return decoding.Hypotheses(*finished)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize('K', [1, 2, 4, 8])
@pytest.mark.parametrize('V', [37, 128, 129, 8000, 32000])
def test_blocked_candidates_equal_top_k_over_beam_x_vocabulary(V, K):
    """Exactly the same log-probs, parents and tokens, ties included (logits rounded to a
    coarse grid so that some tie), with dead hypotheses and masked tokens."""
    rng = np.random.default_rng(V * 10 + K)
    B = 3
    logits = np.round(rng.standard_normal((B, K, V)) * 4, 1).astype(np.float32)
    logits[:, :, [PAD_ID, BOS_ID]] = NEG_INF
    live = np.round(rng.standard_normal((B, K)) * 3, 1).astype(np.float32)
    live[0, 1:] = NEG_INF  # a first step: one live hypothesis
    logits, live = jnp.asarray(logits), jnp.asarray(live)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    got = jax.jit(beam.candidates)(live, logits, log_norm)
    want = jax.jit(reference_candidates)(live, logits, log_norm)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize(
    'V, K, alpha, min_length', [(37, 1, 0.6, 0), (37, 4, 0.6, 0), (129, 8, 0.0, 12)]
)
def test_beam_search_equals_the_reference_search(V, K, alpha, min_length):
    """Slots, blocked top-k, phases (L = 8 + 18 = 26: 3 phases) and the early stop give the
    plain search's hypotheses (and its best, when only that is asked for), with the paper's
    length penalty and without it, free and with forced lengths: the same tokens; scores
    and log-probs summed over up to 26 steps in another order, within 1e-4."""
    model = test_decode.tiny(vocab_size=V, seed=V + K)
    inputs = np.array([[5, 6, 7, 8, 9, 10, 11, 3], [8, 3, 0, 0, 0, 0, 0, 0]], np.int32)
    settings = dict(beam_size=K, alpha=alpha, max_extra_length=18, min_length=min_length)
    got = decoding.beam_search(model, inputs, return_all=True, **settings)
    want = reference_beam_search(model, inputs, **settings)
    np.testing.assert_array_equal(np.asarray(got.tokens), want.tokens)
    np.testing.assert_allclose(np.asarray(got.scores), want.scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(got.logprobs), want.logprobs, atol=1e-4, rtol=0)
    # The best alone stops sooner (once it is final) and is the same.
    tokens, scores = decoding.beam_search(model, inputs, **settings)
    np.testing.assert_array_equal(np.asarray(tokens), want.tokens[:, 0])
    np.testing.assert_allclose(np.asarray(scores), want.scores[:, 0], atol=1e-4, rtol=0)
    assert beam.phases(26) == [9, 18, 26]
    assert (test_decode.lengths(want.tokens) >= min_length).all()


def test_slot_table_follows_reordered_hypotheses():
    """K hypotheses side by side in one row, writing into their own slots: after any
    reordering of the slot table by parent (`follow_parents`), each one's attention
    (`slot_mask`) equals causal attention over the inputs its hypothesis was fed."""
    B, K, L, D = 2, 3, 5, 8
    mha = layers.MultiHeadAttention(D, 2, 4, 3, rngs=nnx.Rngs(11))
    rng = np.random.default_rng(11)
    cache = mha.empty_cache(B, L * K)
    slots = jnp.broadcast_to(jnp.arange(K)[None, :, None], (B, K, L))
    history = [[[] for _ in range(K)] for _ in range(B)]
    for t in range(L):
        if t:  # every hypothesis continues a random parent of its own sentence
            parents = rng.integers(0, K, (B, K))
            slots = beam.follow_parents(slots, jnp.asarray(parents))
            history = [[list(history[b][p]) for p in parents[b]] for b in range(B)]
        slots = slots.at[:, :, t].set(jnp.arange(K))
        x = rng.standard_normal((B, K, D)).astype(np.float32)
        out, cache = mha(x, x, mask=beam.slot_mask(slots, t), cache=cache)
        for b in range(B):
            for k in range(K):
                history[b][k].append(x[b, k])
                seq = np.stack(history[b][k])[None]  # [1, t + 1, D]
                want, _ = mha(seq, seq, mask=attention.causal_mask(t + 1))
                np.testing.assert_allclose(
                    np.asarray(out)[b, k],
                    np.asarray(want)[0, -1],
                    atol=1e-5,
                    err_msg=f'{t} {b} {k}',
                )


def test_beam_of_one_is_greedy_or_an_early_end_of_it():
    """Beam 1 without length penalty follows greedy's path, but keeps the best hypothesis
    that ended on the way (EOS among the step's 2 candidates): its output is greedy's, or
    greedy's first j tokens then EOS, with a log-prob at least greedy's."""
    model = test_decode.tiny(vocab_size=12, seed=3)
    inputs = np.random.default_rng(3).integers(4, 12, (40, 6)).astype(np.int32)
    inputs[:, -1] = EOS_ID
    found = decoding.greedy_search(model, inputs, max_extra_length=5)
    hyps = decoding.beam_search(
        model, inputs, beam_size=1, alpha=0.0, max_extra_length=5, return_all=True
    )
    greedy_tokens, beam_tokens = np.asarray(found), np.asarray(hyps.tokens[:, 0])
    greedy_logprob = test_decode.full_logprobs(model, inputs, greedy_tokens).sum(-1)
    differ = 0
    for row in range(len(inputs)):
        g, b = greedy_tokens[row], beam_tokens[row]
        if not np.array_equal(g, b):
            differ += 1
            n = test_decode.lengths(b)
            assert b[n - 1] == EOS_ID and n < test_decode.lengths(g)
            np.testing.assert_array_equal(b[: n - 1], g[: n - 1])
        assert float(hyps.logprobs[row, 0]) >= greedy_logprob[row] - 1e-4
    assert differ < len(inputs)  # mostly the same search


def test_attention_statistics_from_the_search_equal_a_full_forward_of_its_output():
    """The entropy and peak weight of every encoder-decoder head, summed along each best
    hypothesis inside the search (parents followed, finished ones kept), equal those of a
    teacher-forced forward pass of the translation; the translations are unchanged."""
    from attn.analysis import heads

    model = test_decode.tiny(vocab_size=37, seed=5)
    inputs = np.array([[5, 6, 7, 8, 9, 10, 11, 3], [8, 3, 0, 0, 0, 0, 0, 0]], np.int32)
    settings = dict(beam_size=4, alpha=0.6, max_extra_length=6)
    (tokens, _), sums = decoding.beam_search(model, inputs, attention_stats=True, **settings)
    plain, _ = decoding.beam_search(model, inputs, **settings)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(plain))
    tokens, sums = np.asarray(tokens), np.asarray(sums)  # sums [B, layers, N, 2]
    for b in range(len(inputs)):
        targets = tokens[b : b + 1, : decoding.output_length(tokens[b])]
        maps = heads.attention_maps(
            model, {'inputs': inputs[b : b + 1], 'targets': targets}, 'transformer'
        )
        for layer in range(sums.shape[1]):
            weights = maps[f'decoder.{layer}.cross_attention'][0]  # [N, T, S]
            entropy = -(weights * np.log(np.clip(weights, 1e-12, 1))).sum(-1).sum(-1)
            peak = np.where(inputs[b] == EOS_ID, 0, weights).max(-1).sum(-1)
            np.testing.assert_allclose(sums[b, layer, :, 0], entropy, atol=1e-5)
            np.testing.assert_allclose(sums[b, layer, :, 1], peak, atol=1e-5)
