"""The reference-window task: recall a token a controlled distance k back.

Each example is one row of `targets` in the language-model format (`attn.train` with
model_kind='lm'): random content tokens, a query at the second-to-last position, and the
answer as the last token: a copy of the token exactly k positions before the query.
A model is scored on its prediction of the last token only. Rows are L = max_k + 3 long
for every k, so distance is the only thing that changes. Two kinds:

  'offset'  the query token names k (one query token per distance): nothing marks the
            answer before the query arrives, so a model must keep every recent token
            within reach. What it can still recall as k grows is its reference window.
  'marker'  a MARKER precedes the answer and one QUERY token asks for it:
            ... MARKER a x x ... x QUERY a. A model can store the answer when it sees the
            marker (gated recurrent cells can latch it).
"""

from __future__ import annotations

import numpy as np

from attn.model.tokens import NUM_SPECIAL_TOKENS

KINDS = ('offset', 'marker')
MARKER = NUM_SPECIAL_TOKENS  # 4
QUERY = NUM_SPECIAL_TOKENS + 1  # 5: the 'marker' kind's query
FIRST_CONTENT = NUM_SPECIAL_TOKENS + 2  # content tokens: 6, 7, ...


def sequence_length(max_k: int) -> int:
    return max_k + 3


def vocab_size(kind: str, content_tokens: int, max_k: int) -> int:
    """Special tokens, MARKER, QUERY, content tokens, then (offset) one query per k."""
    return FIRST_CONTENT + content_tokens + (max_k if kind == 'offset' else 0)


def query_token(kind: str, k: np.ndarray, content_tokens: int) -> np.ndarray:
    if kind == 'marker':
        return np.full_like(k, QUERY)
    return FIRST_CONTENT + content_tokens + k - 1


def make_examples(
    distances, *, kind: str, max_k: int, content_tokens: int, seed: int
) -> dict[str, np.ndarray]:
    """One row per distance: {'targets': [n, max_k + 3] int32, 'k': [n] int32}."""
    if kind not in KINDS:
        raise ValueError(f'task kind {kind!r} is not one of {KINDS}')
    distances = np.asarray(distances, np.int32)
    if distances.min() < 1 or distances.max() > max_k:
        raise ValueError(f'distances must lie in [1, {max_k}]')
    if content_tokens < 2:
        raise ValueError('content_tokens must be at least 2')
    rng = np.random.default_rng(seed)
    n, length = len(distances), sequence_length(max_k)
    targets = rng.integers(
        FIRST_CONTENT, FIRST_CONTENT + content_tokens, (n, length), dtype=np.int32
    )
    rows = np.arange(n)
    answer_at = length - 2 - distances
    if kind == 'marker':
        targets[rows, answer_at - 1] = MARKER
    targets[:, length - 2] = query_token(kind, distances, content_tokens)
    targets[:, length - 1] = targets[rows, answer_at]
    return {'targets': targets, 'k': distances}


def training_examples(count: int, *, max_k: int, seed: int, **task) -> dict:
    """`count` rows with k drawn uniformly from `evaluation_grid(max_k)`: every distance
    scored is trained on equally often (and each 'offset' query token is seen often)."""
    grid = np.array(evaluation_grid(max_k), np.int32)
    distances = np.random.default_rng([seed, 0]).choice(grid, count)
    return make_examples(distances, max_k=max_k, seed=seed, **task)


def evaluation_grid(max_k: int) -> list[int]:
    """1, 2, 4, ... up to max_k (max_k itself included)."""
    grid = [2**i for i in range(max_k.bit_length()) if 2**i < max_k]
    return grid + [max_k]
