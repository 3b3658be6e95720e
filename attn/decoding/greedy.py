"""Greedy search, and forced decoding (the same step over given inputs)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn.decoding import common
from attn.model import LanguageModel, Transformer
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID


@functools.partial(jax.jit, static_argnums=0)
def _forced_decode(graphdef, state, inputs, decoder_inputs):
    B, T = decoder_inputs.shape
    step, cache = common.start(graphdef, state, inputs, batch_size=B, length=T)

    def body(cache, xs):
        t, tokens = xs  # [], [B]
        logits, cache = step(cache, tokens[:, None], common.at_position(t, B))
        return cache, logits[:, 0]

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
    graphdef, state = common.split_model(model, LanguageModel if inputs is None else Transformer)
    if inputs is not None:
        inputs = jnp.asarray(inputs, jnp.int32)
    return _forced_decode(graphdef, state, inputs, jnp.asarray(decoder_inputs, jnp.int32))


@functools.partial(jax.jit, static_argnums=0, static_argnames=('max_extra_length',))
def _greedy(graphdef, state, inputs, min_length, *, max_extra_length):
    B, S = inputs.shape
    L = S + max_extra_length
    step, cache = common.start(graphdef, state, inputs, batch_size=B, length=L)
    limits = common.limits(inputs, max_extra_length)  # [B]

    def cond(carry):
        t, _, _, done, _ = carry
        return (t < L) & ~done.all()

    def body(carry):
        t, out, last, done, cache = carry
        logits, cache = step(cache, last[:, None], common.at_position(t, B))  # [B, 1, V]
        logits = common.mask_tokens(logits[:, 0], t < min_length)
        token = jnp.where(done, PAD_ID, common.argmax(logits))  # [B]
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
    graphdef, state = common.split_model(model, Transformer)
    inputs = jnp.asarray(inputs, jnp.int32)
    min_length = jnp.asarray(min_length, jnp.int32)
    return _greedy(graphdef, state, inputs, min_length, max_extra_length=max_extra_length)
