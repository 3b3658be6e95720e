"""The Transformer's building blocks as Flax NNX modules (§3.2-§3.5).

Parameters are float32; `dtype` is the compute dtype. Dimension letters: B batch,
T query length, S key length, N heads, K query/key head size (d_k), H value head
size (d_v), D d_model, F d_ff, V vocabulary, L cache length.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attn.model import attention as attention_lib


class HeadMask(nnx.Variable):
    """Per-head gates xi_h multiplying each head's output (Michel et al., 2019).

    Ones by default (every head on); not trained. Set an entry to 0 to ablate a
    head, or differentiate the loss with respect to it for head importance.
    """


def _xavier(rngs: nnx.Rngs, fan_in: int, fan_out: int, shape: tuple[int, ...]) -> jax.Array:
    """Glorot-uniform init of a [fan_in, fan_out] matrix, reshaped to `shape`."""
    kernel = nnx.initializers.xavier_uniform()(rngs.params(), (fan_in, fan_out), jnp.float32)
    return kernel.reshape(shape)


class KVCache(NamedTuple):
    """Keys and values of the entries attended to so far, and where the next one goes: the
    decoder's self-attention cache (one entry per position, or `width` per position when
    several hypotheses of a row write side by side, as a beam search's do), or a source
    projected once for encoder-decoder attention (every entry written).

    Stored head-major, keys [B, N, K, L] and values [B, N, L, H]: the layouts of the
    step's two products (queries x keys, probabilities x values). On CPU, keys stored
    [B, L, N, K] made queries x keys 3x slower.
    """

    keys: jax.Array  # [B, N, K, L]
    values: jax.Array  # [B, N, L, H]
    index: jax.Array  # [] int32, entries written

    @classmethod
    def empty(cls, batch_size: int, length: int, num_heads: int, qk_dim: int, v_dim: int, dtype):
        """`length` free entries for `batch_size` rows."""
        N, K, H = num_heads, qk_dim, v_dim
        return cls(
            jnp.zeros((batch_size, N, K, length), dtype),
            jnp.zeros((batch_size, N, length, H), dtype),
            jnp.array(0, jnp.int32),
        )

    @classmethod
    def full(cls, keys: jax.Array, values: jax.Array) -> KVCache:
        """A cache holding keys [B, S, N, K] and values [B, S, N, H], every entry written."""
        S = keys.shape[1]
        return cls(
            keys.transpose(0, 2, 3, 1), values.transpose(0, 2, 1, 3), jnp.array(S, jnp.int32)
        )

    @property
    def length(self) -> int:
        return self.values.shape[2]

    def append(self, keys: jax.Array, values: jax.Array) -> KVCache:
        """Writes T new entries, keys [B, T, N, K] and values [B, T, N, H], at the index.
        The caller keeps index + T within the length (the write would be clamped)."""
        at = self.index
        return KVCache(
            jax.lax.dynamic_update_slice(self.keys, keys.transpose(0, 2, 3, 1), (0, 0, 0, at)),
            jax.lax.dynamic_update_slice(self.values, values.transpose(0, 2, 1, 3), (0, 0, at, 0)),
            at + keys.shape[1],
        )

    def causal_mask(self, new: int) -> jax.Array:
        """[1, 1, T, L]: the T = `new` entries about to be appended each see the written
        ones and themselves up to their own (causal by construction, §3.2.3)."""
        written = jnp.arange(self.length)[None, :] <= self.index + jnp.arange(new)[:, None]
        return written[None, None]

    def grow(self, length: int) -> KVCache:
        """The same cache with room for `length` entries (the new ones at the end)."""
        if length < self.length:
            raise ValueError(f"KVCache.grow: {length} entries < the cache's {self.length}.")
        extra = length - self.length
        return KVCache(
            jnp.pad(self.keys, ((0, 0), (0, 0), (0, 0), (0, extra))),
            jnp.pad(self.values, ((0, 0), (0, 0), (0, extra), (0, 0))),
            self.index,
        )

    def attended(self) -> tuple[jax.Array, jax.Array]:
        """(keys [B, L, N, K], values [B, L, N, H]) as attention takes them."""
        return self.keys.transpose(0, 3, 1, 2), self.values.transpose(0, 2, 1, 3)


class MultiHeadAttention(nnx.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)                         (§3.2.2)

    Query/key and value head sizes are independent (Table 3 row B changes d_k
    alone). Projections have no bias, as in the paper's equations. The module holds
    parameters only: a decoding cache (`KVCache`) goes in and comes out of `__call__`.
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
        qk_norm: str | None = None,
        num_kv_heads: int | None = None,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        D, N, K, H = emb_dim, num_heads, qk_dim, v_dim
        # G key/value heads (grouped-query attention, Ainslie et al. 2023; G = 1 multi-query,
        # Shazeer 2019): query heads [g N/G, (g + 1) N/G) share key/value head g, and caches
        # hold G heads. None: G = N, the paper.
        G = N if num_kv_heads is None else num_kv_heads
        self.query = nnx.Param(_xavier(rngs, D, N * K, (D, N, K)))  # W^Q [D, N, K]
        self.key = nnx.Param(_xavier(rngs, D, G * K, (D, G, K)))  # W^K [D, G, K]
        self.value = nnx.Param(_xavier(rngs, D, G * H, (D, G, H)))  # W^V [D, G, H]
        self.out = nnx.Param(_xavier(rngs, N * H, D, (N, H, D)))  # W^O [N, H, D]
        self.head_mask = HeadMask(jnp.ones((N,), jnp.float32))
        # QK-norm (Dehghani et al. 2023): `qk_norm` ('layernorm' or 'rmsnorm') normalizes
        # each head's query and key over d_k before their product, a scale per dimension
        # shared by the heads.
        norms = (
            [make_norm(qk_norm, K, dtype=dtype, rngs=rngs) for _ in range(2)]
            if qk_norm
            else [None] * 2
        )
        self.query_norm, self.key_norm = norms
        self.attention_dropout_rate = attention_dropout_rate
        self.implementation = implementation
        self.dtype = dtype
        # Set True (e.g. `model.set_attributes(capture_weights=True)`) to sow the
        # attention probabilities as nnx.Intermediate 'attention_weights' [B, N, T, S];
        # read them with `nnx.capture(model, nnx.Intermediate)(...)`.
        self.capture_weights = False

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None,
        *,
        mask: jax.Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attends from every position of `inputs_q` [B, T, D] to the keys/values of
        `inputs_kv` [B, S, D], or through a cache:

          cache=None: keys/values from inputs_kv (training, scoring, a whole pass);
          cache and inputs_kv: self-attention of T new positions: their keys/values are
            appended to the cache first, and mask defaults to `cache.causal_mask(T)`;
          cache, inputs_kv=None: attention over the cache as it is (a source projected
            once by `project`).

        Args:
          mask: [B|1, N|1, T, S] bool, True = may attend (S = the cache's length with one).
          deterministic: False applies attention dropout (if configured).
          rngs: provides the 'dropout' stream when not deterministic.
        Returns:
          ([B, T, D], the cache with the new entries, or None without one).
        """
        # Queries first: the backward pass then sums a self-attention input's three
        # gradients (through W^Q, W^K, W^V) in one fixed order, training's numbers.
        query = self._queries(inputs_q)  # [B, T, N, K]
        if cache is None:
            if inputs_kv is None:
                raise ValueError('MultiHeadAttention: give inputs_kv, a cache, or both.')
            key, value = self._keys_values(inputs_kv)  # [B, S, N, K], [B, S, N, H]
        else:
            if inputs_kv is not None:
                if mask is None:
                    mask = cache.causal_mask(inputs_kv.shape[1])
                cache = cache.append(*self._keys_values(inputs_kv))
            key, value = cache.attended()  # [B, L, N, K], [B, L, N, H]
        dropout_rate = 0.0 if deterministic else self.attention_dropout_rate
        dropout_rng = rngs.dropout() if dropout_rate > 0.0 else None
        return self._attend(query, key, value, mask, dropout_rate, dropout_rng), cache

    def project(self, inputs_kv: jax.Array) -> KVCache:
        """The keys/values of `inputs_kv` [B, S, D] as a full cache: a source projected once
        for every decoding step of encoder-decoder attention."""
        return KVCache.full(*self._keys_values(inputs_kv))

    def empty_cache(self, batch_size: int, length: int) -> KVCache:
        """An empty self-attention cache of `length` entries in this layer's shapes."""
        _, N, K = self.key.shape
        return KVCache.empty(batch_size, length, N, K, self.value.shape[-1], self.dtype)

    # ------------------------------------------------------------------ projections

    def _queries(self, inputs_q: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, N, K]."""
        x_q, w_q = inputs_q.astype(self.dtype), self.query[...].astype(self.dtype)
        query = jnp.einsum('BTD,DNK->BTNK', x_q, w_q)
        return query if self.query_norm is None else self.query_norm(query)

    def _keys_values(self, inputs_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, S, D] -> keys [B, S, G, K], values [B, S, G, H] (G key/value heads)."""
        x_kv, dtype = inputs_kv.astype(self.dtype), self.dtype
        key = jnp.einsum('BSD,DNK->BSNK', x_kv, self.key[...].astype(dtype))  # [B, S, N, K]
        value = jnp.einsum('BSD,DNH->BSNH', x_kv, self.value[...].astype(dtype))  # [B, S, N, H]
        return (key if self.key_norm is None else self.key_norm(key)), value

    def _attend(self, query, key, value, mask, dropout_rate=0.0, dropout_rng=None) -> jax.Array:
        """Eq. (1) per head, the head gates, then W^O: query [B, T, N, K], key [B, S, G, K],
        value [B, S, G, H], mask [B|1, N|1, T, S] or None -> [B, T, D]."""
        kwargs = dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
        group = query.shape[2] // key.shape[2]  # query heads per key/value head
        if group > 1:  # each key/value head serves its `group` consecutive query heads
            key, value = (jnp.repeat(x, group, axis=2) for x in (key, value))
        if self.capture_weights:
            out, probs = attention_lib.dot_product_attention(
                query, key, value, mask, return_weights=True, **kwargs
            )  # [B, T, N, H], [B, N, T, S]
            self.sow(nnx.Intermediate, 'attention_weights', probs)
        else:
            out = attention_lib.dot_product_attention(
                query, key, value, mask, implementation=self.implementation, **kwargs
            )  # [B, T, N, H]
        out = out * self.head_mask[...].astype(self.dtype)[:, None]  # gate each head
        # Concat(heads) W^O as one [B, T, N*H] x [N*H, D] product: written as an einsum over
        # (N, H), XLA:CPU copied W^O into another layout at every decoding step.
        B, T, N, H = out.shape
        out = out.reshape(B, T, N * H)
        return out @ self.out[...].astype(self.dtype).reshape(N * H, -1)  # [B, T, D]


# The gated feed-forwards' activations (Shazeer 2020): GELU exact, not tanh-approximated.
GATES = {'swiglu': jax.nn.silu, 'geglu': functools.partial(jax.nn.gelu, approximate=False)}


class FeedForward(nnx.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, applied at every position (§3.3); or gated
    (`kind` 'swiglu' or 'geglu', Shazeer 2020): (act(x W_1 + b_1) * (x V + c)) W_2 + b_2,
    act SiLU or GELU, V the value matrix `wv`."""

    def __init__(
        self,
        emb_dim: int,
        mlp_dim: int,
        *,
        kind: str = 'relu',
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.xavier_uniform()
        self.wi = nnx.Linear(emb_dim, mlp_dim, kernel_init=init, dtype=dtype, rngs=rngs)
        self.wv = (
            nnx.Linear(emb_dim, mlp_dim, kernel_init=init, dtype=dtype, rngs=rngs)
            if kind != 'relu'
            else None
        )
        self.wo = nnx.Linear(mlp_dim, emb_dim, kernel_init=init, dtype=dtype, rngs=rngs)
        self.kind = kind

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        if self.wv is None:
            return self.wo(jax.nn.relu(self.wi(x)))  # [B, T, F] inside
        return self.wo(GATES[self.kind](self.wi(x)) * self.wv(x))


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


class ResidualNorm(nnx.Module):
    """The LayerNorm of one residual connection (§3.1): after the addition,
    LayerNorm(x + Dropout(Sublayer(x))) (post-LN, the paper), or on the sub-layer's
    input, x + Dropout(Sublayer(LayerNorm(x))) (pre-LN). The layers in model.py write
    the connection out; this module holds the norm, so that its parameters are
    `<sub-layer>_residual.norm.{scale,bias}` in the state (the names checkpoints hold)."""

    def __init__(self, emb_dim: int, *, norm: str = 'layernorm', dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = make_norm(norm, emb_dim, dtype=dtype, rngs=rngs)


def make_norm(kind: str, emb_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm (the paper: scale and bias), or RMSNorm ('rmsnorm', Zhang & Sennrich 2019:
    x / sqrt(mean(x^2) + eps) * scale, no mean taken out, no bias); epsilon 1e-6."""
    if kind == 'rmsnorm':
        return nnx.RMSNorm(emb_dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
    return nnx.LayerNorm(emb_dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
