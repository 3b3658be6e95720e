"""Search over any model of `attn.model`: greedy, beam (with n-best lists), sampling (with
a prompt's prefill) and forced decoding. Knows no files, flags, meshes or training."""

from attn.decoding.search import (
    Hypotheses,
    beam_search,
    filter_logits,
    forced_decode,
    greedy_search,
    length_penalty,
    output_length,
    sample,
)

__all__ = [
    'Hypotheses',
    'beam_search',
    'filter_logits',
    'forced_decode',
    'greedy_search',
    'length_penalty',
    'output_length',
    'sample',
]
