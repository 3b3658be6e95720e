"""Decoding over the incremental cache: greedy, beam search (§6.1) and sampling.

Every search is one compiled program: the encoder runs once per batch, the source's
keys/values are projected once (`Decoder.init_cache(..., encoded=...)`), and a
`jax.lax.while_loop` carries the self-attention caches (nnx.Cache state) from step to
step. The beam search grows those caches in phases (`_phases`), one while_loop each:
attention over the cache reads the whole allocated length at every step, written or not,
so a phase reads only its own (greedy search gained nothing from it on CPU, and compiled
twice as long). The model is split into graphdef + state (`nnx.split`) and
merged inside the step, so nothing here mutates the caller's model. Jitted functions take the
graphdef as a static argument, so repeated calls with the same shapes and settings do not
recompile.

Outputs are [B, L] target ids without BOS, up to and including EOS, then PAD. For the
Transformer L = S + max_extra_length (S: the batch's padded source length) and sentence
b stops after len_b + max_extra_length tokens, len_b its source length without padding
(the paper: "maximum output length to input length + 50", §6.1). PAD and BOS are never
produced (PAD pads the output, BOS only starts it); scores remain the model's log-probs.

Dimension letters: B batch, S source length, L output length, K beam, V vocabulary,
R = B * K hypotheses (rows of a step; the key/value caches hold B sentences of K slots).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn.model import LanguageModel, Transformer, layers
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID

# Beam and sampling scores never pass through a softmax, so -inf is exact and safe here:
# -inf + finite = -inf marks dead hypotheses (and suppressed tokens) for good.
NEG_INF = float('-inf')

Step = Callable[[nnx.State, jax.Array, jax.Array], tuple[jax.Array, nnx.State]]


# ------------------------------------------------------------------------ step function


def _follow_parents(cache: nnx.State, rows: jax.Array) -> nnx.State:
    """Reorders the caches' rows to the new beams (row i continues row `rows[i]`): only the
    slot tables move (`layers.BeamSlots`); the keys/values stay where they were written."""
    slots, rest = nnx.split_state(cache, layers.BeamSlots, ...)
    slots = jax.tree.map(lambda x: jnp.take(x, rows, axis=0, mode='clip'), slots)
    return nnx.merge_state(rest, slots)


def _start(graphdef, state, inputs, *, batch_size: int, copies: int, length: int):
    """Runs the encoder once, allocates the caches and returns the one-step function.

    Args:
      graphdef, state: `nnx.split(model)` of a Transformer or LanguageModel.
      inputs: [B, S] source ids, or None for a LanguageModel.
      batch_size: B.
      copies: rows per sentence (the beam size K), sentence-major.
      length: L, positions in each self-attention cache.
    Returns:
      (step, self_cache, grow): `step(self_cache, tokens [R], t) -> (logits [R, V] float32,
      self_cache)` feeds `tokens` at position t, R = B * copies; given tokens [R, T] it
      feeds positions t, ..., t + T - 1 in one pass (a prefill) and returns [R, T, V].
      `grow(self_cache, length)` lengthens the caches to `length` positions.
    """
    model = nnx.merge(graphdef, state)
    if inputs is not None:
        encoded = model.encode(inputs)  # [B, S, D], once per batch
        model.decoder.init_cache(batch_size, length, encoded=encoded, beams=copies)
    else:
        model.decoder.init_cache(batch_size, length, beams=copies)
    # Self-attention caches grow by one position per step (a beam search reorders their
    # `layers.BeamSlots`); the source's keys/values are constant.
    step_def, self_cache, source_cache, rest = nnx.split(
        model, layers.DecodeCache, layers.SourceCache, ...
    )
    # Fixes the source caches' layout before the loop: without the barrier XLA:CPU carried
    # them untransposed and transposed every layer's keys/values again at every step.
    source_cache = jax.lax.optimization_barrier(source_cache)
    rows = batch_size * copies

    def step(cache, tokens, t):
        m = nnx.merge(step_def, cache, source_cache, rest)
        ids = tokens.reshape(rows, -1)  # [R, T], T = 1 for one step
        T = ids.shape[1]
        positions = t + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (rows, T))  # [R, T]
        if inputs is None:
            logits = m.decode_step(ids, positions=positions)  # [R, T, V]
        else:
            logits = m.decode_step(ids, positions=positions, inputs=inputs)
        logits = logits.astype(jnp.float32).reshape(*tokens.shape, -1)  # [R, V] or [R, T, V]
        return logits, nnx.state(m, layers.DecodeCache)

    def grow(cache, length):
        m = nnx.merge(step_def, cache, source_cache, rest)
        m.decoder.grow_cache(length)
        return nnx.state(m, layers.DecodeCache)

    return step, self_cache, grow


def _phases(length: int) -> list[int]:
    """The cache lengths the beam search grows through, up to `length`: up to 4 phases of at
    least 8 positions (base beam 4, 41 positions, on this project's 2-core CPU: 4 phases
    3.61 -> 3.27 s per batch, compiled in 8.0 s instead of 5.9)."""
    n = max(1, min(4, length // 8))
    return [-(-length * (i + 1) // n) for i in range(n)]


def _split(model: Transformer | LanguageModel, kind: type):
    """(graphdef, state) of `model`, which must be a `kind`."""
    if not isinstance(model, kind):
        raise TypeError(f'Expected a {kind.__name__}, got {type(model).__name__}.')
    return nnx.split(model)


def _limits(inputs: jax.Array, max_extra_length: int) -> jax.Array:
    """Per-sentence output length limit: source length without padding + extra. [B]."""
    return (inputs != PAD_ID).sum(axis=1).astype(jnp.int32) + max_extra_length


def _mask_tokens(logits: jax.Array, suppress_eos: jax.Array) -> jax.Array:
    """Never PAD (the output's padding) or BOS (only starts); EOS not while `suppress_eos`.

    Args:
      logits: [..., V] logits or log-probs; masked entries become -inf.
      suppress_eos: [] bool.
    """
    ids = jnp.arange(logits.shape[-1])
    masked = (ids == PAD_ID) | (ids == BOS_ID) | ((ids == EOS_ID) & suppress_eos)
    return jnp.where(masked, NEG_INF, logits)  # elementwise, so it fuses into its readers


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the maximum over the last axis of x [..., V] -> [...] int32.

    Same result as jnp.argmax, which XLA:CPU runs as a variadic reduction ~5x slower.
    """
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == x.max(axis=-1, keepdims=True), ids, x.shape[-1]), axis=-1)


def length_penalty(length: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, Eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


# ------------------------------------------------------------------- teacher forcing


@functools.partial(jax.jit, static_argnums=0)
def _forced_decode(graphdef, state, inputs, decoder_inputs):
    B, T = decoder_inputs.shape
    step, cache, _ = _start(graphdef, state, inputs, batch_size=B, copies=1, length=T)

    def body(cache, xs):
        t, tokens = xs
        logits, cache = step(cache, tokens, t)
        return cache, logits

    _, logits = jax.lax.scan(body, cache, (jnp.arange(T), decoder_inputs.T))  # [T, B, V]
    return logits.transpose(1, 0, 2)  # [B, T, V]


def forced_decode(model, inputs, decoder_inputs) -> jax.Array:
    """Logits of each next token, fed one step at a time through the cache.

    The same step function as the searches, with given decoder inputs; equals the
    full forward pass at every position (the invariance the tests check).

    Args:
      model: a Transformer (then `inputs` [B, S] source ids) or a LanguageModel
        (then `inputs` is None).
      decoder_inputs: [B, T] ids starting with BOS (`shift_right` of the targets).
    Returns:
      [B, T, V] float32 logits.
    """
    graphdef, state = _split(model, LanguageModel if inputs is None else Transformer)
    if inputs is not None:
        inputs = jnp.asarray(inputs, jnp.int32)
    return _forced_decode(graphdef, state, inputs, jnp.asarray(decoder_inputs, jnp.int32))


# ------------------------------------------------------------------------------ greedy


@functools.partial(jax.jit, static_argnums=0, static_argnames=('max_extra_length',))
def _greedy(graphdef, state, inputs, min_length, *, max_extra_length):
    B, S = inputs.shape
    L = S + max_extra_length
    step, cache, _ = _start(graphdef, state, inputs, batch_size=B, copies=1, length=L)
    limits = _limits(inputs, max_extra_length)  # [B]

    def cond(carry):
        t, _, _, done, _ = carry
        return (t < L) & ~done.all()

    def body(carry):
        t, out, last, done, cache = carry
        logits, cache = step(cache, last, t)  # [B, V]
        logits = _mask_tokens(logits, t < min_length)
        token = jnp.where(done, PAD_ID, _argmax(logits))  # [B]
        out = jax.lax.dynamic_update_index_in_dim(out, token, t, axis=1)  # [B, L]
        done = done | (token == EOS_ID) | (t + 1 >= limits)
        return t + 1, out, token, done, cache

    init = (
        jnp.array(0, jnp.int32),
        jnp.full((B, L), PAD_ID, jnp.int32),
        jnp.full((B,), BOS_ID, jnp.int32),
        jnp.zeros((B,), bool),
        cache,
    )
    return jax.lax.while_loop(cond, body, init)[1]


def greedy_search(
    model: Transformer, inputs, *, max_extra_length: int = 50, min_length: int = 0
) -> jax.Array:
    """Greedy decoding: the most probable token at each step.

    Args:
      model: a Transformer.
      inputs: [B, S] source ids, right-padded with PAD_ID, each ending in EOS.
      max_extra_length: sentence b stops after len_b + max_extra_length tokens.
      min_length: EOS is suppressed before this many tokens (to force lengths, e.g. in
        benchmarks); 0 leaves the model free.
    Returns:
      [B, S + max_extra_length] int32 ids without BOS, up to and including EOS, then PAD.
    """
    graphdef, state = _split(model, Transformer)
    inputs = jnp.asarray(inputs, jnp.int32)
    min_length = jnp.asarray(min_length, jnp.int32)
    return _greedy(graphdef, state, inputs, min_length, max_extra_length=max_extra_length)


# --------------------------------------------------------------------------- beam search


class _Beams(NamedTuple):
    """Beam search state; live and finished hypotheses are kept apart."""

    t: jax.Array  # [] tokens decoded so far
    live_seqs: jax.Array  # [B, K, L] ids, PAD after position t
    live_logprobs: jax.Array  # [B, K] sum of log-probs; -inf = no hypothesis
    last: jax.Array  # [B, K] each live hypothesis' latest token (the next step's input)
    cache: nnx.State  # self-attention caches: B sentences x K slots, slot tables [B * K, L]
    finished_seqs: jax.Array  # [B, K, L] ids up to EOS (or the length limit), then PAD
    finished_scores: jax.Array  # [B, K] log-prob / length penalty; -inf = empty slot
    finished_logprobs: jax.Array  # [B, K] log-prob (sum over tokens); -inf = empty slot


class Hypotheses(NamedTuple):
    """Every sentence's K finished hypotheses, best first (`beam_search(return_all=True)`)."""

    tokens: jax.Array  # [B, K, L] ids without BOS, up to and including EOS, then PAD
    scores: jax.Array  # [B, K] log P(Y|X) / lp(Y), the ranking score; -inf = empty slot
    logprobs: jax.Array  # [B, K] log P(Y|X)


def _beams_done(beams: _Beams, limits: jax.Array, alpha) -> jax.Array:
    """Early stop per sentence: no live hypothesis can still enter the finished top K. [B].

    A live hypothesis' log-prob only falls as it grows, and it can finish with any length
    in [t + 1, limit]; divided by the largest lp over that range (lp is monotonic in the
    length) it bounds every score it can reach. A sentence is done once its worst finished
    score (-inf while fewer than K have finished) is at least that bound for its best live
    hypothesis (-inf once none is left, e.g. past the length limit).
    """
    worst_finished = beams.finished_scores.min(axis=1)  # [B]
    best_live = beams.live_logprobs.max(axis=1)  # [B]
    largest_lp = jnp.maximum(length_penalty(beams.t + 1, alpha), length_penalty(limits, alpha))
    return worst_finished >= best_live / largest_lp


# Vocabulary entries per block of `_candidates`' search.
_BLOCK = 128


def _candidates(beams: _Beams, logits: jax.Array, log_norm: jax.Array):
    """The 2K best one-token extensions of the K live hypotheses of each sentence.

    2K of them leave at least K that have not ended, however many end in EOS (at most
    one per parent). An extension's total is the hypothesis' log-prob + (logit - log_norm),
    the token's log-softmax; the totals over K x V are never written out. The search runs
    by blocks of `_BLOCK` vocabulary entries: totals are monotonic in the logit, so a
    block's best total is its largest logit's, and the 2K best totals lie in the 2K blocks
    with the best block totals (any other block has 2K better entries ahead of it, one in
    each of those, ties going to the lower index as in `jax.lax.top_k`). Only those are
    searched entry by entry. Exact, and on CPU ~4x cheaper than a log-softmax and a top-k
    over K x V (the base model's vocabulary step).

    Args:
      logits: [B, K, V] float32, masked entries -inf.
      log_norm: [B, K] log-sum-exp of each row's unmasked logits.
    Returns:
      ([B, 2K] summed log-probs, [B, 2K] parent beam, [B, 2K] token).
    """
    B, K, V = logits.shape
    block = min(_BLOCK, V)
    n = -(-V // block)  # blocks per row
    if n * block != V:
        logits = jnp.pad(logits, ((0, 0), (0, 0), (0, n * block - V)), constant_values=NEG_INF)
    blocks = logits.reshape(B, K, n, block)
    live = beams.live_logprobs
    # Summed log-probs, computed alike for block maxima and entries (so they rank alike).
    block_best = (blocks.max(axis=3) - log_norm[..., None]) + live[..., None]  # [B, K, n]
    _, chosen = jax.lax.top_k(block_best.reshape(B, K * n), min(2 * K, K * n))  # [B, 2K]
    chosen = jnp.sort(chosen, axis=1)  # in index order, so that ties go to the lower index
    of_parent = functools.partial(jnp.take_along_axis, indices=chosen // n, axis=1)  # [B, 2K]
    picked = jnp.take_along_axis(blocks.reshape(B, K * n, block), chosen[..., None], axis=1)
    picked = (picked - of_parent(log_norm)[..., None]) + of_parent(live)[..., None]
    top_logprobs, top = jax.lax.top_k(picked.reshape(B, -1), min(2 * K, K * V))  # [B, 2K]
    flat = jnp.take_along_axis(chosen, top // block, axis=1)  # the block of each
    tokens = jnp.minimum((flat % n) * block + top % block, V - 1)  # padding only when dead
    return top_logprobs, flat // n, tokens


def _beam_step(beams: _Beams, step: Step, limits: jax.Array, alpha, min_length) -> _Beams:
    """Extends every live hypothesis by one token; moves ended ones to the finished set."""
    B, K, L = beams.live_seqs.shape
    logits, cache = step(beams.cache, beams.last.reshape(B * K), beams.t)  # [R, V]
    # Scores are the model's log-probs; masked tokens are only taken out of the running.
    log_norm = jax.nn.logsumexp(logits, axis=-1).reshape(B, K)
    logits = _mask_tokens(logits, beams.t < min_length).reshape(B, K, -1)  # [B, K, V]
    top_logprobs, parents, tokens = _candidates(beams, logits, log_norm)  # [B, 2K] each
    seqs = jnp.take_along_axis(beams.live_seqs, parents[..., None], axis=1)  # [B, 2K, L]
    seqs = jax.lax.dynamic_update_index_in_dim(seqs, tokens, beams.t, axis=2)
    # A hypothesis ends with EOS or at its sentence's length limit; ended ones are never
    # extended again.
    ended = (tokens == EOS_ID) | (beams.t + 1 >= limits[:, None])  # [B, 2K]

    live_logprobs, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, top_logprobs), K)  # [B, K]
    keep_parents = jnp.take_along_axis(parents, keep, axis=1)  # [B, K]
    rows = (jnp.arange(B)[:, None] * K + keep_parents).reshape(B * K)  # [R]
    cache = _follow_parents(cache, rows)

    scores = jnp.where(ended, top_logprobs / length_penalty(beams.t + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([beams.finished_scores, scores], axis=1)  # [B, 3K]
    all_seqs = jnp.concatenate([beams.finished_seqs, seqs], axis=1)  # [B, 3K, L]
    logprobs_if_ended = jnp.where(ended, top_logprobs, NEG_INF)  # [B, 2K], as the scores
    all_logprobs = jnp.concatenate([beams.finished_logprobs, logprobs_if_ended], axis=1)
    finished_scores, best = jax.lax.top_k(all_scores, K)  # [B, K]
    return _Beams(
        t=beams.t + 1,
        live_seqs=jnp.take_along_axis(seqs, keep[..., None], axis=1),  # [B, K, L]
        live_logprobs=live_logprobs,
        last=jnp.take_along_axis(tokens, keep, axis=1),  # [B, K]
        cache=cache,
        finished_seqs=jnp.take_along_axis(all_seqs, best[..., None], axis=1),  # [B, K, L]
        finished_scores=finished_scores,
        finished_logprobs=jnp.take_along_axis(all_logprobs, best, axis=1),  # [B, K]
    )


@functools.partial(jax.jit, static_argnums=0, static_argnames=('beam_size', 'max_extra_length'))
def _beam_search(graphdef, state, inputs, alpha, min_length, *, beam_size, max_extra_length):
    B, S = inputs.shape
    K, L = beam_size, S + max_extra_length
    phases = _phases(L)
    step, cache, grow = _start(graphdef, state, inputs, batch_size=B, copies=K, length=phases[0])
    limits = _limits(inputs, max_extra_length)  # [B]
    first = jnp.arange(K) == 0  # one live hypothesis (BOS) to start from, not K copies
    beams = _Beams(
        t=jnp.array(0, jnp.int32),
        live_seqs=jnp.full((B, K, L), PAD_ID, jnp.int32),
        live_logprobs=jnp.broadcast_to(jnp.where(first, 0.0, NEG_INF), (B, K)),
        last=jnp.full((B, K), BOS_ID, jnp.int32),
        cache=cache,
        finished_seqs=jnp.full((B, K, L), PAD_ID, jnp.int32),
        finished_scores=jnp.full((B, K), NEG_INF, jnp.float32),
        finished_logprobs=jnp.full((B, K), NEG_INF, jnp.float32),
    )
    for length in phases:  # each phase's loop runs while t < its cache length
        beams = jax.lax.while_loop(
            lambda b, length=length: (b.t < length) & ~_beams_done(b, limits, alpha).all(),
            lambda b: _beam_step(b, step, limits, alpha, min_length),
            beams._replace(cache=grow(beams.cache, length)),
        )
    return Hypotheses(beams.finished_seqs, beams.finished_scores, beams.finished_logprobs)


def beam_search(
    model: Transformer,
    inputs,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_extra_length: int = 50,
    min_length: int = 0,
    return_all: bool = False,
) -> tuple[jax.Array, jax.Array] | Hypotheses:
    """Beam search with the paper's settings (§6.1): beam 4, length penalty alpha 0.6,
    maximum output length input + 50, early stop.

    A hypothesis scores log P(Y|X) / lp(Y) with lp(Y) = ((5 + |Y|) / 6) ** alpha, |Y| its
    length including EOS. Hypotheses that end (EOS, or the sentence's length limit) move
    to a separate finished set of K and are never extended. The search stops when, for
    every sentence, no live hypothesis can still reach the score of the worst of the K
    finished ones (`_beams_done`), or at S + max_extra_length steps.

    Args:
      model: a Transformer.
      inputs: [B, S] source ids, right-padded with PAD_ID, each ending in EOS.
      beam_size: K, live (and finished) hypotheses per sentence.
      alpha: length penalty exponent; 0 ranks by log-probability alone.
      max_extra_length: sentence b stops after len_b + max_extra_length tokens.
      min_length: EOS is suppressed before this many tokens (to force lengths).
      return_all: return every finished hypothesis, best first.
    Returns:
      (tokens [B, L] int32, scores [B] float32) of the best hypothesis per sentence, or
      all K of them with return_all (`Hypotheses`); L = S + max_extra_length, tokens
      without BOS, up to and including EOS, then PAD.
    """
    graphdef, state = _split(model, Transformer)
    hypotheses = _beam_search(
        graphdef,
        state,
        jnp.asarray(inputs, jnp.int32),
        jnp.asarray(alpha, jnp.float32),
        jnp.asarray(min_length, jnp.int32),
        beam_size=beam_size,
        max_extra_length=max_extra_length,
    )
    if return_all:
        return hypotheses
    return hypotheses.tokens[:, 0], hypotheses.scores[:, 0]


# ------------------------------------------------------------------------------ sampling


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same order (negatives flipped, sign bit set on the rest)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _threshold(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest key t with sum(weights where keys >= t) >= target (else 0).

    A 32-step bisection over the uint32 keys (no loss of resolution); on CPU far cheaper
    than sorting the vocabulary at every step.
    keys, weights: [B, V]; target: [] or [B, 1]. Returns [B, 1] uint32.
    """

    def bisect(_, bounds):
        lo, hi = bounds
        mid = hi - (hi - lo) // 2  # upper middle: in (lo, hi] while lo < hi
        # lo only ever moves to a key that reaches the target, so stays 0 if none does.
        reached = jnp.sum(jnp.where(keys >= mid, weights, 0), -1, keepdims=True) >= target
        return jnp.where(reached, mid, lo), jnp.where(reached, hi, mid - 1)

    shape = (keys.shape[0], 1)
    bounds = (jnp.zeros(shape, jnp.uint32), jnp.full(shape, 2**32 - 1, jnp.uint32))
    return jax.lax.fori_loop(0, 32, bisect, bounds)[0]


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps the top-k tokens, then the nucleus (top-p) among them; the rest get -inf.

    Args:
      logits: [B, V] float32 (already divided by the temperature).
      top_k: [] int, tokens kept (0 = all).
      top_p: [] float, smallest set of most probable tokens whose probability (after
        top-k) reaches top_p (Holtzman et al. 2020); 1 keeps all, the first always stays.
    Returns:
      [B, V] logits, -inf outside the kept set (ties at a threshold are kept).
    """
    V = logits.shape[-1]
    keys = _order_keys(logits)  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_top_k = keys >= _threshold(keys, jnp.ones_like(logits), k)  # [B, V]
    probs = jax.nn.softmax(jnp.where(in_top_k, logits, NEG_INF), axis=-1)  # [B, V]
    nucleus = keys >= _threshold(keys, probs, jnp.minimum(top_p, 1.0))  # [B, V]
    keep = in_top_k & (nucleus | (top_p >= 1.0))
    return jnp.where(keep, logits, NEG_INF)


def _choose(key, logits, temperature, top_k, top_p) -> jax.Array:
    """Next token [B] from logits [B, V]: argmax at temperature 0, else a filtered sample."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    filtered = jax.lax.cond(
        (top_k > 0) | (top_p < 1.0),  # skip the filter when there is nothing to filter
        lambda x: filter_logits(x, top_k, top_p),
        lambda x: x,
        scaled,
    )
    gumbel = jax.random.gumbel(key, logits.shape)  # argmax(logits + Gumbel) ~ softmax(logits)
    return jnp.where(temperature > 0, _argmax(filtered + gumbel), _argmax(logits))


def _prefill(step: Step, cache: nnx.State, prompts: jax.Array, prompt_lengths: jax.Array):
    """Feeds the prompts through the caches in one parallel pass instead of P steps.

    Every row's inputs at positions [0, P) (BOS, then its first P - 1 prompt tokens) are
    written at once, causal within the pass; then every cache index is set back to m =
    min(prompt_lengths), the positions whose inputs every row shares with the step-by-step
    loop. That loop goes on from m as it would have (forcing the longer rows' remaining
    prompt tokens): it rewrites positions m, ..., P - 1 before any query can see them (a
    step at t attends to positions <= t), so rows of any lengths come out the same.

    Args:
      step, cache: from `_start`, the caches still empty.
      prompts: [B, P] ids, P >= 1.
      prompt_lengths: [B] int32.
    Returns:
      (m [] int32, the input at position m [B] (BOS if m = 0, else prompt token m - 1),
      the caches with index m).
    """
    P = prompts.shape[1]
    inputs = jnp.pad(prompts, ((0, 0), (1, 0)), constant_values=BOS_ID)  # [B, P + 1]
    _, cache = step(cache, inputs[:, :P], 0)  # the logits go unused: XLA drops them
    m = prompt_lengths.min()
    cache = jax.tree.map(lambda x: x if x.ndim else m, cache)  # the scalar cache indices
    return m, jax.lax.dynamic_index_in_dim(inputs, m, axis=1, keepdims=False), cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=('max_length', 'prefill'))
def _sample(graphdef, state, prompts, prompt_lengths, key, settings, *, max_length, prefill):
    B, P = prompts.shape
    step, cache, _ = _start(graphdef, state, None, batch_size=B, copies=1, length=max_length)
    forced = jnp.pad(prompts, ((0, 0), (0, max_length - P)), constant_values=PAD_ID)  # [B, L]
    start, last = jnp.array(0, jnp.int32), jnp.full((B,), BOS_ID, jnp.int32)
    if prefill and P > 0:  # P = 0: nothing to prefill
        start, last, cache = _prefill(step, cache, prompts, prompt_lengths)

    def cond(carry):
        t, _, _, done, _ = carry
        return (t < max_length) & ~done.all()

    def body(carry):
        t, out, last, done, cache = carry
        logits, cache = step(cache, last, t)  # [B, V]
        logits = _mask_tokens(logits, False)
        sampled = _choose(jax.random.fold_in(key, t), logits, *settings)  # [B]
        in_prompt = t < prompt_lengths  # [B]: feed the prompt through the cache
        prompt_token = jax.lax.dynamic_index_in_dim(forced, t, axis=1, keepdims=False)
        token = jnp.where(in_prompt, prompt_token, jnp.where(done, PAD_ID, sampled))
        out = jax.lax.dynamic_update_index_in_dim(out, token, t, axis=1)  # [B, L]
        done = done | (~in_prompt & (token == EOS_ID)) | (t + 1 >= max_length)
        return t + 1, out, token, done, cache

    init = (
        start,
        jnp.where(jnp.arange(max_length) < start, forced, PAD_ID),  # [B, L], prefilled prompt
        last,
        jnp.zeros((B,), bool),
        cache,
    )
    return jax.lax.while_loop(cond, body, init)[1]


def sample(
    model: LanguageModel,
    prompts,
    prompt_lengths,
    *,
    max_length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prefill: bool = True,
) -> jax.Array:
    """Samples continuations of prompts from a LanguageModel.

    The prompts are first fed through the cache in one parallel pass (`_prefill`) over the
    positions every row's prompt covers, min(prompt_lengths); the longer rows' remaining
    prompt tokens are then fed one step at a time (forced), while each row past its prompt
    samples from softmax(logits / temperature), restricted to the top_k tokens and then to
    the top_p nucleus, until EOS or max_length. The step-t key is fold_in(PRNGKey(seed),
    t): the same seed gives the same tokens. temperature=0 (or top_k=1) is greedy
    decoding. Settings are traced, so changing them does not recompile.

    Args:
      model: a LanguageModel.
      prompts: [B, P] ids, left-aligned and right-padded with PAD_ID (no BOS).
      prompt_lengths: [B] int, each row's prompt length (0 samples from BOS alone).
      max_length: L >= P, length of the output including the prompt.
      prefill: False feeds the whole prompt step by step, the path prefill replaces (the
        same tokens, up to float rounding); kept to compare and measure the two.
    Returns:
      [B, L] int32: the prompt, then the sampled tokens up to and including EOS, then PAD.
    """
    graphdef, state = _split(model, LanguageModel)
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.shape[1] > max_length:
        raise ValueError(f'max_length={max_length} is shorter than the prompts ({prompts.shape}).')
    settings = (
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
    )
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != prompts.shape[:1] or lengths.max(initial=0) > prompts.shape[1]:
        raise ValueError(f'prompt_lengths {lengths} do not fit prompts of shape {prompts.shape}.')
    key = jax.random.key(seed)
    lengths = jnp.asarray(lengths, jnp.int32)
    return _sample(
        graphdef, state, prompts, lengths, key, settings, max_length=max_length, prefill=prefill
    )


def output_length(row: np.ndarray) -> int:
    """Tokens of a decoded row up to and including the first EOS (else its non-PAD tokens)."""
    eos = np.flatnonzero(row == EOS_ID)
    return int(eos[0]) + 1 if eos.size else int((row != PAD_ID).sum())
