"""`ModelConfig`: the hyperparameters of `Transformer` and `LanguageModel`, validated when
built, so that a setting that cannot work fails before anything is compiled, naming the
field and the fix. Free of any config library, so the model code imports it;
`attn.configs` builds it from an experiment config."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from attn.errors import ConfigError
from attn.model.attention import IMPLEMENTATIONS
from attn.model.tokens import NUM_SPECIAL_TOKENS

POSITIONS = ('sinusoidal', 'learned', 'none')
DTYPES = ('float32', 'bfloat16', 'float16')
# What a training forward pass keeps for the backward pass, per layer: everything
# ('none'), only the layer's input ('full'), or the outputs of its dense projections
# ('dots': attention scores, softmax, dropout and norms are recomputed).
REMAT = ('none', 'full', 'dots')
NORMS = ('layernorm', 'rmsnorm')
FFNS = ('relu', 'swiglu', 'geglu')


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
    positions: str = 'sinusoidal'  # or 'learned' (Table 3 row E), 'none' (language model)
    max_len: int = 512  # rows of each learned position table (encoder, decoder)
    pre_ln: bool = False  # True: x + Sublayer(LayerNorm(x)) and a final LayerNorm
    share_embeddings: bool = True  # one matrix for encoder and decoder input (§3.4)
    tie_output: bool = True  # pre-softmax projection = target embedding^T (§3.4)
    attention: str = 'reference'  # 'reference' (einsum), 'fused' or 'cudnn' (attention.py)
    dtype: str = 'float32'  # compute dtype; parameters are always float32
    remat: str = 'none'  # recompute activations in the backward pass: one of REMAT
    # Beyond 2017, each off by default (the paper's model):
    norm: str = 'layernorm'  # or 'rmsnorm' (Zhang & Sennrich 2019): every norm of the model
    ffn: str = 'relu'  # or 'swiglu' / 'geglu' (Shazeer 2020): gated, width `ffn_dim`
    qk_norm: bool = False  # True: each head's queries and keys normalized (by `norm`)
    num_kv_heads: int | None = None  # key/value heads: None = num_heads (paper), 1 = MQA

    def __post_init__(self):
        _check_sizes(self)
        _check_head_dims(self)
        _check_kv_heads(self)
        _check_rates(self)
        _check_choice('positions', self.positions, POSITIONS)
        _check_choice('attention', self.attention, IMPLEMENTATIONS)
        _check_choice('dtype', self.dtype, DTYPES)
        _check_choice('remat', self.remat, REMAT)
        _check_choice('norm', self.norm, NORMS)
        _check_choice('ffn', self.ffn, FFNS)
        _check_combinations(self)

    @property
    def ffn_dim(self) -> int:
        """The feed-forward's hidden width: mlp_dim (d_ff), or for a gated FFN, whose input
        side has two matrices, round(2/3 mlp_dim), so that its parameters stay those of
        d_ff (Shazeer 2020)."""
        return self.mlp_dim if self.ffn == 'relu' else max(1, round(2 * self.mlp_dim / 3))

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


def _check_sizes(cfg: ModelConfig) -> None:
    for name in ('vocab_size', 'num_layers', 'emb_dim', 'num_heads', 'mlp_dim', 'max_len'):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f'model.{name}={value!r} must be a positive integer.')
    if cfg.vocab_size <= NUM_SPECIAL_TOKENS:
        raise ConfigError(
            f'model.vocab_size={cfg.vocab_size} leaves no room beside the '
            f'{NUM_SPECIAL_TOKENS} special tokens (pad, unk, bos, eos); '
            'use a larger vocabulary (the paper: ~37000).'
        )


def _check_kv_heads(cfg: ModelConfig) -> None:
    G, N = cfg.num_kv_heads, cfg.num_heads
    if G is None:
        return
    if not isinstance(G, int) or G < 1 or N % G:
        divisors = [g for g in range(1, N + 1) if N % g == 0]
        raise ConfigError(
            f'model.num_kv_heads={G!r} must divide model.num_heads={N} (each key/value head '
            f'serves as many query heads): use one of {divisors}, or None for {N}.'
        )


def _check_head_dims(cfg: ModelConfig) -> None:
    for name in ('qk_dim', 'v_dim'):
        value = getattr(cfg, name)
        if value is None and cfg.emb_dim % cfg.num_heads:
            divisors = [h for h in range(1, cfg.emb_dim + 1) if cfg.emb_dim % h == 0]
            raise ConfigError(
                f'model.num_heads={cfg.num_heads} does not divide '
                f'model.emb_dim={cfg.emb_dim}, so model.{name} cannot be derived '
                f'as emb_dim // num_heads. Pick num_heads from {divisors[:12]} '
                'or set model.qk_dim and model.v_dim explicitly.'
            )
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f'model.{name}={value!r} must be a positive integer or None.')


def _check_rates(cfg: ModelConfig) -> None:
    for name in ('dropout_rate', 'attention_dropout_rate'):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(
                f'model.{name}={value} must be in [0, 1): it is the probability of '
                'dropping a unit (the paper uses 0.1).'
            )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f'model.{name}={value!r} is not one of {choices}.')


def _check_combinations(cfg: ModelConfig) -> None:
    """Switches that are valid alone but not together."""
    if cfg.positions == 'sinusoidal' and cfg.emb_dim % 2:
        raise ConfigError(
            f'model.emb_dim={cfg.emb_dim} must be even for sinusoidal positions '
            '(sine/cosine pairs, §3.5); use an even emb_dim or model.positions="learned".'
        )
    if cfg.attention != 'reference' and cfg.attention_dropout_rate > 0:
        raise ConfigError(
            f'model.attention="{cfg.attention}" has no attention dropout; set '
            'model.attention_dropout_rate=0 or model.attention="reference".'
        )
    if cfg.attention == 'cudnn' and cfg.dtype == 'float32':
        raise ConfigError(
            'model.attention="cudnn" needs half-precision compute; set '
            'model.dtype="bfloat16" (or "float16"), or model.attention="fused".'
        )
