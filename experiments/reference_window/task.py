"""The reference-window task: recall the token that followed a marker k positions back.

Each example is one row of `targets` in the language-model format (`attn.train` with
model_kind='lm'): random content tokens, one MARKER, the answer right after it, more
content, and QUERY at the second-to-last position. The last token is the answer again,
which sits exactly k positions before QUERY:

    ... MARKER a x x ... x QUERY a          (a at L-2-k, QUERY at L-2, answer at L-1)

A model is scored on its prediction of the last token only. Rows are L = max_k + 3 long
for every k, so distance is the only thing that changes.
"""

from __future__ import annotations

import numpy as np

from attn.model import NUM_SPECIAL_TOKENS

MARKER = NUM_SPECIAL_TOKENS  # 4
QUERY = NUM_SPECIAL_TOKENS + 1  # 5
FIRST_CONTENT = NUM_SPECIAL_TOKENS + 2  # content tokens are 6 .. vocab_size - 1


def sequence_length(max_k: int) -> int:
    return max_k + 3


def make_examples(
    distances: np.ndarray, *, max_k: int, vocab_size: int, seed: int
) -> dict[str, np.ndarray]:
    """One row per distance: {'targets': [n, max_k + 3] int32, 'k': [n] int32}."""
    distances = np.asarray(distances, np.int32)
    if distances.min() < 1 or distances.max() > max_k:
        raise ValueError(f'distances must lie in [1, {max_k}]')
    if vocab_size <= FIRST_CONTENT + 1:
        raise ValueError(f'vocab_size must exceed {FIRST_CONTENT + 1} (two content tokens)')
    rng = np.random.default_rng(seed)
    n, length = len(distances), sequence_length(max_k)
    targets = rng.integers(FIRST_CONTENT, vocab_size, (n, length), dtype=np.int32)
    rows = np.arange(n)
    answer_at = length - 2 - distances
    targets[rows, answer_at - 1] = MARKER
    targets[:, length - 2] = QUERY
    targets[:, length - 1] = targets[rows, answer_at]
    return {'targets': targets, 'k': distances}


def training_examples(count: int, *, max_k: int, vocab_size: int, seed: int) -> dict:
    """`count` rows with k uniform in [1, max_k]."""
    distances = np.random.default_rng([seed, 0]).integers(1, max_k + 1, count)
    return make_examples(distances, max_k=max_k, vocab_size=vocab_size, seed=seed)


def evaluation_grid(max_k: int) -> list[int]:
    """1, 2, 4, ... up to max_k (max_k itself included)."""
    grid = [2**i for i in range(max_k.bit_length()) if 2**i < max_k]
    return grid + [max_k]
