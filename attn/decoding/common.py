"""What every search shares: the model's step through its caches, token masks, lengths.

Every search is one compiled program: the encoder runs once per batch, the source's
keys/values are projected once (`Transformer.init_cache`), and a `jax.lax.while_loop`
carries the self-attention caches (`KVCache`s) from step to step. The model is split into
graphdef + state (`nnx.split`) and merged inside the step, so nothing here mutates the
caller's model. Jitted functions take the graphdef as a static argument, so repeated calls
with the same shapes and settings do not recompile.

Outputs are [B, L] target ids without BOS, up to and including EOS, then PAD. For the
Transformer L = S + max_extra_length (S: the batch's padded source length) and sentence
b stops after len_b + max_extra_length tokens, len_b its source length without padding
(the paper: "maximum output length to input length + 50", §6.1). PAD and BOS are never
produced (PAD pads the output, BOS only starts it); scores remain the model's log-probs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn.model import LanguageModel, Transformer
from attn.model.layers import KVCache
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID

# Beam and sampling scores never pass through a softmax, so -inf is exact and safe here:
# -inf + finite = -inf marks dead hypotheses (and suppressed tokens) for good.
NEG_INF = float('-inf')

# step(caches, tokens [B, T], positions [B, T], self_mask) -> (logits [B, T, V], caches)
Step = Callable[..., tuple[jax.Array, list[KVCache]]]


def split_model(model: Transformer | LanguageModel, kind: type):
    """(graphdef, state) of `model`, which must be a `kind`."""
    if not isinstance(model, kind):
        raise TypeError(f'Expected a {kind.__name__}, got {type(model).__name__}.')
    return nnx.split(model)


def start(
    graphdef,
    state,
    inputs,
    *,
    batch_size: int,
    length: int,
    width: int = 1,
    cross_attention: bool = False,
):
    """Runs the encoder once, builds the caches and returns the one-step function.

    Args:
      graphdef, state: `nnx.split(model)` of a Transformer or LanguageModel.
      inputs: [B, S] source ids, or None for a LanguageModel.
      batch_size: B.
      length: positions in each self-attention cache.
      width: cache entries per position (`Decoder.init_cache`).
      cross_attention: the step also returns every decoder layer's encoder-decoder
        attention probabilities, [B, N, T, S] each (a list over layers).
    Returns:
      (step, caches): the self-attention caches, one `KVCache` per layer, and
      `step(caches, tokens [B, T], positions [B, T], self_mask=None) -> (logits [B, T, V]
      float32, caches[, probabilities])`, which feeds T more positions (the source's caches
      are constant and stay inside it).
    """
    model = nnx.merge(graphdef, state)
    if inputs is None:
        caches = model.init_cache(batch_size, length, width=width)
    else:
        caches = model.init_cache(inputs, length, width=width)
    # Fixes the source caches' layout before the loop: without the barrier XLA:CPU carried
    # them untransposed and transposed every layer's keys/values again at every step.
    sources = jax.lax.optimization_barrier([c['source'] for c in caches])

    def extend(m, selves, tokens, positions, self_mask):
        cache = [{'self': s, 'source': c} for s, c in zip(selves, sources, strict=True)]
        kwargs = {} if inputs is None else {'inputs': inputs}
        logits, cache = m.extend(
            tokens, positions=positions, cache=cache, self_mask=self_mask, **kwargs
        )
        return logits.astype(jnp.float32), [c['self'] for c in cache]

    def step(selves, tokens, positions, self_mask=None):
        m = nnx.merge(graphdef, state)
        if not cross_attention:
            return extend(m, selves, tokens, positions, self_mask)
        for layer in m.decoder.layers:  # this step's copy of the model only
            layer.cross_attention.capture_weights = True
        (logits, selves), captured = nnx.capture(extend, nnx.Intermediate)(
            m, selves, tokens, positions, self_mask
        )
        layers = captured['decoder']['layers']
        probs = [layers[i]['cross_attention']['attention_weights'][0] for i in sorted(layers)]
        return logits, selves, probs

    return step, [c['self'] for c in caches]


def at_position(t: jax.Array, rows: int, width: int = 1) -> jax.Array:
    """[rows, width] positions, all t (one step of `width` side-by-side entries)."""
    return jnp.full((rows, width), t, jnp.int32)


def limits(inputs: jax.Array, max_extra_length: int) -> jax.Array:
    """Per-sentence output length limit: source length without padding + extra. [B]."""
    return (inputs != PAD_ID).sum(axis=1).astype(jnp.int32) + max_extra_length


def mask_tokens(logits: jax.Array, suppress_eos: jax.Array) -> jax.Array:
    """Never PAD (the output's padding) or BOS (only starts); EOS not while `suppress_eos`.

    Args:
      logits: [..., V] logits or log-probs; masked entries become -inf.
      suppress_eos: [] bool.
    """
    ids = jnp.arange(logits.shape[-1])
    masked = (ids == PAD_ID) | (ids == BOS_ID) | ((ids == EOS_ID) & suppress_eos)
    return jnp.where(masked, NEG_INF, logits)  # elementwise, so it fuses into its readers


def argmax(x: jax.Array) -> jax.Array:
    """First index of the maximum over the last axis of x [..., V] -> [...] int32.

    Same result as jnp.argmax, which XLA:CPU runs as a variadic reduction ~5x slower.
    """
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == x.max(axis=-1, keepdims=True), ids, x.shape[-1]), axis=-1)


def length_penalty(length: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, Eq. 14)."""
    return ((5.0 + length) / 6.0) ** alpha


def output_length(row: np.ndarray) -> int:
    """Tokens of a decoded row up to and including the first EOS (else its non-PAD tokens)."""
    eos = np.flatnonzero(row == EOS_ID)
    return int(eos[0]) + 1 if eos.size else int((row != PAD_ID).sum())
