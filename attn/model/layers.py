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


class DecodeCache(nnx.Cache):
    """Self-attention keys/values of the positions decoded so far, and the next position."""


class BeamSlots(DecodeCache):
    """Beam search: the slot holding each cached position's keys/values, per hypothesis.

    Keys/values are written once, into the slot of the hypothesis that fed the position,
    and never move; when beams are reordered only this [B * beams, L] table follows its
    hypotheses (the search's reorder), not every layer's key/value cache (`init_cache`).
    """


class SourceCache(nnx.Cache):
    """Encoder-decoder attention: the source's keys/values, projected once per batch."""


class MultiHeadAttention(nnx.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)                         (§3.2.2)

    Query/key and value head sizes are independent (Table 3 row B changes d_k
    alone). Projections have no bias, as in the paper's equations.

    One method per way of attending:
      `__call__(inputs_q, inputs_kv)`: every query position at once (training, scoring);
      `append_and_attend(inputs_q)`: self-attention of one decoding step (or of a
        prefill's several positions) over the positions decoded so far (after `init_cache`);
      `attend_to_source(inputs_q)`: one decoding step of encoder-decoder attention over
        the source projected by `init_cross_cache`.
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
        self.cache_key: DecodeCache | None = nnx.data(None)
        self.cache_value: DecodeCache | None = nnx.data(None)
        self.cache_slots: BeamSlots | None = nnx.data(None)
        self.cache_index: DecodeCache | None = nnx.data(None)
        self.source_key: SourceCache | None = nnx.data(None)
        self.source_value: SourceCache | None = nnx.data(None)

    # ------------------------------------------------------------------ projections

    def _queries(self, inputs_q: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, N, K]."""
        x_q, w_q = inputs_q.astype(self.dtype), self.query[...].astype(self.dtype)
        return jnp.einsum('BTD,DNK->BTNK', x_q, w_q)

    def _keys_values(self, inputs_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, S, D] -> keys [B, S, N, K], values [B, S, N, H]."""
        x_kv, dtype = inputs_kv.astype(self.dtype), self.dtype
        key = jnp.einsum('BSD,DNK->BSNK', x_kv, self.key[...].astype(dtype))  # [B, S, N, K]
        value = jnp.einsum('BSD,DNH->BSNH', x_kv, self.value[...].astype(dtype))  # [B, S, N, H]
        return key, value

    def _attend(self, query, key, value, mask, dropout_rate=0.0, dropout_rng=None) -> jax.Array:
        """Eq. (1) per head, the head gates, then W^O: query [B, T, N, K], key [B, S, N, K],
        value [B, S, N, H], mask [B|1, N|1, T, S] or None -> [B, T, D]."""
        kwargs = dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
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

    # -------------------------------------------------------------- full attention

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        *,
        mask: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Attends from every position of `inputs_q` [B, T, D] to `inputs_kv` [B, S, D].

        Args:
          mask: [B|1, N|1, T, S] bool, True = may attend.
          deterministic: False applies attention dropout (if configured).
          rngs: provides the 'dropout' stream when not deterministic.
        Returns:
          [B, T, D].
        """
        query = self._queries(inputs_q)
        key, value = self._keys_values(inputs_kv)
        dropout_rate = 0.0 if deterministic else self.attention_dropout_rate
        dropout_rng = rngs.dropout() if dropout_rate > 0.0 else None
        return self._attend(query, key, value, mask, dropout_rate, dropout_rng)

    # ------------------------------------------------------------ cached decoding

    def init_cache(self, batch_size: int, max_length: int, *, beams: int = 1) -> None:
        """Self-attention: an empty key/value cache, filled by `append_and_attend` calls
        (one position per decoding step, several per prefill).

        Caches are stored head-major, keys [B, N, K, L * beams] and values
        [B, N, L * beams, H], position-major with one slot per beam (entry l * beams + k is
        position l of slot k): a step's rows R = B * beams are sentence-major (row
        b * beams + k is beam k of sentence b) and write their keys/values into their own
        slot, one contiguous block per step; `cache_slots` [R, L] says which slot holds
        each position of each row's history (its own, until a beam search reorders the
        rows). Both are the layouts of the step's products (queries x keys, probabilities
        x values): on CPU, keys stored [..., L * beams, K] made queries x keys 3x slower.
        """
        _, N, K = self.key.shape
        H = self.value.shape[-1]
        J = max_length * beams
        self.cache_key = DecodeCache(jnp.zeros((batch_size, N, K, J), self.dtype))
        self.cache_value = DecodeCache(jnp.zeros((batch_size, N, J, H), self.dtype))
        slots = jnp.broadcast_to(jnp.arange(beams, dtype=jnp.int32)[:, None], (beams, max_length))
        self.cache_slots = BeamSlots(jnp.tile(slots, (batch_size, 1)))  # [R, L]
        self.cache_index = DecodeCache(jnp.array(0, jnp.int32))

    def append_and_attend(self, inputs_q: jax.Array) -> jax.Array:
        """Self-attention through the cache: writes the keys/values of T new positions at the
        cache index and attends from each to every position written up to and including
        itself (causal by construction, §3.2.3). T = 1 is one decoding step; T > 1 fills
        several positions in one parallel pass (a prompt's prefill). The caller keeps the
        index + T within the cache length L (the write would be clamped).

        The queries of a sentence's beams attend together, to all its slots at once, each
        masked to its own history (`cache_slots`): every cached key/value is read once per
        sentence, not once per beam. Each query scores all L x beams keys, beams - 1 of every
        beams masked, so the products grow as beams^2 (cheap at the paper's beam of 4).

        Args:
          inputs_q: [R, T, D], the decoder stream at positions index, ..., index + T - 1
            (R = B * beams rows, as in `init_cache`).
        Returns:
          [R, T, D].
        """
        if self.cache_index is None:
            raise ValueError('append_and_attend needs init_cache(batch_size, max_length) first.')
        R, T, D = inputs_q.shape
        L = self.cache_slots.shape[1]
        B, N = self.cache_key.shape[:2]
        beams = self.cache_value.shape[2] // L
        if T > L:
            raise ValueError(f'append_and_attend: {T} positions do not fit a cache of {L}.')
        if R != B * beams:
            raise ValueError(
                f'append_and_attend: {R} rows, but the cache holds {beams} beams of {B} sentences.'
            )
        key, value = self._keys_values(inputs_q)  # [R, T, N, *]
        index = self.cache_index[...]

        def block(x):  # [R, T, N, *] -> [B, N, T * beams, *]: every slot's new positions
            x = x.reshape(B, beams, T, N, -1).transpose(0, 3, 2, 1, 4)
            return x.reshape(B, N, T * beams, -1)

        key, value = block(key), block(value)
        at = index * beams
        self.cache_key[...] = jax.lax.dynamic_update_slice(
            self.cache_key[...], key.transpose(0, 1, 3, 2), (0, 0, 0, at)
        )  # [B, N, K, L * beams]
        self.cache_value[...] = jax.lax.dynamic_update_slice(
            self.cache_value[...], value, (0, 0, at, 0)
        )  # [B, N, L * beams, H]
        own = jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32)[:, None] % beams, (R, T))
        slots = jax.lax.dynamic_update_slice(self.cache_slots[...], own, (0, index))  # [R, L]
        self.cache_slots[...] = slots
        self.cache_index[...] = index + T
        # Query t of row r sits at position index + t and sees the positions up to that one,
        # each in the slot its history holds it in.
        written = jnp.arange(L)[None, :] <= index + jnp.arange(T)[:, None]  # [T, L]
        mine = slots[:, :, None] == jnp.arange(beams)  # [R, L, beams]
        mask = written[None, :, :, None] & mine[:, None]  # [R, T, L, beams]
        mask = mask.reshape(B, 1, beams * T, L * beams)  # queries and keys of a sentence
        keys = self.cache_key[...].transpose(0, 3, 1, 2)  # [B, L * beams, N, K]
        values = self.cache_value[...].transpose(0, 2, 1, 3)  # [B, L * beams, N, H]
        out = self._attend(
            self._queries(inputs_q).reshape(B, beams * T, N, -1), keys, values, mask
        )  # [B, beams * T, D]
        return out.reshape(R, T, D)

    def grow_cache(self, max_length: int) -> None:
        """Lengthens the self-attention cache to `max_length` positions, keeping what is
        written (position-major: the new positions go at the end of every slot's range).
        A search grows it in phases, so that attention reads only the phase's length."""
        L = self.cache_slots.shape[1]
        if max_length < L:
            raise ValueError(f"grow_cache: {max_length} positions < the cache's {L}.")
        extra = (max_length - L) * (self.cache_value.shape[2] // L)  # positions x beams
        key = jnp.pad(self.cache_key[...], ((0, 0), (0, 0), (0, 0), (0, extra)))
        value = jnp.pad(self.cache_value[...], ((0, 0), (0, 0), (0, extra), (0, 0)))
        self.cache_key, self.cache_value = DecodeCache(key), DecodeCache(value)
        self.cache_slots = BeamSlots(jnp.pad(self.cache_slots[...], ((0, 0), (0, max_length - L))))

    def init_cross_cache(self, inputs_kv: jax.Array) -> None:
        """Encoder-decoder attention: the keys/values of the source `inputs_kv` [B, S, D],
        projected once for every `attend_to_source` call of this batch."""
        key, value = self._keys_values(inputs_kv)  # [B, S, N, *]
        self.source_key = SourceCache(key.transpose(0, 2, 3, 1))  # [B, N, K, S], as the cache's
        self.source_value = SourceCache(value.transpose(0, 2, 1, 3))  # [B, N, S, H]

    def attend_to_source(self, inputs_q: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """One decoding step of encoder-decoder attention over the cached source.

        The rows may hold several beams per sentence (R = B * beams, sentence-major, B the
        cached source's rows); a sentence's beams attend together, so the source is read
        once per sentence.

        Args:
          inputs_q: [R, T, D] decoder positions (one per step when decoding).
          mask: [B|1, 1, 1, S] bool, the source's padding.
        Returns:
          [R, T, D].
        """
        if self.source_key is None:
            raise ValueError('attend_to_source needs init_cross_cache(encoded) first.')
        B = self.source_key.shape[0]
        R, T, D = inputs_q.shape
        if R % B:
            raise ValueError(
                f'The cached source has {B} rows but the decoder step has {R}, not a '
                f"multiple: init_cross_cache(encoded) with this batch's encoder output first."
            )
        out = self._attend(
            self._queries(inputs_q).reshape(B, R // B * T, *self.query.shape[1:]),
            self.source_key[...].transpose(0, 3, 1, 2),  # [B, S, N, K]
            self.source_value[...].transpose(0, 2, 1, 3),  # [B, S, N, H]
            mask,
        )  # [B, beams * T, D]
        return out.reshape(R, T, D)


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


class ResidualNorm(nnx.Module):
    """The LayerNorm of one residual connection (§3.1): after the addition,
    LayerNorm(x + Dropout(Sublayer(x))) (post-LN, the paper), or on the sub-layer's
    input, x + Dropout(Sublayer(LayerNorm(x))) (pre-LN). The layers in model.py write
    the connection out; this module holds the norm, so that its parameters are
    `<sub-layer>_residual.norm.{scale,bias}` in the state (the names checkpoints hold)."""

    def __init__(self, emb_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(emb_dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
