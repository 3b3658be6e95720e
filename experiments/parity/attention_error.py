"""Max error of Eq. (1) in float32 (reference and fused paths) against float64 NumPy.

    python experiments/parity/attention_error.py --batch=4 --length=128 --heads=8 --head_dim=64

Prints one JSON object. Masks: none, key padding, causal, packed segments + causal.
Rows with every key masked are excluded (their output is undefined by design).

The cuDNN path runs only where JAX has a GPU backend, in bfloat16 (cuDNN's fused kernel
takes half precision), against float64 and against the reference path in bfloat16.
Elsewhere it is left out, and the report says so under `skipped`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

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


def cudnn_skipped() -> str | None:
    """Why the cuDNN path cannot run here, or None where it can (a GPU backend)."""
    backend = jax.default_backend()
    return None if backend == 'gpu' else f'needs a GPU backend; this one is {backend}'


def attend(q, k, v, mask, impl: str, dtype) -> np.ndarray:
    """Eq. (1) by path `impl` in `dtype`, as float64 NumPy."""
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    out = attention.dot_product_attention(q, k, v, mask, implementation=impl)
    return np.asarray(out.astype(jnp.float32), np.float64)


def errors(q, k, v, mask, exact, live, with_cudnn: bool) -> dict[str, float]:
    """Max |difference| over the live rows of each path against float64 and each other."""

    def gap(a, b) -> float:
        return float(np.abs(a - b)[live].max())

    reference, fused = (attend(q, k, v, mask, impl, jnp.float32) for impl in ('reference', 'fused'))
    found = {
        'reference_vs_float64': gap(reference, exact),
        'fused_vs_float64': gap(fused, exact),
        'fused_vs_reference': gap(fused, reference),
    }
    if with_cudnn:
        cudnn = attend(q, k, v, mask, 'cudnn', jnp.bfloat16)
        found['cudnn_bf16_vs_float64'] = gap(cudnn, exact)
        found['cudnn_bf16_vs_reference_bf16'] = gap(
            cudnn, attend(q, k, v, mask, 'reference', jnp.bfloat16)
        )
    return found


def main(argv):
    del argv
    rng = np.random.default_rng(_SEED.value)
    shape = (_BATCH.value, _LENGTH.value, _HEADS.value, _HEAD_DIM.value)
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    q32, k32, v32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    skipped = {}
    reason = cudnn_skipped()
    if reason is not None:
        skipped['cudnn'] = reason
        logging.warning('Skipping the cuDNN path: %s.', reason)
    results = {}
    for name, mask in masks(_BATCH.value, _LENGTH.value, rng).items():
        exact = float64_attention(q, k, v, None if mask is None else np.asarray(mask))
        live = np.ones(shape[:2], bool)
        if mask is not None:
            live = np.broadcast_to(np.asarray(mask).any(-1)[:, 0], shape[:2])
        results[name] = errors(q32, k32, v32, mask, exact, live, with_cudnn=reason is None)
    report = {'shape_BTNH': shape, 'max_abs_error': results, 'skipped': skipped}
    print(json.dumps(report, indent=1))  # noqa: T201


if __name__ == '__main__':
    app.run(main)
