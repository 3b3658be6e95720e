"""What a trained model's heads do: attention maps, per-head statistics, head importance
and the effect of masking heads.

Attention is read with `capture_weights` + `nnx.capture` (probabilities [B, N, T, S] of
every MultiHeadAttention); importance is |dL/d xi_h| through the HeadMask gates (Michel
et al., 2019); confidence is the mean maximum weight over queries (Voita et al., 2019).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn.model import layers
from attn.model.tokens import EOS_ID, PAD_ID
from attn.training.step import cross_entropy, forward, target_weights


def module_name(path) -> str:
    """('encoder', 'layers', 0, 'self_attention', ...) -> 'encoder.0.self_attention'."""
    parts = [str(p) for p in path if p not in ('layers', 'attention_weights', 'head_mask')]
    return '.'.join(parts)


def attention_maps(model, batch: dict, kind: str) -> dict[str, np.ndarray]:
    """Teacher-forced attention probabilities of every attention module, [B, N, T, S]."""
    model.set_attributes(capture_weights=True)
    try:
        _, captured = nnx.capture(forward, nnx.Intermediate)(
            model, batch, kind, deterministic=True, rngs=None
        )
    finally:
        model.set_attributes(capture_weights=False)
    return {
        module_name(path): np.asarray(variable.get_value()[0])
        for path, variable in nnx.to_flat_state(captured)
    }


def head_statistics(weights: np.ndarray, query_tokens: np.ndarray, key_tokens: np.ndarray):
    """Per-head entropy, confidence and mean attention distance.

    Args:
      weights: [B, N, T, S] probabilities of one module.
      query_tokens: [B, T] ids (PAD rows are left out).
      key_tokens: [B, S] ids (EOS keys are left out of confidence, as Voita et al.).
    Returns:
      list over heads of {'entropy', 'confidence', 'mean_distance'} (nats, weight, positions).
    """
    valid = query_tokens != PAD_ID  # [B, T]
    probs = np.clip(weights, 1e-12, 1.0)
    entropy = -(weights * np.log(probs)).sum(-1)  # [B, N, T]
    no_eos = np.where((key_tokens == EOS_ID)[:, None, None, :], 0.0, weights)
    confidence = no_eos.max(-1)  # [B, N, T]
    T, S = weights.shape[-2:]
    distance = np.abs(np.arange(T)[:, None] - np.arange(S)[None, :])  # [T, S]
    mean_distance = (weights * distance).sum(-1)  # [B, N, T]
    mask = valid[:, None, :]  # [B, 1, T]

    def mean(x):  # over real queries -> [N]
        return (x * mask).sum((0, 2)) / np.maximum(mask.sum((0, 2)), 1)

    return [
        {'entropy': float(e), 'confidence': float(c), 'mean_distance': float(d)}
        for e, c, d in zip(mean(entropy), mean(confidence), mean(mean_distance), strict=True)
    ]


def mean_loss(model, batch: dict, kind: str) -> jax.Array:
    """Token-mean NLL of a batch, no dropout."""
    logits = forward(model, batch, kind, deterministic=True, rngs=None)
    sums = cross_entropy(logits, batch['targets'], target_weights(batch), 0.0)
    return sums['nll'] / jnp.maximum(sums['weight'], 1.0)


def head_importance(model, batch: dict, kind: str) -> dict[str, np.ndarray]:
    """|dL / d xi_h| for every head's gate, [N] per attention module (Michel et al.)."""
    grads = nnx.grad(mean_loss, argnums=nnx.DiffState(0, layers.HeadMask))(model, batch, kind)
    return {
        module_name(path): np.abs(np.asarray(variable.get_value()))
        for path, variable in nnx.to_flat_state(grads)
    }


def pruning_curve(model, batch: dict, kind: str, importance: dict[str, np.ndarray], steps: int):
    """Perplexity as heads are masked, least important first; the masks are restored.

    Returns [(heads masked, perplexity)] at `steps` + 1 evenly spaced points.
    """
    order = sorted(
        (score, name, head)
        for name, scores in importance.items()
        for head, score in enumerate(scores)
    )
    variables = _mask_variables(model)
    saved = {name: np.asarray(v.get_value()) for name, v in variables.items()}
    points = sorted({round(i * len(order) / steps) for i in range(steps + 1)})
    curve, masked = [], 0
    try:
        for point in points:
            for _, name, head in order[masked:point]:
                variables[name].set_value(variables[name].get_value().at[head].set(0.0))
            masked = point
            curve.append((point, float(np.exp(mean_loss(model, batch, kind)))))
    finally:
        for name, value in saved.items():
            variables[name].set_value(jnp.asarray(value))
    return curve


def _mask_variables(model) -> dict:
    """Live HeadMask variables of `model` (edits change the model), by module name."""
    found = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, layers.MultiHeadAttention):
            found[module_name(path)] = module.head_mask
    return found
