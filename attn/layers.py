"""The Transformer's building blocks as Flax NNX modules (§3.2-§3.5).

Parameters are float32; `dtype` is the compute dtype. Dimension letters: B batch,
T query length, S key length, N heads, K query/key head size (d_k), H value head
size (d_v), D d_model, F d_ff, V vocabulary, L cache length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn import attention as attention_lib


class HeadMask(nnx.Variable):
    """Per-head gates xi_h multiplying each head's output (Michel et al., 2019).

    Ones by default (every head on); not trained. Set an entry to 0 to ablate a
    head, or differentiate the loss with respect to it for head importance.
    """


def _xavier(rngs: nnx.Rngs, fan_in: int, fan_out: int, shape: tuple[int, ...]) -> jax.Array:
    """Glorot-uniform init of a [fan_in, fan_out] matrix, reshaped to `shape`."""
    kernel = nnx.initializers.xavier_uniform()(rngs.params(), (fan_in, fan_out), jnp.float32)
    return kernel.reshape(shape)


class MultiHeadAttention(nnx.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)                         (§3.2.2)

    Query/key and value head sizes are independent (Table 3 row B changes d_k
    alone). Projections have no bias, as in the paper's equations.
    """

    def __init__(
        self,
        emb_dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        *,
        attention_dropout_rate: float = 0.0,
        implementation: attention_lib.Implementation = 'reference',
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        D, N, K, H = emb_dim, num_heads, qk_dim, v_dim
        self.query = nnx.Param(_xavier(rngs, D, N * K, (D, N, K)))  # W^Q [D, N, K]
        self.key = nnx.Param(_xavier(rngs, D, N * K, (D, N, K)))  # W^K [D, N, K]
        self.value = nnx.Param(_xavier(rngs, D, N * H, (D, N, H)))  # W^V [D, N, H]
        self.out = nnx.Param(_xavier(rngs, N * H, D, (N, H, D)))  # W^O [N, H, D]
        self.head_mask = HeadMask(jnp.ones((N,), jnp.float32))
        self.attention_dropout_rate = attention_dropout_rate
        self.implementation = implementation
        self.dtype = dtype
        # Set True (e.g. `model.set_attributes(capture_weights=True)`) to sow the
        # attention probabilities as nnx.Intermediate 'attention_weights' [B, N, T, S];
        # read them with `nnx.capture(model, nnx.Intermediate)(...)`.
        self.capture_weights = False
        self.cache_key: nnx.Cache | None = nnx.data(None)
        self.cache_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int, max_length: int) -> None:
        """Self-attention: an empty key/value cache filled one position per decode call.

        Caches are stored head-major, [B, N, L, *]: writing one position and reading
        them back then needs no relayout of the whole cache at each step on CPU.
        """
        _, N, K = self.key.shape
        H = self.value.shape[-1]
        self.cache_key = nnx.Cache(jnp.zeros((batch_size, N, max_length, K), self.dtype))
        self.cache_value = nnx.Cache(jnp.zeros((batch_size, N, max_length, H), self.dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def init_cross_cache(self, inputs_kv: jax.Array) -> None:
        """Encoder-decoder attention: keys/values of the source [B, S, D], projected once.

        Decode calls then read them instead of projecting `inputs_kv` again (no cache
        index: nothing is appended).
        """
        x_kv, dtype = inputs_kv.astype(self.dtype), self.dtype
        key = jnp.einsum('BSD,DNK->BSNK', x_kv, self.key[...].astype(dtype))  # [B, S, N, K]
        value = jnp.einsum('BSD,DNH->BSNH', x_kv, self.value[...].astype(dtype))  # [B, S, N, H]
        self.cache_key = nnx.Cache(key.transpose(0, 2, 1, 3))  # [B, N, S, K]
        self.cache_value = nnx.Cache(value.transpose(0, 2, 1, 3))  # [B, N, S, H]
        self.cache_index = None

    def _append_to_cache(
        self, key: jax.Array, value: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes one step's key/value [B, 1, N, *] at the cache index.

        Returns the whole cache ([B, L, N, K], [B, L, N, H]) and the mask
        [1, 1, 1, L] of the positions written so far. (Stored as [B, N, L, *].)
        """
        if self.cache_key is None:
            raise ValueError('decode=True needs init_cache(batch_size, max_length) first.')
        if key.shape[1] != 1:
            raise ValueError(
                f'Incremental decoding takes one position per call, got {key.shape[1]}.'
            )
        index = self.cache_index[...]
        start = (0, 0, index, 0)
        cached_key = jax.lax.dynamic_update_slice(
            self.cache_key[...], key.transpose(0, 2, 1, 3), start
        )  # [B, N, L, K]
        cached_value = jax.lax.dynamic_update_slice(
            self.cache_value[...], value.transpose(0, 2, 1, 3), start
        )  # [B, N, L, H]
        self.cache_key[...] = cached_key
        self.cache_value[...] = cached_value
        self.cache_index[...] = index + 1
        written = jnp.arange(cached_key.shape[2]) <= index  # [L]
        return (
            cached_key.transpose(0, 2, 1, 3),  # [B, L, N, K]
            cached_value.transpose(0, 2, 1, 3),  # [B, L, N, H]
            written[None, None, None, :],
        )

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """Attends from `inputs_q` [B, T, D] to `inputs_kv` [B, S, D].

        Args:
          mask: [B|1, N|1, T, S] bool, True = may attend. With decode=True it
            covers the cache ([.., .., 1, L]) and is combined with the cache's own.
          deterministic: False applies attention dropout (if configured).
          rngs: provides the 'dropout' stream when not deterministic.
          decode: one query position per call over the cache: appended to for
            self-attention (`init_cache`), read for cross-attention (`init_cross_cache`).
        Returns:
          [B, T, D].
        """
        dtype = self.dtype
        query = jnp.einsum('BTD,DNK->BTNK', inputs_q.astype(dtype), self.query[...].astype(dtype))
        if decode and self.cache_key is not None and self.cache_index is None:
            key = self.cache_key[...].transpose(0, 2, 1, 3)  # projected source [B, S, N, K]
            value = self.cache_value[...].transpose(0, 2, 1, 3)  # [B, S, N, H]
        else:
            x_kv = inputs_kv.astype(dtype)
            key = jnp.einsum('BSD,DNK->BSNK', x_kv, self.key[...].astype(dtype))  # [B, S, N, K]
            value = jnp.einsum('BSD,DNH->BSNH', x_kv, self.value[...].astype(dtype))  # [B, S, N, H]
            if decode:
                key, value, written = self._append_to_cache(key, value)  # [B, L, N, *]
                mask = attention_lib.combine_masks(mask, written)

        dropout_rate = 0.0 if deterministic else self.attention_dropout_rate
        dropout_rng = rngs.dropout() if dropout_rate > 0.0 else None
        if self.capture_weights or self.implementation == 'reference':
            out, probs = attention_lib.reference_attention(
                query, key, value, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng
            )  # [B, T, N, H], [B, N, T, S]
            if self.capture_weights:
                self.sow(nnx.Intermediate, 'attention_weights', probs)
        else:
            out = attention_lib.dot_product_attention(
                query, key, value, mask, implementation=self.implementation
            )  # [B, T, N, H]
        out = out * self.head_mask[...].astype(dtype)[:, None]  # gate each head
        return jnp.einsum('BTNH,NHD->BTD', out, self.out[...].astype(dtype))  # [B, T, D]


class FeedForward(nnx.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, applied at every position (§3.3)."""

    def __init__(self, emb_dim: int, mlp_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.xavier_uniform()
        self.wi = nnx.Linear(emb_dim, mlp_dim, kernel_init=init, dtype=dtype, rngs=rngs)
        self.wo = nnx.Linear(mlp_dim, emb_dim, kernel_init=init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        return self.wo(jax.nn.relu(self.wi(x)))  # [B, T, F] inside


class Embed(nnx.Module):
    """Token embedding shared by encoder input, decoder input and the pre-softmax
    projection, multiplied by sqrt(d_model) on lookup (§3.4)."""

    def __init__(self, vocab_size: int, emb_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # std d_model^-0.5, so that lookups scaled by sqrt(d_model) have unit variance.
        init = nnx.initializers.normal(stddev=emb_dim**-0.5)
        self.embedding = nnx.Param(init(rngs.params(), (vocab_size, emb_dim), jnp.float32))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: [B, T] int -> [B, T, D]."""
        table = self.embedding[...]
        scale = math.sqrt(table.shape[-1])
        return (jnp.take(table, ids, axis=0) * scale).astype(self.dtype)


def sinusoidal_positions(positions: jax.Array, emb_dim: int) -> jax.Array:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (§3.5).

    Args:
      positions: [B, T] int, the position of each token within its example
        (restarting at 0 for each example of a packed row).
      emb_dim: d_model, even.
    Returns:
      [B, T, D] float32, sines at even and cosines at odd dimensions.
    """
    two_i = jnp.arange(0, emb_dim, 2, dtype=jnp.float32)  # [D/2]
    angles = positions[..., None].astype(jnp.float32) / (
        10000.0 ** (two_i / emb_dim)
    )  # [B, T, D/2]
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, T, D/2, 2]
    return pe.reshape(*positions.shape, emb_dim)  # [B, T, D], interleaved


class LearnedPositions(nnx.Module):
    """Learned positional embeddings, the alternative of Table 3 row E."""

    def __init__(self, max_len: int, emb_dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=emb_dim**-0.5)
        self.embedding = nnx.Param(init(rngs.params(), (max_len, emb_dim), jnp.float32))

    def __call__(self, positions: jax.Array) -> jax.Array:
        """positions: [B, T] int in [0, max_len) -> [B, T, D] float32."""
        return jnp.take(self.embedding[...], positions, axis=0)


class Residual(nnx.Module):
    """The residual connection around each sub-layer (§3.1, §5.4).

    Post-LN (paper): LayerNorm(x + Dropout(Sublayer(x))).
    Pre-LN (switch):  x + Dropout(Sublayer(LayerNorm(x))).
    """

    def __init__(
        self, emb_dim: int, dropout_rate: float, *, pre_ln: bool, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        self.norm = nnx.LayerNorm(emb_dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)
        self.pre_ln = pre_ln

    def __call__(self, x, sublayer, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        """x: [B, T, D]; sublayer maps [B, T, D] -> [B, T, D]."""
        if self.pre_ln:
            return x + self.dropout(sublayer(self.norm(x)), deterministic=deterministic, rngs=rngs)
        return self.norm(x + self.dropout(sublayer(x), deterministic=deterministic, rngs=rngs))
