"""Sampling from a language model: temperature, top-k and nucleus (top-p) filtering, and a
prompt's prefill (one parallel pass through the caches)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attn.decoding import common
from attn.decoding.common import NEG_INF
from attn.model import LanguageModel
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID


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
    # The most probable token always stays, so that no top_p (0 included) leaves none.
    first = keys == keys.max(axis=-1, keepdims=True)  # [B, V]
    keep = in_top_k & (nucleus | first | (top_p >= 1.0))
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
    return jnp.where(temperature > 0, common.argmax(filtered + gumbel), common.argmax(logits))


def prefill_prompts(step: common.Step, cache, prompts: jax.Array, prompt_lengths: jax.Array):
    """Feeds the prompts through the caches in one parallel pass instead of P steps.

    Every row's inputs at positions [0, P) (BOS, then its first P - 1 prompt tokens) are
    written at once, causal within the pass; then every cache index is set back to m =
    min(prompt_lengths), the positions whose inputs every row shares with the step-by-step
    loop. That loop goes on from m as it would have (forcing the longer rows' remaining
    prompt tokens): it rewrites positions m, ..., P - 1 before any query can see them (a
    step at t attends to positions <= t), so rows of any lengths come out the same.

    Args:
      step, cache: from `common.start`, the caches still empty.
      prompts: [B, P] ids, P >= 1.
      prompt_lengths: [B] int32.
    Returns:
      (m [] int32, the input at position m [B] (BOS if m = 0, else prompt token m - 1),
      the caches with index m).
    """
    B, P = prompts.shape
    inputs = jnp.pad(prompts, ((0, 0), (1, 0)), constant_values=BOS_ID)  # [B, P + 1]
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    _, cache = step(cache, inputs[:, :P], positions)  # the logits go unused: XLA drops them
    m = prompt_lengths.min()
    cache = [c._replace(index=m) for c in cache]
    return m, jax.lax.dynamic_index_in_dim(inputs, m, axis=1, keepdims=False), cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=('max_length', 'prefill'))
def _sample(graphdef, state, prompts, prompt_lengths, key, settings, *, max_length, prefill):
    B, P = prompts.shape
    step, cache = common.start(graphdef, state, None, batch_size=B, length=max_length)
    forced = jnp.pad(prompts, ((0, 0), (0, max_length - P)), constant_values=PAD_ID)  # [B, L]
    start, last = jnp.array(0, jnp.int32), jnp.full((B,), BOS_ID, jnp.int32)
    if prefill and P > 0:  # P = 0: nothing to prefill
        start, last, cache = prefill_prompts(step, cache, prompts, prompt_lengths)

    def cond(carry):
        t, _, _, done, _ = carry
        return (t < max_length) & ~done.all()

    def body(carry):
        t, out, last, done, cache = carry
        logits, cache = step(cache, last[:, None], common.at_position(t, B))  # [B, 1, V]
        logits = common.mask_tokens(logits[:, 0], False)
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

    The prompts are first fed through the cache in one parallel pass (`prefill_prompts`) over the
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
    graphdef, state = common.split_model(model, LanguageModel)
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
