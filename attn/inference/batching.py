"""A host's lines through a search: batches padded to a few shapes (few compiles), split over
the mesh of every process, and each host's rows back; the checks of the search flags."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from attn import decoding
from attn.errors import UserError
from attn.model import Transformer
from attn.model.tokens import PAD_ID
from attn.training import distributed, sharding


def bucket(n: int, smallest: int = 8) -> int:
    """The next power of two >= n (at least `smallest`): few shapes, few compiles."""
    return max(smallest, 1 << (max(n, 1) - 1).bit_length())


class SearchError(UserError, ValueError):
    """Search settings that do not fit together; names the fix."""


def check_nbest(nbest: int, beam_size: int) -> None:
    """An n-best list of K needs a beam search of at least K hypotheses (0: no list)."""
    if nbest and not (nbest >= 1 and beam_size > 1 and nbest <= beam_size):
        raise SearchError(
            f"--nbest={nbest} lists the beam's finished hypotheses: it needs "
            f'--beam_size >= {max(nbest, 2)} (now {beam_size}); lower --nbest or raise '
            '--beam_size.'
        )


def translate(
    model: Transformer,
    inputs,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_extra_length: int = 50,
    mesh: Mesh | None = None,
    nbest: int = 0,
    attention_stats: bool = False,
):
    """Best translation per sentence: greedy for beam_size 1, else beam search; or, with
    `nbest` K, the K best finished hypotheses of the beam search (1 <= K <= beam_size).

    Batches of any shape are padded to power-of-two rows and width, so a whole test set
    compiles a handful of programs rather than one per batch shape. Padding changes no
    result: sources are masked and each sentence's length limit counts its own tokens.

    With a `mesh` the search is data-parallel: this host's rows (padded to a multiple of
    its devices) join every other host's into one batch split over the mesh, and this
    host gets its own rows back. Every process must call it with as many rows (after
    padding) as the others; the width is agreed between them.

    Args:
      inputs: [B, S] source ids ending in EOS, right-padded (this host's rows).
      attention_stats: also return each translation's encoder-decoder attention entropy
        and peak weight per decoder layer and head, summed over its positions and gathered
        inside the beam search, [B, layers, N, 2] (`decoding.beam_search`).
    Returns:
      [B, L] ids without BOS, up to and including EOS, then PAD; with `nbest`, the
      `decoding.Hypotheses` as NumPy arrays of K per sentence, best first (a slot that never
      filled, possible only with a tiny vocabulary, scores -inf).
    """
    check_nbest(nbest, beam_size)
    if attention_stats and (beam_size == 1 or nbest):
        raise SearchError(
            '--attention_stats are gathered inside the beam search of the 1-best: give '
            '--beam_size of 2 or more, without --nbest.'
        )
    inputs = np.asarray(inputs)
    rows, width = inputs.shape
    shape = [bucket(rows, 1), bucket(width)]
    if mesh is not None:
        devices = sharding.local_device_count(mesh)
        shape[0] = -(-shape[0] // devices) * devices
        shape = distributed.agreed_max(shape).tolist()
    padded = np.full(shape, PAD_ID, inputs.dtype)
    padded[:rows, :width] = inputs
    if mesh is not None:
        padded = sharding.global_batch(mesh, {'inputs': padded})['inputs']

    def own_rows(x: jax.Array) -> np.ndarray:
        return (np.asarray(x) if mesh is None else sharding.host_rows(mesh, x))[:rows]

    if beam_size == 1:
        return own_rows(decoding.greedy_search(model, padded, max_extra_length=max_extra_length))
    settings = {'beam_size': beam_size, 'alpha': alpha, 'max_extra_length': max_extra_length}
    if attention_stats:
        (tokens, _), sums = decoding.beam_search(model, padded, attention_stats=True, **settings)
        return own_rows(tokens), own_rows(sums)
    if not nbest:
        return own_rows(decoding.beam_search(model, padded, **settings)[0])
    found = decoding.beam_search(model, padded, return_all=True, **settings)
    return decoding.Hypotheses(*(own_rows(x)[:, :nbest] for x in found))
