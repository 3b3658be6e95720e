"""attn's parameters as MarianMTModel's state dict, the same function up to float round-off.

The paper's model (post-LN, sinusoidal positions, tied embeddings scaled by sqrt(d_model),
ReLU FFN) is Marian's architecture. Three differences are removed exactly, by rewriting
the weights:
- Positions: attn interleaves sin/cos (§3.5), Marian puts the sines in the first half of
  the coordinates. The permutation `interleave_order` of the d_model coordinates, applied
  to every weight that reads or writes them, makes the two the same function.
- LayerNorm epsilon: attn's is 1e-6, Marian's 1e-5 (fixed in its code). Multiplying the
  residual stream by c = sqrt(1e-5 / 1e-6) everywhere gives LN_1e-5(c z) = LN_1e-6(z): the
  LayerNorm gains and biases, FFN biases, embeddings and positions take the factor c,
  queries and keys 1/c; the decoder's last LayerNorm returns 1/c so that the tied logits
  (c-scaled embedding) are attn's. The position table is stored with the weights for this.
- Projections without bias: Marian's biases and its final logits bias are zeros.
The decoder starts from BOS (id 2), as attn's does; PAD 0, UNK 1, BOS 2, EOS 3 as in attn.
"""

from __future__ import annotations

import numpy as np

from attn.data import tokenizer as tokenizer_lib
from attn.errors import UserError
from attn.model import layers as layers_lib
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID

ATTN_EPSILON, MARIAN_EPSILON = 1e-6, 1e-5
SCALE = float(np.sqrt(MARIAN_EPSILON / ATTN_EPSILON))  # c: LN_1e-5(c z) = LN_1e-6(z)
MAX_POSITIONS = 1024  # rows of the stored position tables (Marian's max_position_embeddings)
SPECIAL_PIECES = {PAD_ID: '<pad>', UNK_ID: '<unk>', BOS_ID: '<s>', EOS_ID: '</s>'}


class ExportError(UserError):
    """A model or setting that cannot be exported; the message names the field."""


def check_exportable(config) -> None:
    """Raises ExportError naming the first config field Marian cannot hold."""
    model = config.model
    heads, emb = model.num_heads, model.emb_dim
    qk = model.qk_dim if model.qk_dim is not None else emb // heads
    v = model.v_dim if model.v_dim is not None else emb // heads
    why = None
    if config.model_kind != 'transformer':
        why = (
            f'config.model_kind={config.model_kind!r}: only the encoder-decoder Transformer '
            'is exported (MarianMT is a translation model).'
        )
    elif qk != v or heads * qk != emb:
        why = (
            f'model.qk_dim={qk}, model.v_dim={v} with model.num_heads={heads}, '
            f'model.emb_dim={emb}: Marian needs d_k = d_v = emb_dim / num_heads.'
        )
    elif model.positions != 'sinusoidal':
        why = f'model.positions={model.positions!r}: Marian has only sinusoidal positions.'
    elif model.pre_ln:
        why = "model.pre_ln=True: Marian is post-LN (the paper's residual blocks)."
    elif model.get('norm', 'layernorm') != 'layernorm':
        why = f'model.norm={model.norm!r}: MarianMT has LayerNorm only.'
    elif model.get('num_kv_heads') not in (None, heads):
        why = (
            f'model.num_kv_heads={model.num_kv_heads}: MarianMT has one key/value head per '
            'query head.'
        )
    elif model.get('qk_norm', False):
        why = 'model.qk_norm=True: MarianMT has no norm on queries and keys.'
    elif model.get('ffn', 'relu') != 'relu':
        why = f"model.ffn={model.ffn!r}: MarianMT has the paper's ReLU feed-forward only."

    elif not (model.share_embeddings and model.tie_output):
        why = (
            f'model.share_embeddings={model.share_embeddings}, model.tie_output='
            f'{model.tie_output}: the export needs one embedding matrix for encoder, '
            'decoder and output (§3.4).'
        )
    if why:
        raise ExportError(f'Cannot export: {why}')


def interleave_order(emb_dim: int) -> np.ndarray:
    """[D] attn coordinate of each Marian coordinate: Marian's m-th is attn's order[m]
    (sines 0, 2, 4, ... first, then cosines 1, 3, 5, ...)."""
    return np.concatenate([np.arange(0, emb_dim, 2), np.arange(1, emb_dim, 2)])


def positions_table(emb_dim: int, rows: int = MAX_POSITIONS) -> np.ndarray:
    """[rows, D] attn's own sinusoids (float32, as attn computes them), in Marian's order."""
    positions = np.arange(rows, dtype=np.int32)[None]  # [1, rows]
    table = np.asarray(layers_lib.sinusoidal_positions(positions, emb_dim))[0]
    return table[:, interleave_order(emb_dim)]


def _attention(p: dict, order: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """Marian q/k/v/out projections ([out, in] torch layout) of attn's attention `p`:
    query/key/value [D, N, K], out [N, H, D]; queries and keys take 1/c (see module doc)."""
    D = p['query'].shape[0]
    tensors = {}
    for name, scale in (('query', 1 / SCALE), ('key', 1 / SCALE), ('value', 1.0)):
        kernel = np.asarray(p[name]).reshape(D, -1)[order]  # [D, N*K], rows in Marian order
        tensors[f'{prefix}.{name[0]}_proj.weight'] = (kernel * scale).T
    out = np.asarray(p['out']).reshape(-1, D)[:, order]  # [N*H, D]
    tensors[f'{prefix}.out_proj.weight'] = out.T
    for name in 'qkv':
        tensors[f'{prefix}.{name}_proj.bias'] = np.zeros(out.shape[0], np.float32)
    tensors[f'{prefix}.out_proj.bias'] = np.zeros(D, np.float32)
    return tensors


def _norm(p: dict, order: np.ndarray, name: str, scale: float = SCALE) -> dict[str, np.ndarray]:
    norm = p['norm']
    return {
        f'{name}.weight': np.asarray(norm['scale'])[order] * scale,
        f'{name}.bias': np.asarray(norm['bias'])[order] * scale,
    }


def _feed_forward(p: dict, order: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """fc1/fc2 of attn's FFN: relu(c x W1 + c b1) W2 + c b2 = c FFN(x)."""
    wi, wo = p['wi'], p['wo']
    return {
        f'{prefix}.fc1.weight': np.asarray(wi['kernel'])[order].T,  # [F, D]
        f'{prefix}.fc1.bias': np.asarray(wi['bias']) * SCALE,
        f'{prefix}.fc2.weight': np.asarray(wo['kernel'])[:, order].T,  # [D, F]
        f'{prefix}.fc2.bias': np.asarray(wo['bias'])[order] * SCALE,
    }


def marian_tensors(params: dict) -> dict[str, np.ndarray]:
    """MarianMTModel's state dict (float32 numpy) computing the same function as attn's
    parameters `params` (nnx.to_pure_dict of a Transformer's nnx.Param state)."""
    encoder, decoder = params['encoder'], params['decoder']
    # The shared matrix appears once in the state, under whichever stack nnx lists first.
    embedder = encoder.get('embedder') or decoder['embedder']
    embedding = np.asarray(embedder['embed']['embedding'])  # [V, D]
    order = interleave_order(embedding.shape[1])
    positions = positions_table(embedding.shape[1]) * SCALE
    tensors = {
        'model.shared.weight': embedding[:, order] * SCALE,
        'model.encoder.embed_positions.weight': positions,
        'model.decoder.embed_positions.weight': positions.copy(),
        'final_logits_bias': np.zeros((1, embedding.shape[0]), np.float32),
    }
    for i, layer in sorted(encoder['layers'].items()):
        prefix = f'model.encoder.layers.{i}'
        tensors |= _attention(layer['self_attention'], order, f'{prefix}.self_attn')
        tensors |= _norm(layer['self_attention_residual'], order, f'{prefix}.self_attn_layer_norm')
        tensors |= _feed_forward(layer['feed_forward'], order, prefix)
        tensors |= _norm(layer['feed_forward_residual'], order, f'{prefix}.final_layer_norm')
    last = max(decoder['layers'])
    for i, layer in sorted(decoder['layers'].items()):
        prefix = f'model.decoder.layers.{i}'
        tensors |= _attention(layer['self_attention'], order, f'{prefix}.self_attn')
        tensors |= _norm(layer['self_attention_residual'], order, f'{prefix}.self_attn_layer_norm')
        tensors |= _attention(layer['cross_attention'], order, f'{prefix}.encoder_attn')
        tensors |= _norm(
            layer['cross_attention_residual'], order, f'{prefix}.encoder_attn_layer_norm'
        )
        tensors |= _feed_forward(layer['feed_forward'], order, prefix)
        # The last LayerNorm gives 1/c: the tied logits then use the c-scaled embedding.
        scale = 1 / SCALE if i == last else SCALE
        tensors |= _norm(layer['feed_forward_residual'], order, f'{prefix}.final_layer_norm', scale)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def vocabulary(tokenizer: tokenizer_lib.Tokenizer) -> list[str]:
    """Piece of each id; the ids 0..3 must be Marian's special tokens."""
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    for i, piece in SPECIAL_PIECES.items():
        if pieces[i] != piece:
            raise ExportError(
                f'Cannot export: the tokenizer calls id {i} {pieces[i]!r}, MarianTokenizer '
                f'needs {piece!r}.'
            )
    return pieces
