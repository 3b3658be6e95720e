"""Search over any model of `attn.model`: greedy, beam (with n-best lists), sampling (with
a prompt's prefill) and forced decoding. It builds the models' caches and owns the beam
search's bookkeeping; it knows no files, flags, meshes or training."""

from attn.decoding.beam import Hypotheses, beam_search
from attn.decoding.common import length_penalty, output_length
from attn.decoding.greedy import forced_decode, greedy_search
from attn.decoding.sampling import filter_logits, sample

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
