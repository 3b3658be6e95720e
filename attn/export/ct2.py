"""The CTranslate2 directory, built with its spec API from Marian's state dict (its own
Marian converter assumes OPUS-MT's vocabulary: PAD last, a zero start embedding)."""

from __future__ import annotations

import os

import numpy as np

from attn.export.weights import MARIAN_EPSILON, SPECIAL_PIECES
from attn.model.tokens import BOS_ID


def write_ct2(tensors: dict, config, pieces: list[str], out: str, quantization: str) -> None:
    """A CTranslate2 model of Marian `tensors`, built with its spec API (Marian's own
    converter assumes OPUS-MT's vocabulary, PAD last and a zero start embedding)."""
    import ctranslate2
    from ctranslate2.specs import common_spec, transformer_spec

    model = config.model
    spec = transformer_spec.TransformerSpec.from_config(
        model.num_layers, model.num_heads, pre_norm=False, activation=common_spec.Activation.RELU
    )
    for name, stack in (('encoder', spec.encoder), ('decoder', spec.decoder)):
        stack.scale_embeddings = float(np.sqrt(model.emb_dim))
        stack.position_encodings.encodings = tensors[f'model.{name}.embed_positions.weight']
        for i, layer in enumerate(stack.layer):
            _ct2_layer(layer, tensors, f'model.{name}.layers.{i}')
    spec.encoder.embeddings[0].weight = tensors['model.shared.weight']
    spec.decoder.embeddings.weight = tensors['model.shared.weight']
    spec.decoder.projection.weight = tensors['model.shared.weight']
    spec.config.layer_norm_epsilon = MARIAN_EPSILON  # the weights are Marian's
    spec.config.decoder_start_token = SPECIAL_PIECES[BOS_ID]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.validate()
    spec.optimize(quantization=None if quantization == 'none' else quantization)
    os.makedirs(out)
    spec.save(out)
    del ctranslate2  # imported for its converters' registration of the spec classes


def _ct2_layer(layer, tensors: dict, prefix: str) -> None:
    def linear(spec, *names):
        spec.weight = np.concatenate([tensors[f'{prefix}.{n}.weight'] for n in names])
        spec.bias = np.concatenate([tensors[f'{prefix}.{n}.bias'] for n in names])

    def norm(spec, name):
        spec.gamma, spec.beta = tensors[f'{prefix}.{name}.weight'], tensors[f'{prefix}.{name}.bias']

    attention = layer.self_attention
    linear(attention.linear[0], 'self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj')
    linear(attention.linear[1], 'self_attn.out_proj')
    norm(attention.layer_norm, 'self_attn_layer_norm')
    if hasattr(layer, 'attention'):  # encoder-decoder attention (decoder layers)
        cross = layer.attention
        linear(cross.linear[0], 'encoder_attn.q_proj')
        linear(cross.linear[1], 'encoder_attn.k_proj', 'encoder_attn.v_proj')
        linear(cross.linear[2], 'encoder_attn.out_proj')
        norm(cross.layer_norm, 'encoder_attn_layer_norm')
    linear(layer.ffn.linear_0, 'fc1')
    linear(layer.ffn.linear_1, 'fc2')
    norm(layer.ffn.layer_norm, 'final_layer_norm')
