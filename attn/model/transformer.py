"""The Transformer (§3, Figure 1) and a decoder-only language model, in Flax NNX.

Dimension letters: B batch, S source length, T target length, D d_model, V vocabulary.
Token ids 0..3 are reserved: PAD, UNK, BOS, EOS (`attn.model.tokens`, shared with the tokenizer).
Packed rows carry segment ids (1, 2, ... per example, 0 = padding) and positions
(restarting at 0 per example); attention never crosses examples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from attn.errors import ConfigError
from attn.model import attention as attention_lib
from attn.model import layers
from attn.model.config import ModelConfig
from attn.model.tokens import BOS_ID, PAD_ID

# ---------------------------------------------------------------------------- helpers


def shift_right(
    tokens: jax.Array, segments: jax.Array | None = None, positions: jax.Array | None = None
) -> jax.Array:
    """Decoder inputs: targets shifted one position right, BOS at each example start.

    Args:
      tokens: [B, T] target ids.
      segments: [B, T] segment ids of packed rows (0 = padding) or None.
      positions: [B, T] positions within each example, or None for one example per row.
    Returns:
      [B, T] ids; predicting `tokens` from them is the auto-regressive task (§3.2.3).
    """
    shifted = jnp.pad(tokens, ((0, 0), (1, 0)), constant_values=PAD_ID)[:, :-1]  # [B, T]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    shifted = jnp.where(positions == 0, BOS_ID, shifted)
    if segments is not None:
        shifted = jnp.where(segments == 0, PAD_ID, shifted)
    return shifted


def _segments_and_positions(tokens, segments, positions):
    """Defaults for unpacked rows: segment 1 at real tokens, positions 0..T-1."""
    if segments is None:
        segments = (tokens != PAD_ID).astype(jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return segments, positions


def logits_from(hidden: jax.Array, matrix: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Pre-softmax projection: hidden [B, T, D] x matrix [V, D] -> logits [B, T, V],
    computed in `dtype`."""
    return jnp.einsum('BTD,VD->BTV', hidden.astype(dtype), matrix.astype(dtype))


def check_learned_length(table: layers.LearnedPositions, length: int, what: str) -> None:
    """Raises unless `length` positions fit in the learned table (at trace time: shapes are
    static). Past the table a gather reads out of bounds and gives NaN, silently."""
    max_len = table.embedding.shape[0]
    if length > max_len:
        raise ConfigError(
            f'{what} {length} positions but model.positions="learned" has only '
            f'model.max_len={max_len} rows. Raise model.max_len to at least {length} (a new '
            'model: the table is a parameter) or shorten the inputs (data.max_length; for '
            'translation, decoding needs the source length padded to a power of two plus '
            'decode.max_extra_length).'
        )


class _Embedder(nnx.Module):
    """Token embedding (shared or not) + positional encoding, then dropout (§3.4, §3.5, §5.4)."""

    def __init__(self, cfg: ModelConfig, embed: layers.Embed, *, rngs: nnx.Rngs):
        self.embed = embed
        self.learned = (
            layers.LearnedPositions(cfg.max_len, cfg.emb_dim, rngs=rngs)
            if cfg.positions == 'learned'
            else None
        )
        self.dropout = nnx.Dropout(cfg.dropout_rate)
        self.emb_dim = cfg.emb_dim
        # positions='none': no positional encoding; a causal decoder still tells positions
        # apart through its mask (Haviv et al. 2022), an encoder cannot (`Transformer`).
        self.sinusoids = cfg.positions == 'sinusoidal'

    def __call__(self, tokens, *, positions, deterministic, rngs) -> jax.Array:
        """tokens, positions: [B, T] -> [B, T, D]."""
        x = self.embed(tokens)  # [B, T, D], already x sqrt(d_model)
        if self.learned is not None:
            check_learned_length(self.learned, positions.shape[-1], 'the inputs have')
            x = x + self.learned(positions).astype(x.dtype)
        elif self.sinusoids:
            x = x + layers.sinusoidal_positions(positions, self.emb_dim).astype(x.dtype)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


def _attention(cfg: ModelConfig, rngs: nnx.Rngs) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(
        cfg.emb_dim,
        cfg.num_heads,
        cfg.head_qk_dim,
        cfg.head_v_dim,
        attention_dropout_rate=cfg.attention_dropout_rate,
        implementation=cfg.attention,
        qk_norm=cfg.norm if cfg.qk_norm else None,
        num_kv_heads=cfg.num_kv_heads,
        dtype=cfg.compute_dtype,
        rngs=rngs,
    )


def _residual(cfg: ModelConfig, rngs: nnx.Rngs) -> layers.ResidualNorm:
    return layers.ResidualNorm(cfg.emb_dim, norm=cfg.norm, dtype=cfg.compute_dtype, rngs=rngs)


def _feed_forward(cfg: ModelConfig, rngs: nnx.Rngs) -> layers.FeedForward:
    return layers.FeedForward(
        cfg.emb_dim, cfg.ffn_dim, kind=cfg.ffn, dtype=cfg.compute_dtype, rngs=rngs
    )


def _final_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module | None:
    """Pre-LN stacks end with a LayerNorm; post-LN ones are already normalized."""
    if not cfg.pre_ln:
        return None
    return layers.make_norm(cfg.norm, cfg.emb_dim, dtype=cfg.compute_dtype, rngs=rngs)


# What each remat setting saves of a layer's forward pass ('full': only its input).
_REMAT_POLICIES = {'full': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _layer_pass(layer_type: type, remat: str, deterministic: bool):
    """`layer_type.__call__` for one pass of a stack, under `nnx.remat` when a training
    pass asks for it (only a training pass has a backward pass to save memory for)."""
    call = functools.partial(layer_type.__call__, deterministic=deterministic)
    if remat == 'none' or deterministic:
        return call
    # Only variable values (the dropout stream's count) leave the call, no graph changes.
    return nnx.remat(call, policy=_REMAT_POLICIES[remat], graph_updates=False)


# ----------------------------------------------------------------------------- layers


class EncoderLayer(nnx.Module):
    """Self-attention, then a position-wise FFN, each in a residual connection (§3.1):
    x = LayerNorm(x + Dropout(Sublayer(x))); with pre_ln x = x + Dropout(Sublayer(LayerNorm(x)))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.self_attention = _attention(cfg, rngs)
        self.self_attention_residual = _residual(cfg, rngs)
        self.feed_forward = _feed_forward(cfg, rngs)
        self.feed_forward_residual = _residual(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate)
        self.pre_ln = cfg.pre_ln

    def __call__(self, x, *, mask, deterministic=True, rngs=None) -> jax.Array:
        """x: [B, S, D]; mask: [B, 1, S, S] -> [B, S, D]."""
        drop = functools.partial(self.dropout, deterministic=deterministic, rngs=rngs)
        norm_1, norm_2 = self.self_attention_residual.norm, self.feed_forward_residual.norm
        # Sub-layer 1: multi-head self-attention (§3.2.2).
        h = norm_1(x) if self.pre_ln else x
        h, _ = self.self_attention(h, h, mask=mask, deterministic=deterministic, rngs=rngs)
        x = x + drop(h) if self.pre_ln else norm_1(x + drop(h))
        # Sub-layer 2: position-wise feed-forward network (§3.3).
        h = self.feed_forward(norm_2(x) if self.pre_ln else x)
        return x + drop(h) if self.pre_ln else norm_2(x + drop(h))


class DecoderLayer(nnx.Module):
    """Masked self-attention, encoder-decoder attention (unless decoder-only) and a
    position-wise FFN, each in a residual connection as in `EncoderLayer` (§3.1)."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool = True, rngs: nnx.Rngs):
        self.self_attention = _attention(cfg, rngs)
        self.self_attention_residual = _residual(cfg, rngs)
        if cross_attention:
            self.cross_attention = _attention(cfg, rngs)
            self.cross_attention_residual = _residual(cfg, rngs)
        else:
            self.cross_attention = self.cross_attention_residual = None
        self.feed_forward = _feed_forward(cfg, rngs)
        self.feed_forward_residual = _residual(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate)
        self.pre_ln = cfg.pre_ln

    def __call__(
        self,
        y,
        *,
        self_mask=None,
        encoded=None,
        cross_mask=None,
        deterministic=True,
        rngs=None,
        cache: dict | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """y: [B, T, D] -> ([B, T, D], the layer's cache with the new positions, or None).

        Args:
          self_mask: [B|1, 1, T, T] ([B|1, 1, T, L] with a cache; None: its causal mask).
          encoded: [B, S, D] encoder output (None with a cache: its keys/values are in it).
          cross_mask: [B|1, 1, T, S].
          cache: {'self': KVCache, 'source': KVCache or None} of `Decoder.init_cache`: T
            more positions, written into the self-attention cache.
        """
        drop = functools.partial(self.dropout, deterministic=deterministic, rngs=rngs)
        train = dict(deterministic=deterministic, rngs=rngs)
        new_cache = None if cache is None else dict(cache)
        # Sub-layer 1: masked self-attention, over the targets so far (§3.2.3).
        norm = self.self_attention_residual.norm
        h = norm(y) if self.pre_ln else y
        h, self_cache = self.self_attention(
            h, h, mask=self_mask, cache=None if cache is None else cache['self'], **train
        )
        if cache is not None:
            new_cache['self'] = self_cache
        y = y + drop(h) if self.pre_ln else norm(y + drop(h))
        # Sub-layer 2: encoder-decoder attention, queries from the decoder (§3.2.3).
        if self.cross_attention is not None:
            norm = self.cross_attention_residual.norm
            h = norm(y) if self.pre_ln else y
            source = None if cache is None else cache['source']
            kv = encoded if source is None else None
            h, _ = self.cross_attention(h, kv, mask=cross_mask, cache=source, **train)
            y = y + drop(h) if self.pre_ln else norm(y + drop(h))
        # Sub-layer 3: position-wise feed-forward network (§3.3).
        norm = self.feed_forward_residual.norm
        h = self.feed_forward(norm(y) if self.pre_ln else y)
        return (y + drop(h) if self.pre_ln else norm(y + drop(h))), new_cache


# ----------------------------------------------------------------------------- stacks


class Encoder(nnx.Module):
    """Embedding + positions, N encoder layers."""

    def __init__(self, cfg: ModelConfig, embed: layers.Embed, *, rngs: nnx.Rngs):
        self.embedder = _Embedder(cfg, embed, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _final_norm(cfg, rngs)
        self.remat = cfg.remat

    def __call__(
        self, tokens, *, segments=None, positions=None, deterministic=True, rngs=None
    ) -> jax.Array:
        """tokens, segments, positions: [B, S] -> encoded [B, S, D]."""
        segments, positions = _segments_and_positions(tokens, segments, positions)
        mask = attention_lib.segment_mask(segments, segments)  # [B, 1, S, S]
        x = self.embedder(tokens, positions=positions, deterministic=deterministic, rngs=rngs)
        layer_pass = _layer_pass(EncoderLayer, self.remat, deterministic)
        for layer in self.layers:
            x = layer_pass(layer, x, mask=mask, rngs=rngs)
        return x if self.final_norm is None else self.final_norm(x)


class Decoder(nnx.Module):
    """Embedding + positions, N decoder layers, pre-softmax projection."""

    def __init__(
        self,
        cfg: ModelConfig,
        embed: layers.Embed,
        *,
        cross_attention: bool = True,
        rngs: nnx.Rngs,
    ):
        self.embedder = _Embedder(cfg, embed, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, cross_attention=cross_attention, rngs=rngs)
                for _ in range(cfg.num_layers)
            ]
        )
        self.final_norm = _final_norm(cfg, rngs)
        self.remat = cfg.remat
        self.attends_to_source = cross_attention
        if cfg.tie_output:
            self.logits_dense = None
        else:
            self.logits_dense = nnx.Linear(
                cfg.emb_dim, cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, rngs=rngs
            )

    def __call__(
        self,
        decoder_inputs,
        *,
        segments=None,
        positions=None,
        encoded=None,
        encoder_segments=None,
        deterministic=True,
        rngs=None,
        project=True,
    ) -> jax.Array:
        """Logits of the next token at every position (teacher forcing).

        Args:
          decoder_inputs: [B, T] ids (targets shifted right).
          segments, positions: [B, T].
          encoded: [B, S, D] encoder output (None for a decoder-only model).
          encoder_segments: [B, S] segment ids of the source.
          project: False returns the final hidden states instead of the logits.
        Returns:
          [B, T, V] logits (or [B, T, D] hidden states: `logits` projects them).
        """
        segments, positions = _segments_and_positions(decoder_inputs, segments, positions)
        self_mask = attention_lib.combine_masks(
            attention_lib.segment_mask(segments, segments),
            attention_lib.causal_mask(decoder_inputs.shape[1]),
        )  # [B, 1, T, T]
        cross_mask = None
        if encoder_segments is not None:
            cross_mask = attention_lib.segment_mask(segments, encoder_segments)  # [B, 1, T, S]
        y = self.embedder(
            decoder_inputs, positions=positions, deterministic=deterministic, rngs=rngs
        )
        layer_pass = _layer_pass(DecoderLayer, self.remat, deterministic)
        for layer in self.layers:
            y, _ = layer_pass(
                layer, y, self_mask=self_mask, encoded=encoded, cross_mask=cross_mask, rngs=rngs
            )
        return self._finish(y, project)

    def init_cache(
        self, batch_size: int, max_length: int, *, encoded=None, width: int = 1
    ) -> list[dict]:
        """The caches `extend` reads and returns, one per layer: {'self': an empty KVCache of
        max_length x width entries, 'source': the keys/values of this batch's source
        `encoded` [B, S, D], projected once (None for a decoder-only model)}. Refusing to
        run without `encoded` keeps another batch's source from being attended to.

        `width` > 1 leaves room for that many entries per position: a beam search writes
        its hypotheses' keys/values side by side, `width` per step."""
        if self.attends_to_source and encoded is None:
            raise ValueError(
                'Decoder.init_cache: this decoder attends to a source; pass encoded=[B, S, D], '
                'the encoder output of the batch to decode.'
            )
        if not self.attends_to_source and encoded is not None:
            raise ValueError('Decoder.init_cache: a decoder-only model takes no `encoded`.')
        if encoded is not None and encoded.shape[0] != batch_size:
            raise ValueError(
                f'Decoder.init_cache: encoded has {encoded.shape[0]} rows, not {batch_size}.'
            )
        self.check_positions(max_length)
        return [
            {
                'self': layer.self_attention.empty_cache(batch_size, max_length * width),
                'source': layer.cross_attention.project(encoded) if encoded is not None else None,
            }
            for layer in self.layers
        ]

    def check_positions(self, length: int) -> None:
        """Raises unless decoding `length` positions fits the positional encoding (a learned
        table has max_len rows; sinusoids fit any length)."""
        if self.embedder.learned is not None:
            check_learned_length(self.embedder.learned, length, 'decoding caches')

    def extend(
        self, tokens, *, positions, cache: list[dict], self_mask=None, source_valid=None
    ) -> tuple[jax.Array, list[dict]]:
        """Logits of the next token after T more positions, through the caches: one per
        decoding step, or a prompt's at once (a prefill; causal within the T).

        Args:
          tokens: [B, T] the next inputs of each row (BOS first).
          positions: [B, T] their positions.
          cache: from `init_cache` or the last `extend`.
          self_mask: [B|1, 1, T, L] which self-attention cache entries each new position
            sees (None: the written ones, causally).
          source_valid: [B, S] bool, the source's real (non-PAD) tokens (None for a
            decoder-only model).
        Returns:
          ([B, T, V] logits, the caches with the T positions written).
        """
        cross_mask = None
        if source_valid is not None:
            cross_mask = source_valid[:, None, None, :]  # [B, 1, 1, S]
        y = self.embedder(tokens, positions=positions, deterministic=True, rngs=None)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            y, layer_cache = layer(y, self_mask=self_mask, cross_mask=cross_mask, cache=layer_cache)
            new_cache.append(layer_cache)
        return self._finish(y, project=True), new_cache

    def _finish(self, y: jax.Array, project: bool) -> jax.Array:
        """The final LayerNorm (pre-LN), then the logits unless `project` is False."""
        if self.final_norm is not None:
            y = self.final_norm(y)
        return self.logits(y) if project else y

    def output_matrix(self) -> jax.Array:
        """[V, D] pre-softmax projection (float32 parameters): the target embedding
        (tied, §3.4) or the decoder's own matrix."""
        if self.logits_dense is None:
            return self.embedder.embed.embedding[...]
        return self.logits_dense.kernel[...].T

    def logits(self, y: jax.Array) -> jax.Array:
        """Hidden states [B, T, D] -> next-token logits [B, T, V] in the compute dtype."""
        return logits_from(y, self.output_matrix(), self.embedder.embed.dtype)


# ----------------------------------------------------------------------------- models


class Transformer(nnx.Module):
    """The encoder-decoder model of the paper (Figure 1)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.positions == 'none':
            raise ConfigError(
                'model.positions="none" leaves the encoder without any order (self-attention '
                'is permutation-invariant): use it with config.model_kind="lm", or give '
                'model.positions="sinusoidal" or "learned".'
            )
        self.config = cfg
        dtype = cfg.compute_dtype
        source_embed = layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=dtype, rngs=rngs)
        target_embed = (
            source_embed
            if cfg.share_embeddings
            else layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=dtype, rngs=rngs)
        )
        self.encoder = Encoder(cfg, source_embed, rngs=rngs)
        self.decoder = Decoder(cfg, target_embed, rngs=rngs)

    def encode(
        self,
        inputs,
        *,
        inputs_segmentation=None,
        inputs_position=None,
        deterministic=True,
        rngs=None,
    ) -> jax.Array:
        """inputs: [B, S] ids (segmentation, positions: [B, S]) -> encoded [B, S, D]."""
        return self.encoder(
            inputs,
            segments=inputs_segmentation,
            positions=inputs_position,
            deterministic=deterministic,
            rngs=rngs,
        )

    def init_cache(self, inputs, max_length: int, *, width: int = 1) -> list[dict]:
        """Encodes `inputs` [B, S] once and returns the decoder's caches for `extend`
        (`Decoder.init_cache`)."""
        encoded = self.encode(inputs)  # [B, S, D]
        return self.decoder.init_cache(inputs.shape[0], max_length, encoded=encoded, width=width)

    def extend(self, tokens, *, positions, cache, inputs, self_mask=None):
        """(Logits [B, T, V], caches) after `tokens` [B, T] at `positions` [B, T], through
        the caches of `init_cache`; the source ids `inputs` [B, S] give the source padding
        (`Decoder.extend`)."""
        return self.decoder.extend(
            tokens,
            positions=positions,
            cache=cache,
            self_mask=self_mask,
            source_valid=inputs != PAD_ID,
        )

    def __call__(
        self,
        inputs,
        targets,
        inputs_segmentation=None,
        targets_segmentation=None,
        inputs_position=None,
        targets_position=None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        project: bool = True,
    ) -> jax.Array:
        """Teacher-forced logits [B, T, V] for `targets` [B, T] given `inputs` [B, S]
        (project=False: the decoder's final hidden states [B, T, D])."""
        train = dict(deterministic=deterministic, rngs=rngs)
        encoded = self.encode(
            inputs,
            inputs_segmentation=inputs_segmentation,
            inputs_position=inputs_position,
            **train,
        )
        decoder_inputs = shift_right(targets, targets_segmentation, targets_position)
        if inputs_segmentation is None:
            inputs_segmentation = (inputs != PAD_ID).astype(jnp.int32)
        return self.decoder(
            decoder_inputs,
            segments=targets_segmentation,
            positions=targets_position,
            encoded=encoded,
            encoder_segments=inputs_segmentation,
            project=project,
            **train,
        )


class LanguageModel(nnx.Module):
    """Decoder-only Transformer: masked self-attention and FFN layers, no encoder."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        embed = layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.compute_dtype, rngs=rngs)
        self.decoder = Decoder(cfg, embed, cross_attention=False, rngs=rngs)

    def __call__(
        self,
        tokens,
        segmentation=None,
        position=None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        project: bool = True,
    ) -> jax.Array:
        """Logits [B, T, V] predicting each of `tokens` [B, T] from the ones before it
        (project=False: the final hidden states [B, T, D])."""
        decoder_inputs = shift_right(tokens, segmentation, position)
        return self.decoder(
            decoder_inputs,
            segments=segmentation,
            positions=position,
            deterministic=deterministic,
            rngs=rngs,
            project=project,
        )

    def init_cache(self, batch_size: int, max_length: int, *, width: int = 1) -> list[dict]:
        """The decoder's caches for `extend` (`Decoder.init_cache`)."""
        return self.decoder.init_cache(batch_size, max_length, width=width)

    def extend(self, tokens, *, positions, cache, self_mask=None):
        """(Logits [B, T, V], caches) after `tokens` [B, T] at `positions` [B, T] (T = 1 per
        decoding step, more for a prompt's prefill; `Decoder.extend`)."""
        return self.decoder.extend(tokens, positions=positions, cache=cache, self_mask=self_mask)


MODELS = {'transformer': Transformer, 'lm': LanguageModel}


def build_model(kind: str, cfg: ModelConfig, seed: int = 0) -> Transformer | LanguageModel:
    """Builds a model by kind ('transformer' or 'lm') with parameters from `seed`."""
    if kind not in MODELS:
        raise ConfigError(f'config.model_kind={kind!r} is not one of {sorted(MODELS)}.')
    return MODELS[kind](cfg, rngs=nnx.Rngs(params=seed))
