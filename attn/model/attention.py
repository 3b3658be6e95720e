"""Scaled dot-product attention, Eq. (1) of the paper, as pure functions.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V                     (§3.2.1)

Dimension letters: B batch, T query (target) length, S key (source) length,
N heads, K query/key head size (d_k), H value head size (d_v).

Masks are boolean with True = may attend, shaped [B|1, N|1, T, S]. Masked logits
get the float32 minimum rather than -inf, so a row with every key masked gives a
uniform (finite) distribution instead of NaN, in any compute dtype.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

# 'reference': einsums (any backend, returns the weights); 'fused':
# jax.nn.dot_product_attention with JAX's choice of kernel; 'cudnn': the same, forced to
# cuDNN's fused kernel (NVIDIA GPUs, bfloat16/float16 compute).
Implementation = Literal['reference', 'fused', 'cudnn']
IMPLEMENTATIONS = ('reference', 'fused', 'cudnn')

# Finite "minus infinity" for masked logits; softmax is always taken in float32.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------- masks


def padding_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Mask of real (non-pad) query/key pairs.

    Args:
      query_valid: [B, T] bool, True at real query tokens.
      key_valid: [B, S] bool, True at real key tokens.
    Returns:
      [B, 1, T, S] bool.
    """
    return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def causal_mask(query_length: int, key_length: int | None = None) -> jax.Array:
    """Look-ahead mask of the decoder (§3.2.3): position i sees positions <= i.

    Returns:
      [1, 1, T, S] bool, lower triangular.
    """
    key_length = query_length if key_length is None else key_length
    rows = jnp.arange(query_length)[:, None]
    cols = jnp.arange(key_length)[None, :]
    return (cols <= rows)[None, None]


def segment_mask(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """Mask for packed rows: attend only within the same example.

    Segment ids are 1, 2, ... for the examples packed into a row and 0 for padding,
    so this mask is also the padding mask.

    Args:
      query_segments: [B, T] int.
      key_segments: [B, S] int.
    Returns:
      [B, 1, T, S] bool.
    """
    same = query_segments[:, None, :, None] == key_segments[:, None, None, :]
    return same & (key_segments[:, None, None, :] != 0)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the given masks (None entries are ignored), broadcast."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    combined = masks[0]
    for mask in masks[1:]:
        combined = combined & mask
    return combined


# ------------------------------------------------------------------------- attention


def attention_weights(query: jax.Array, key: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)) with masking, in float32.

    Args:
      query: [B, T, N, K].
      key: [B, S, N, K].
      mask: [B|1, N|1, T, S] bool or None.
    Returns:
      [B, N, T, S] float32 probabilities; each row sums to 1.
    """
    scale = query.shape[-1] ** -0.5  # §3.2.1: counteract large dot products
    logits = jnp.einsum('BTNK,BSNK->BNTS', query, key, preferred_element_type=jnp.float32)
    logits = logits * scale  # [B, N, T, S]
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


def reference_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Eq. (1) written out with einsums; also returns the probabilities.

    Args:
      query: [B, T, N, K].
      key: [B, S, N, K].
      value: [B, S, N, H].
      mask: [B|1, N|1, T, S] bool or None.
      dropout_rate: dropout on the probabilities (not in the paper; off by default).
      dropout_rng: key for that dropout; required when dropout_rate > 0.
    Returns:
      ([B, T, N, H] in value's dtype, [B, N, T, S] float32 probabilities).
    """
    probs = attention_weights(query, key, mask)  # [B, N, T, S]
    weights = probs
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError('reference_attention: dropout_rate > 0 needs a dropout_rng.')
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        weights = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    # Head-major out, then [B, T, N, H]: on XLA:CPU the product written straight into
    # [B, T, N, H] took 17x longer (a decoding step over a cached [B, N, L, H]).
    out = jnp.einsum('BNTS,BSNH->BNTH', weights.astype(value.dtype), value)
    out = out.transpose(0, 2, 1, 3)  # [B, T, N, H]
    return out, probs


def fused_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    implementation: Literal['xla', 'cudnn'] | None = None,
) -> jax.Array:
    """Eq. (1) through `jax.nn.dot_product_attention` (XLA, or cuDNN's fused kernel).

    The fused kernels need one head size for query, key and value. When d_k != d_v
    (Table 3 row B) the smaller side is zero-padded, which is exact: zeros add
    nothing to Q K^T, padded value columns are sliced off, and the scale stays
    1/sqrt(d_k).

    Args:
      query: [B, T, N, K].
      key: [B, S, N, K].
      value: [B, S, N, H].
      mask: [B|1, N|1, T, S] bool or None.
      implementation: passed through; None lets JAX choose (XLA today).
    Returns:
      [B, T, N, H].
    """
    qk_dim, v_dim = query.shape[-1], value.shape[-1]
    width = max(qk_dim, v_dim)

    def pad(x):
        return jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])

    out = jax.nn.dot_product_attention(
        pad(query),
        pad(key),
        pad(value),
        mask=mask,
        scale=qk_dim**-0.5,
        implementation=implementation,
    )  # [B, T, N, max(K, H)]
    return out[..., :v_dim]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    implementation: Implementation = 'reference',
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_weights: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Eq. (1) by the chosen implementation. Shapes as in `reference_attention`.

    The fused kernels neither return the probabilities nor drop them out: asking for
    the weights runs the reference path whatever `implementation` is, and attention
    dropout needs the reference implementation.

    Returns:
      [B, T, N, H]; with return_weights also the [B, N, T, S] float32 probabilities.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f'Unknown attention implementation {implementation!r}; use one of {IMPLEMENTATIONS}.'
        )
    if implementation == 'reference' or return_weights:
        out, probs = reference_attention(
            query, key, value, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng
        )
        return (out, probs) if return_weights else out
    if dropout_rate > 0.0:
        raise ValueError(
            'The fused attention kernel has no attention dropout; set '
            'attention_dropout_rate=0 or use the reference implementation.'
        )
    kernel = 'cudnn' if implementation == 'cudnn' else None
    return fused_attention(query, key, value, mask, implementation=kernel)
