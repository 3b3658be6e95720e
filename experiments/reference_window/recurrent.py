"""Recurrent baselines for the reference-window study: vanilla RNN, GRU and LSTM.

Flax NNX's cells under `nnx.RNN`; the same token embedding in front and a linear
read-out of each state behind. Widths are chosen to match a parameter budget.
"""

from __future__ import annotations

import jax
from flax import nnx

from attn.model import shift_right

CELLS = {'rnn': nnx.SimpleCell, 'gru': nnx.GRUCell, 'lstm': nnx.OptimizedLSTMCell}
GATES = {'rnn': 1, 'gru': 3, 'lstm': 4}  # weight blocks per cell


class RecurrentModel(nnx.Module):
    """Embed -> one recurrent layer -> linear read-out of the next token."""

    def __init__(self, cell: str, vocab_size: int, emb_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, emb_dim, rngs=rngs)
        self.rnn = nnx.RNN(CELLS[cell](emb_dim, hidden, rngs=rngs))
        self.readout = nnx.Linear(hidden, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, segmentation=None, position=None, **unused) -> jax.Array:
        """Logits [B, T, V] predicting each of `tokens` [B, T] from the ones before it.

        Called as `attn.training.step` calls `LanguageModel`; there is no dropout or chunked loss to
        switch (`unused`), and rows are one example each (no packing).
        """
        if segmentation is not None or position is not None:
            raise ValueError('RecurrentModel reads unpacked rows only.')
        # The initial state is zeros; its key comes from a stream made here, so the call
        # changes none of the model's state (it runs inside attn.training.step's jit).
        states = self.rnn(self.embed(shift_right(tokens)), rngs=nnx.Rngs(carry=0))  # [B, T, hidden]
        return self.readout(states)


def parameter_count(cell: str, vocab_size: int, emb_dim: int, hidden: int) -> int:
    """Parameters of RecurrentModel, without building it."""
    blocks = GATES[cell]
    recurrent = blocks * (emb_dim * hidden + hidden * hidden + hidden)
    return vocab_size * emb_dim + recurrent + hidden * vocab_size + vocab_size


def matched_hidden(cell: str, vocab_size: int, emb_dim: int, budget: int) -> int:
    """The hidden size whose parameter count is nearest `budget`."""
    return min(
        range(1, 4096), key=lambda h: abs(parameter_count(cell, vocab_size, emb_dim, h) - budget)
    )
