"""The paper's model, pure of training: attention (Eq. 1), the layers of §3 and the
encoder-decoder of Figure 1, plus a decoder-only language model. Imports jax, flax and
numpy only (and `attn.errors` for its one-line errors)."""

from attn.model.config import ModelConfig
from attn.model.transformer import (
    MODELS,
    LanguageModel,
    Transformer,
    build_model,
    logits_from,
    shift_right,
)

__all__ = [
    'MODELS',
    'LanguageModel',
    'ModelConfig',
    'Transformer',
    'build_model',
    'logits_from',
    'shift_right',
]
