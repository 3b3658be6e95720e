"""The Transformer (§3, Figure 1) and a decoder-only language model, in Flax NNX.

Dimension letters: B batch, S source length, T target length, D d_model, V vocabulary.
Token ids 0..3 are reserved: PAD, UNK, BOS, EOS (the tokenizer uses the same ids).
Packed rows carry segment ids (1, 2, ... per example, 0 = padding) and positions
(restarting at 0 per example); attention never crosses examples.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attn import attention as attention_lib
from attn import layers

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NUM_SPECIAL_TOKENS = 4

POSITIONS = ('sinusoidal', 'learned')
DTYPES = ('float32', 'bfloat16', 'float16')
# What a training forward pass keeps for the backward pass, per layer: everything
# ('none'), only the layer's input ('full'), or the outputs of its dense projections
# ('dots': attention scores, softmax, dropout and norms are recomputed).
REMAT = ('none', 'full', 'dots')


class ConfigError(ValueError):
    """A setting that cannot work; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of `Transformer` and `LanguageModel` (paper base by default)."""

    vocab_size: int = 37000  # shared source/target vocabulary (§5.1)
    num_layers: int = 6  # N: layers in the encoder and in the decoder
    emb_dim: int = 512  # d_model
    num_heads: int = 8  # h
    qk_dim: int | None = None  # d_k per head; None derives emb_dim // num_heads
    v_dim: int | None = None  # d_v per head; None derives emb_dim // num_heads
    mlp_dim: int = 2048  # d_ff
    dropout_rate: float = 0.1  # P_drop on sub-layer outputs and embedding sums (§5.4)
    attention_dropout_rate: float = 0.0  # dropout on attention probabilities (not in paper)
    positions: str = 'sinusoidal'  # or 'learned' (Table 3 row E)
    max_len: int = 512  # rows of each learned position table (encoder, decoder)
    pre_ln: bool = False  # True: x + Sublayer(LayerNorm(x)) and a final LayerNorm
    share_embeddings: bool = True  # one matrix for encoder and decoder input (§3.4)
    tie_output: bool = True  # pre-softmax projection = target embedding^T (§3.4)
    attention: str = 'reference'  # 'reference' (einsum), 'fused' or 'cudnn' (attention.py)
    dtype: str = 'float32'  # compute dtype; parameters are always float32
    remat: str = 'none'  # recompute activations in the backward pass: one of REMAT

    def __post_init__(self):
        for name in ('vocab_size', 'num_layers', 'emb_dim', 'num_heads', 'mlp_dim', 'max_len'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f'model.{name}={value!r} must be a positive integer.')
        if self.vocab_size <= NUM_SPECIAL_TOKENS:
            raise ConfigError(
                f'model.vocab_size={self.vocab_size} leaves no room beside the '
                f'{NUM_SPECIAL_TOKENS} special tokens (pad, unk, bos, eos); '
                'use a larger vocabulary (the paper: ~37000).'
            )
        for name in ('qk_dim', 'v_dim'):
            value = getattr(self, name)
            if value is None and self.emb_dim % self.num_heads:
                divisors = [h for h in range(1, self.emb_dim + 1) if self.emb_dim % h == 0]
                raise ConfigError(
                    f'model.num_heads={self.num_heads} does not divide '
                    f'model.emb_dim={self.emb_dim}, so model.{name} cannot be derived '
                    f'as emb_dim // num_heads. Pick num_heads from {divisors[:12]} '
                    'or set model.qk_dim and model.v_dim explicitly.'
                )
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f'model.{name}={value!r} must be a positive integer or None.')
        for name in ('dropout_rate', 'attention_dropout_rate'):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(
                    f'model.{name}={value} must be in [0, 1): it is the probability of '
                    'dropping a unit (the paper uses 0.1).'
                )
        _check_choice('positions', self.positions, POSITIONS)
        _check_choice('attention', self.attention, attention_lib.IMPLEMENTATIONS)
        _check_choice('dtype', self.dtype, DTYPES)
        _check_choice('remat', self.remat, REMAT)
        if self.positions == 'sinusoidal' and self.emb_dim % 2:
            raise ConfigError(
                f'model.emb_dim={self.emb_dim} must be even for sinusoidal positions '
                '(sine/cosine pairs, §3.5); use an even emb_dim or model.positions="learned".'
            )
        if self.attention != 'reference' and self.attention_dropout_rate > 0:
            raise ConfigError(
                f'model.attention="{self.attention}" has no attention dropout; set '
                'model.attention_dropout_rate=0 or model.attention="reference".'
            )
        if self.attention == 'cudnn' and self.dtype == 'float32':
            raise ConfigError(
                'model.attention="cudnn" needs half-precision compute; set '
                'model.dtype="bfloat16" (or "float16"), or model.attention="fused".'
            )

    @property
    def head_qk_dim(self) -> int:
        return self.qk_dim if self.qk_dim is not None else self.emb_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.v_dim if self.v_dim is not None else self.emb_dim // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> ModelConfig:
        """Builds from a dict (e.g. `config.model`), naming unknown fields and near misses."""
        known = [f.name for f in dataclasses.fields(cls)]
        for name in fields:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f' Did you mean model.{close[0]}?' if close else f' Known fields: {known}.'
                raise ConfigError(f'Unknown model field model.{name}.{hint}')
        return cls(**fields)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f'model.{name}={value!r} is not one of {choices}.')


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

    def __call__(self, tokens, positions, *, deterministic, rngs) -> jax.Array:
        """tokens, positions: [B, T] -> [B, T, D]."""
        x = self.embed(tokens)  # [B, T, D], already x sqrt(d_model)
        if self.learned is not None:
            check_learned_length(self.learned, positions.shape[-1], 'the inputs have')
            pe = self.learned(positions)
        else:
            pe = layers.sinusoidal_positions(positions, self.emb_dim)
        return self.dropout(x + pe.astype(x.dtype), deterministic=deterministic, rngs=rngs)


def _attention(cfg: ModelConfig, rngs: nnx.Rngs) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(
        cfg.emb_dim,
        cfg.num_heads,
        cfg.head_qk_dim,
        cfg.head_v_dim,
        attention_dropout_rate=cfg.attention_dropout_rate,
        implementation=cfg.attention,
        dtype=cfg.compute_dtype,
        rngs=rngs,
    )


def _residual(cfg: ModelConfig, rngs: nnx.Rngs) -> layers.Residual:
    return layers.Residual(
        cfg.emb_dim, cfg.dropout_rate, pre_ln=cfg.pre_ln, dtype=cfg.compute_dtype, rngs=rngs
    )


def _final_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm | None:
    """Pre-LN stacks end with a LayerNorm; post-LN ones are already normalized."""
    if not cfg.pre_ln:
        return None
    return nnx.LayerNorm(cfg.emb_dim, epsilon=1e-6, dtype=cfg.compute_dtype, rngs=rngs)


def _layer_caller(remat: str, deterministic: bool, **kwargs):
    """`call(layer, *args, rngs)`: runs a layer, under `nnx.remat` when training asks
    for it (only a training pass has a backward pass to save memory for)."""

    def call(layer, *args):
        *args, rngs = args
        return layer(*args, deterministic=deterministic, rngs=rngs, **kwargs)

    if remat == 'none' or deterministic:
        return call
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == 'dots' else None
    # Only variable values (the dropout stream's count) leave the call, no graph changes.
    return nnx.remat(call, policy=policy, graph_updates=False)


# ----------------------------------------------------------------------------- layers


class EncoderLayer(nnx.Module):
    """Self-attention, then a position-wise FFN, each in a residual block (§3.1)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.self_attention = _attention(cfg, rngs)
        self.self_attention_residual = _residual(cfg, rngs)
        self.feed_forward = layers.FeedForward(
            cfg.emb_dim, cfg.mlp_dim, dtype=cfg.compute_dtype, rngs=rngs
        )
        self.feed_forward_residual = _residual(cfg, rngs)

    def __call__(self, x, mask, *, deterministic=True, rngs=None) -> jax.Array:
        """x: [B, S, D]; mask: [B, 1, S, S] -> [B, S, D]."""
        x = self.self_attention_residual(
            x,
            lambda h: self.self_attention(h, h, mask, deterministic=deterministic, rngs=rngs),
            deterministic=deterministic,
            rngs=rngs,
        )
        return self.feed_forward_residual(
            x, self.feed_forward, deterministic=deterministic, rngs=rngs
        )


class DecoderLayer(nnx.Module):
    """Masked self-attention, encoder-decoder attention (unless decoder-only), FFN (§3.1)."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool = True, rngs: nnx.Rngs):
        self.self_attention = _attention(cfg, rngs)
        self.self_attention_residual = _residual(cfg, rngs)
        if cross_attention:
            self.cross_attention = _attention(cfg, rngs)
            self.cross_attention_residual = _residual(cfg, rngs)
        else:
            self.cross_attention = self.cross_attention_residual = None
        self.feed_forward = layers.FeedForward(
            cfg.emb_dim, cfg.mlp_dim, dtype=cfg.compute_dtype, rngs=rngs
        )
        self.feed_forward_residual = _residual(cfg, rngs)

    def __call__(
        self,
        y,
        self_mask,
        encoded=None,
        cross_mask=None,
        *,
        deterministic=True,
        rngs=None,
        decode=False,
    ) -> jax.Array:
        """y: [B, T, D]; self_mask: [B, 1, T, T] (decode: [B, 1, 1, L] or None);
        encoded: [B, S, D]; cross_mask: [B, 1, T, S] -> [B, T, D]."""
        y = self.self_attention_residual(
            y,
            lambda h: self.self_attention(
                h, h, self_mask, deterministic=deterministic, rngs=rngs, decode=decode
            ),
            deterministic=deterministic,
            rngs=rngs,
        )
        if self.cross_attention is not None:
            y = self.cross_attention_residual(
                y,
                lambda h: self.cross_attention(
                    h, encoded, cross_mask, deterministic=deterministic, rngs=rngs, decode=decode
                ),
                deterministic=deterministic,
                rngs=rngs,
            )
        return self.feed_forward_residual(
            y, self.feed_forward, deterministic=deterministic, rngs=rngs
        )


# ----------------------------------------------------------------------------- stacks


class Encoder(nnx.Module):
    """Embedding + positions, N encoder layers."""

    def __init__(self, cfg: ModelConfig, embed: layers.Embed, *, rngs: nnx.Rngs):
        self.embedder = _Embedder(cfg, embed, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _final_norm(cfg, rngs)
        self.remat = cfg.remat

    def __call__(
        self, tokens, segments=None, positions=None, *, deterministic=True, rngs=None
    ) -> jax.Array:
        """tokens, segments, positions: [B, S] -> encoded [B, S, D]."""
        segments, positions = _segments_and_positions(tokens, segments, positions)
        mask = attention_lib.segment_mask(segments, segments)  # [B, 1, S, S]
        x = self.embedder(tokens, positions, deterministic=deterministic, rngs=rngs)
        call = _layer_caller(self.remat, deterministic)
        for layer in self.layers:
            x = call(layer, x, mask, rngs)
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
        if cfg.tie_output:
            self.logits_dense = None
        else:
            self.logits_dense = nnx.Linear(
                cfg.emb_dim, cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, rngs=rngs
            )

    def init_cache(self, batch_size: int, max_length: int, encoded=None) -> None:
        """Caches for decode=True calls: every self-attention's keys/values (filled one
        position per call) and, given `encoded` [B, S, D], the source's keys/values of
        every encoder-decoder attention (projected once here)."""
        if self.embedder.learned is not None:
            check_learned_length(self.embedder.learned, max_length, 'decoding caches')
        for layer in self.layers:
            layer.self_attention.init_cache(batch_size, max_length)
            if layer.cross_attention is not None and encoded is not None:
                layer.cross_attention.init_cross_cache(encoded)

    def __call__(
        self,
        decoder_inputs,
        segments=None,
        positions=None,
        encoded=None,
        encoder_segments=None,
        *,
        deterministic=True,
        rngs=None,
        decode=False,
        project=True,
    ) -> jax.Array:
        """Logits of the next token at each position.

        Args:
          decoder_inputs: [B, T] ids (targets shifted right; with decode=True one step, T=1).
          segments, positions: [B, T]; with decode=True `positions` must hold the step.
          encoded: [B, S, D] encoder output (None for a decoder-only model, or with
            decode=True once `init_cache` has projected it).
          encoder_segments: [B, S] segment ids of the source.
          project: False returns the final hidden states instead of the logits.
        Returns:
          [B, T, V] logits (or [B, T, D] hidden states: `logits` projects them).
        """
        segments, positions = _segments_and_positions(decoder_inputs, segments, positions)
        if decode:
            self_mask = None  # the cache masks positions not yet written
        else:
            self_mask = attention_lib.combine_masks(
                attention_lib.segment_mask(segments, segments),
                attention_lib.causal_mask(decoder_inputs.shape[1]),
            )  # [B, 1, T, T]
        cross_mask = None
        if encoder_segments is not None:
            cross_mask = attention_lib.segment_mask(segments, encoder_segments)  # [B, 1, T, S]
        y = self.embedder(decoder_inputs, positions, deterministic=deterministic, rngs=rngs)
        call = _layer_caller(self.remat, deterministic, decode=decode)
        for layer in self.layers:
            y = call(layer, y, self_mask, encoded, cross_mask, rngs)
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

    def encode(self, inputs, inputs_segmentation=None, inputs_position=None, **kwargs):
        """inputs: [B, S] ids -> encoded [B, S, D]. kwargs: deterministic, rngs."""
        return self.encoder(inputs, inputs_segmentation, inputs_position, **kwargs)

    def decode(
        self,
        encoded,
        inputs,
        decoder_inputs,
        inputs_segmentation=None,
        targets_segmentation=None,
        targets_position=None,
        **kwargs,
    ):
        """Next-token logits [B, T, V] for `decoder_inputs` [B, T] given `encoded` [B, S, D].

        `inputs` [B, S] (the source ids) give the source padding when
        `inputs_segmentation` is None. kwargs: deterministic, rngs, decode, project.
        """
        if inputs_segmentation is None:
            inputs_segmentation = (inputs != PAD_ID).astype(jnp.int32)
        return self.decoder(
            decoder_inputs,
            targets_segmentation,
            targets_position,
            encoded,
            inputs_segmentation,
            **kwargs,
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
        kwargs = dict(deterministic=deterministic, rngs=rngs)
        encoded = self.encode(inputs, inputs_segmentation, inputs_position, **kwargs)
        decoder_inputs = shift_right(targets, targets_segmentation, targets_position)
        return self.decode(
            encoded,
            inputs,
            decoder_inputs,
            inputs_segmentation,
            targets_segmentation,
            targets_position,
            project=project,
            **kwargs,
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
            segmentation,
            position,
            deterministic=deterministic,
            rngs=rngs,
            project=project,
        )


MODELS = {'transformer': Transformer, 'lm': LanguageModel}


def build_model(kind: str, cfg: ModelConfig, seed: int = 0) -> Transformer | LanguageModel:
    """Builds a model by kind ('transformer' or 'lm') with parameters from `seed`."""
    if kind not in MODELS:
        raise ConfigError(f'config.model_kind={kind!r} is not one of {sorted(MODELS)}.')
    return MODELS[kind](cfg, rngs=nnx.Rngs(params=seed))
