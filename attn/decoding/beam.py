"""Beam search (§6.1): beam 4, length penalty 0.6, maximum output length input + 50, with
n-best lists of the finished hypotheses.

The search is written for speed on any backend, in three named parts, each tested equal to
the plain search (a log-softmax and `lax.top_k` over beam x vocabulary, and every layer's
cache gathered by parent) in tests/test_beam.py:
  `candidates`: the 2K best extensions found by blocks of the vocabulary, exactly;
  `slot_mask` and `follow_parents`: keys/values stay where they were written, and only a
    [B, K, L] slot table follows the beams;
  `phases`: the caches grow in up to 4 steps, so attention reads only the phase's length.

Dimension letters: B batch, S source length, L output length, K beam, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attn.decoding import common
from attn.decoding.common import NEG_INF
from attn.model import Transformer
from attn.model.layers import KVCache
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID


class Beams(NamedTuple):
    """Beam search state; live and finished hypotheses are kept apart."""

    t: jax.Array  # [] tokens decoded so far
    live_seqs: jax.Array  # [B, K, L] ids, PAD after position t
    live_logprobs: jax.Array  # [B, K] sum of log-probs; -inf = no hypothesis
    last: jax.Array  # [B, K] each live hypothesis' latest token (the next step's input)
    cache: list[KVCache]  # per layer: B sentences x L positions x K slots (`slot_mask`)
    slots: jax.Array  # [B, K, L] the slot holding each position of each hypothesis
    finished_seqs: jax.Array  # [B, K, L] ids up to EOS (or the length limit), then PAD
    finished_scores: jax.Array  # [B, K] log-prob / length penalty; -inf = empty slot
    finished_logprobs: jax.Array  # [B, K] log-prob (sum over tokens); -inf = empty slot
    # With attention statistics: per hypothesis, per decoder layer and head, the sums over
    # its positions of the encoder-decoder attention's entropy and peak weight.
    live_attention: jax.Array | None = None  # [B, K, layers, N, 2]
    finished_attention: jax.Array | None = None  # [B, K, layers, N, 2]


def attention_statistics(probs: list[jax.Array], inputs: jax.Array) -> jax.Array:
    """Per query, the entropy (nats) and the peak weight (EOS keys left out, as
    `analysis.heads.head_statistics`' confidence) of every layer's encoder-decoder
    attention: probs [B, N, T, S] per layer, inputs [B, S] -> [B, T, layers, N, 2]."""
    eos = (inputs == EOS_ID)[:, None, None, :]  # [B, 1, 1, S]
    out = []
    for p in probs:
        p = p.astype(jnp.float32)
        entropy = -(p * jnp.log(jnp.clip(p, 1e-12, 1.0))).sum(-1)  # [B, N, T]
        peak = jnp.where(eos, 0.0, p).max(-1)  # [B, N, T]
        out.append(jnp.stack([entropy, peak], axis=-1))  # [B, N, T, 2]
    return jnp.stack(out, axis=1).transpose(0, 3, 1, 2, 4)  # [B, T, layers, N, 2]


class Hypotheses(NamedTuple):
    """Every sentence's K finished hypotheses, best first (`beam_search(return_all=True)`)."""

    tokens: jax.Array  # [B, K, L] ids without BOS, up to and including EOS, then PAD
    scores: jax.Array  # [B, K] log P(Y|X) / lp(Y), the ranking score; -inf = empty slot
    logprobs: jax.Array  # [B, K] log P(Y|X)


def beams_done(beams: Beams, limits: jax.Array, alpha, needed: int | None = None) -> jax.Array:
    """Early stop per sentence: no live hypothesis can still enter the `needed` best
    finished ones (default: all K). [B].

    A live hypothesis' log-prob only falls as it grows, and it can finish with any length
    in [t + 1, limit]; divided by the largest lp over that range (lp is monotonic in the
    length) it bounds every score it can reach. A sentence is done once its `needed`-th best
    finished score (-inf while fewer have finished) is at least that bound for its best live
    hypothesis (-inf once none is left, e.g. past the length limit). needed=1, when only the
    best translation is returned: it is final once no live hypothesis can beat it, so the
    search returns the same translation and stops sooner than waiting for K.
    """
    needed = beams.finished_scores.shape[1] if needed is None else needed
    kept = beams.finished_scores[:, needed - 1]  # [B]; the finished are kept best first
    best_live = beams.live_logprobs.max(axis=1)  # [B]
    largest_lp = jnp.maximum(
        common.length_penalty(beams.t + 1, alpha), common.length_penalty(limits, alpha)
    )
    return kept >= best_live / largest_lp


# Vocabulary entries per block of `candidates`' search.
BLOCK = 128


def candidates(live_logprobs: jax.Array, logits: jax.Array, log_norm: jax.Array):
    """The 2K best one-token extensions of the K live hypotheses of each sentence.

    2K of them leave at least K that have not ended, however many end in EOS (at most
    one per parent). An extension's total is the hypothesis' log-prob + (logit - log_norm),
    the token's log-softmax; the totals over K x V are never written out. The search runs
    by blocks of `BLOCK` vocabulary entries: totals are monotonic in the logit, so a
    block's best total is its largest logit's, and the 2K best totals lie in the 2K blocks
    with the best block totals (any other block has 2K better entries ahead of it, one in
    each of those, ties going to the lower index as in `jax.lax.top_k`). Only those are
    searched entry by entry. Exact, and on CPU ~4x cheaper than a log-softmax and a top-k
    over K x V (the base model's vocabulary step).

    Args:
      live_logprobs: [B, K] the hypotheses' summed log-probs (-inf: none).
      logits: [B, K, V] float32, masked entries -inf.
      log_norm: [B, K] log-sum-exp of each row's unmasked logits.
    Returns:
      ([B, 2K] summed log-probs, [B, 2K] parent beam, [B, 2K] token).
    """
    B, K, V = logits.shape
    block = min(BLOCK, V)
    n = -(-V // block)  # blocks per row
    if n * block != V:
        logits = jnp.pad(logits, ((0, 0), (0, 0), (0, n * block - V)), constant_values=NEG_INF)
    blocks = logits.reshape(B, K, n, block)
    # Summed log-probs, computed alike for block maxima and entries (so they rank alike).
    block_best = (blocks.max(axis=3) - log_norm[..., None]) + live_logprobs[..., None]  # [B, K, n]
    _, chosen = jax.lax.top_k(block_best.reshape(B, K * n), min(2 * K, K * n))  # [B, 2K]
    chosen = jnp.sort(chosen, axis=1)  # in index order, so that ties go to the lower index
    of_parent = functools.partial(jnp.take_along_axis, indices=chosen // n, axis=1)  # [B, 2K]
    picked = jnp.take_along_axis(blocks.reshape(B, K * n, block), chosen[..., None], axis=1)
    picked = (picked - of_parent(log_norm)[..., None]) + of_parent(live_logprobs)[..., None]
    top_logprobs, top = jax.lax.top_k(picked.reshape(B, -1), min(2 * K, K * V))  # [B, 2K]
    flat = jnp.take_along_axis(chosen, top // block, axis=1)  # the block of each
    tokens = jnp.minimum((flat % n) * block + top % block, V - 1)  # padding only when dead
    return top_logprobs, flat // n, tokens


def slot_mask(slots: jax.Array, t: jax.Array) -> jax.Array:
    """Which cache entries each hypothesis sees at step t: its own history.

    A beam search's caches hold K slots per position, entry l * K + s being position l of
    slot s. Keys/values are written once, into the slot of the hypothesis that fed the
    position, and never move: when beams are reordered only the slot table follows its
    hypotheses (`follow_parents`), not every layer's cache. A sentence's K hypotheses are
    the K query positions of one row, so every cached entry is read once per sentence;
    each query scores all L x K entries, K - 1 of every K masked, so the products grow as
    K^2 (cheap at the paper's beam of 4). One mask per step serves every layer.

    Args:
      slots: [B, K, L] the slot holding position l of hypothesis k (its own at step t).
      t: [] the step's position.
    Returns:
      [B, 1, K, L * K] bool.
    """
    B, K, L = slots.shape
    written = jnp.arange(L) <= t  # [L]
    mine = slots[..., None] == jnp.arange(K)  # [B, K, L, K]
    return (written[:, None] & mine).reshape(B, 1, K, L * K)


def follow_parents(slots: jax.Array, parents: jax.Array) -> jax.Array:
    """The slot tables [B, K, L] of the new beams (hypothesis k continues `parents[:, k]`):
    the fast form of reordering every layer's cache by parent."""
    return jnp.take_along_axis(slots, parents[..., None], axis=1)


def _beam_step(
    beams: Beams, step: common.Step, limits: jax.Array, alpha, min_length, inputs
) -> Beams:
    """Extends every live hypothesis by one token; moves ended ones to the finished set."""
    B, K, L = beams.live_seqs.shape
    length = beams.cache[0].length // K  # positions in this phase's caches
    own = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32)[:, None], (B, K, 1))
    slots = jax.lax.dynamic_update_slice(beams.slots, own, (0, 0, beams.t))  # [B, K, L]
    mask = slot_mask(slots[:, :, :length], beams.t)  # [B, 1, K, length * K]
    positions = common.at_position(beams.t, B, K)  # [B, K]: the K hypotheses side by side
    stepped = step(beams.cache, beams.last, positions, mask)
    logits, cache = stepped[:2]  # [B, K, V], the caches
    # Scores are the model's log-probs; masked tokens are only taken out of the running.
    log_norm = jax.nn.logsumexp(logits, axis=-1)  # [B, K]
    logits = common.mask_tokens(logits, beams.t < min_length)  # [B, K, V]
    top_logprobs, parents, tokens = candidates(
        beams.live_logprobs, logits, log_norm
    )  # [B, 2K] each
    seqs = jnp.take_along_axis(beams.live_seqs, parents[..., None], axis=1)  # [B, 2K, L]
    seqs = jax.lax.dynamic_update_index_in_dim(seqs, tokens, beams.t, axis=2)
    # A hypothesis ends with EOS or at its sentence's length limit; ended ones are never
    # extended again.
    ended = (tokens == EOS_ID) | (beams.t + 1 >= limits[:, None])  # [B, 2K]

    live_logprobs, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, top_logprobs), K)  # [B, K]
    keep_parents = jnp.take_along_axis(parents, keep, axis=1)  # [B, K]

    scores = jnp.where(ended, top_logprobs / common.length_penalty(beams.t + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([beams.finished_scores, scores], axis=1)  # [B, 3K]
    all_seqs = jnp.concatenate([beams.finished_seqs, seqs], axis=1)  # [B, 3K, L]
    logprobs_if_ended = jnp.where(ended, top_logprobs, NEG_INF)  # [B, 2K], as the scores
    all_logprobs = jnp.concatenate([beams.finished_logprobs, logprobs_if_ended], axis=1)
    finished_scores, best = jax.lax.top_k(all_scores, K)  # [B, K]
    live_attention = finished_attention = None
    if beams.live_attention is not None:  # each extension: its parent's sums + this step's
        this_step = beams.live_attention + attention_statistics(stepped[2], inputs)
        extended = jnp.take_along_axis(this_step, parents[..., None, None, None], axis=1)
        live_attention = jnp.take_along_axis(extended, keep[..., None, None, None], axis=1)
        every = jnp.concatenate([beams.finished_attention, extended], axis=1)  # [B, 3K, ...]
        finished_attention = jnp.take_along_axis(every, best[..., None, None, None], axis=1)
    return Beams(
        t=beams.t + 1,
        live_seqs=jnp.take_along_axis(seqs, keep[..., None], axis=1),  # [B, K, L]
        live_logprobs=live_logprobs,
        last=jnp.take_along_axis(tokens, keep, axis=1),  # [B, K]
        cache=cache,
        slots=follow_parents(slots, keep_parents),
        finished_seqs=jnp.take_along_axis(all_seqs, best[..., None], axis=1),  # [B, K, L]
        finished_scores=finished_scores,
        finished_logprobs=jnp.take_along_axis(all_logprobs, best, axis=1),  # [B, K]
        live_attention=live_attention,
        finished_attention=finished_attention,
    )


def phases(length: int) -> list[int]:
    """The cache lengths the beam search grows through, up to `length`: up to 4 phases of at
    least 8 positions. Attention over a cache reads its whole length at every step, written
    or not, so a phase reads only its own (base beam 4, 41 positions, on a 2-core CPU: 4
    phases 3.61 -> 3.27 s per batch, compiled in 8.0 s instead of 5.9)."""
    n = max(1, min(4, length // 8))
    return [-(-length * (i + 1) // n) for i in range(n)]


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=('beam_size', 'max_extra_length', 'needed', 'attention_stats'),
)
def _beam_search(
    graphdef,
    state,
    inputs,
    alpha,
    min_length,
    *,
    beam_size,
    max_extra_length,
    needed,
    attention_stats=False,
):
    B, S = inputs.shape
    K, L = beam_size, S + max_extra_length
    lengths = phases(L)
    nnx.merge(graphdef, state).decoder.check_positions(L)  # the caches grow up to L
    step, cache = common.start(
        graphdef,
        state,
        inputs,
        batch_size=B,
        length=lengths[0],
        width=K,
        cross_attention=attention_stats,
    )
    limits = common.limits(inputs, max_extra_length)  # [B]
    model = nnx.merge(graphdef, state)
    stats = (B, K, len(model.decoder.layers), model.config.num_heads, 2)
    first = jnp.arange(K) == 0  # one live hypothesis (BOS) to start from, not K copies
    beams = Beams(
        t=jnp.array(0, jnp.int32),
        live_seqs=jnp.full((B, K, L), PAD_ID, jnp.int32),
        live_logprobs=jnp.broadcast_to(jnp.where(first, 0.0, NEG_INF), (B, K)),
        last=jnp.full((B, K), BOS_ID, jnp.int32),
        cache=cache,
        slots=jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32)[None, :, None], (B, K, L)),
        finished_seqs=jnp.full((B, K, L), PAD_ID, jnp.int32),
        finished_scores=jnp.full((B, K), NEG_INF, jnp.float32),
        finished_logprobs=jnp.full((B, K), NEG_INF, jnp.float32),
        live_attention=jnp.zeros(stats, jnp.float32) if attention_stats else None,
        finished_attention=jnp.zeros(stats, jnp.float32) if attention_stats else None,
    )
    for length in lengths:  # each phase's loop runs while t < its cache length
        grown = [c.grow(length * K) for c in beams.cache]
        beams = jax.lax.while_loop(
            lambda b, length=length: (b.t < length) & ~beams_done(b, limits, alpha, needed).all(),
            lambda b: _beam_step(b, step, limits, alpha, min_length, inputs),
            beams._replace(cache=grown),
        )
    found = Hypotheses(beams.finished_seqs, beams.finished_scores, beams.finished_logprobs)
    return (found, beams.finished_attention) if attention_stats else found


def beam_search(
    model: Transformer,
    inputs,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_extra_length: int = 50,
    min_length: int = 0,
    return_all: bool = False,
    attention_stats: bool = False,
):
    """Beam search with the paper's settings (§6.1): beam 4, length penalty alpha 0.6,
    maximum output length input + 50, early stop.

    A hypothesis scores log P(Y|X) / lp(Y) with lp(Y) = ((5 + |Y|) / 6) ** alpha, |Y| its
    length including EOS. Hypotheses that end (EOS, or the sentence's length limit) move
    to a separate finished set of K and are never extended. The search stops when, for
    every sentence, no live hypothesis can still reach the score of the worst of the K
    finished ones (with return_all; else of the best one, which is then final:
    `beams_done`), or at S + max_extra_length steps.

    Args:
      model: a Transformer.
      inputs: [B, S] source ids, right-padded with PAD_ID, each ending in EOS.
      beam_size: K, live (and finished) hypotheses per sentence.
      alpha: length penalty exponent; 0 ranks by log-probability alone.
      max_extra_length: sentence b stops after len_b + max_extra_length tokens.
      min_length: EOS is suppressed before this many tokens (to force lengths).
      return_all: return every finished hypothesis, best first.
      attention_stats: also return, per hypothesis, every decoder layer's and head's
        encoder-decoder attention entropy and peak weight summed over its positions
        (`attention_statistics`), gathered inside the search: [B, layers, N, 2] for the
        best, [B, K, layers, N, 2] with return_all.
    Returns:
      (tokens [B, L] int32, scores [B] float32) of the best hypothesis per sentence, or
      all K of them with return_all (`Hypotheses`); L = S + max_extra_length, tokens
      without BOS, up to and including EOS, then PAD. With attention_stats, (that, the
      sums).
    """
    graphdef, state = common.split_model(model, Transformer)
    hypotheses = _beam_search(
        graphdef,
        state,
        jnp.asarray(inputs, jnp.int32),
        jnp.asarray(alpha, jnp.float32),
        jnp.asarray(min_length, jnp.int32),
        beam_size=beam_size,
        max_extra_length=max_extra_length,
        needed=beam_size if return_all else 1,
        attention_stats=attention_stats,
    )
    sums = None
    if attention_stats:
        hypotheses, sums = hypotheses
    found = hypotheses if return_all else (hypotheses.tokens[:, 0], hypotheses.scores[:, 0])
    if not attention_stats:
        return found
    return found, (sums if return_all else sums[:, 0])
