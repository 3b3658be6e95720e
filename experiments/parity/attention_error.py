"""Max error of Eq. (1) in float32 (reference and fused paths) against float64 NumPy.

    python experiments/parity/attention_error.py [--batch=4 --length=128 --heads=8 --head_dim=64]

Prints one JSON object. Masks: none, key padding, causal, packed segments + causal.
Rows with every key masked are excluded (their output is undefined by design).
"""

import json

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from attn.model import attention

_BATCH = flags.DEFINE_integer('batch', 4, 'Batch size.')
_LENGTH = flags.DEFINE_integer('length', 128, 'Query and key length.')
_HEADS = flags.DEFINE_integer('heads', 8, 'Number of heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'd_k = d_v.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')


def float64_attention(q, k, v, mask):
    logits = np.einsum('btnk,bsnk->bnts', q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -1e300)  # finite: fully masked rows stay NaN-free
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return np.einsum('bnts,bsnh->btnh', probs / probs.sum(-1, keepdims=True), v)


def masks(batch, length, rng):
    lengths = rng.integers(length // 2, length + 1, size=batch)
    valid = np.arange(length)[None] < lengths[:, None]
    segments = np.where(valid, 1 + (np.arange(length)[None] * 3) // length, 0)
    seg = jnp.asarray(segments)
    return {
        'none': None,
        'padding': attention.padding_mask(jnp.asarray(valid), jnp.asarray(valid)),
        'causal': attention.causal_mask(length),
        'packed+causal': attention.segment_mask(seg, seg) & attention.causal_mask(length),
    }


def main(argv):
    del argv
    rng = np.random.default_rng(_SEED.value)
    shape = (_BATCH.value, _LENGTH.value, _HEADS.value, _HEAD_DIM.value)
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    q32, k32, v32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    results = {}
    for name, mask in masks(_BATCH.value, _LENGTH.value, rng).items():
        exact = float64_attention(q, k, v, None if mask is None else np.asarray(mask))
        live = np.ones(shape[:2], bool)
        if mask is not None:
            live = np.broadcast_to(np.asarray(mask).any(-1)[:, 0], shape[:2])
        outs = {
            impl: np.asarray(
                attention.dot_product_attention(q32, k32, v32, mask, implementation=impl)
            )
            for impl in attention.IMPLEMENTATIONS
        }
        results[name] = {
            'reference_vs_float64': float(np.abs(outs['reference'] - exact)[live].max()),
            'fused_vs_float64': float(np.abs(outs['fused'] - exact)[live].max()),
            'fused_vs_reference': float(np.abs(outs['fused'] - outs['reference'])[live].max()),
        }
    print(json.dumps({'shape_BTNH': shape, 'max_abs_error': results}, indent=1))  # noqa: T201


if __name__ == '__main__':
    app.run(main)
