"""Decode throughput of a random-weight model: target tokens/s and sentences/s.

    python experiments/benchmark/decode_speed.py --size=base --beam_size=4   # CTranslate2's setting
    python experiments/benchmark/decode_speed.py --size=small --beam_size=1  # greedy

Batch 32 x 30 source tokens, exactly 40 target tokens per sentence (EOS suppressed until
then), vocabulary 8000, as in ANCHORS.md's CPU figures. Median of --runs after one warm-up
call (whose extra time is reported as compile time). Prints one JSON object.
"""

import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from attn import decode
from attn.model import EOS_ID, ModelConfig, Transformer

SIZES = {
    'small': dict(num_layers=3, emb_dim=256, num_heads=4, mlp_dim=1024),
    'base': dict(num_layers=6, emb_dim=512, num_heads=8, mlp_dim=2048),
}
_SIZE = flags.DEFINE_enum('size', 'base', list(SIZES), 'Model size.')
_BEAM = flags.DEFINE_integer('beam_size', 4, 'Beam size; 1 = greedy.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Sentences per batch.')
_SOURCE = flags.DEFINE_integer('source_length', 30, 'Source tokens per sentence.')
_TARGET = flags.DEFINE_integer('target_length', 40, 'Target tokens per sentence.')
_RUNS = flags.DEFINE_integer('runs', 9, 'Timed runs.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')


def main(argv):
    del argv
    cfg = ModelConfig(vocab_size=8000, dropout_rate=0.0, dtype=_DTYPE.value, **SIZES[_SIZE.value])
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    inputs = np.random.default_rng(0).integers(4, 8000, (_BATCH.value, _SOURCE.value), np.int32)
    inputs[:, -1] = EOS_ID
    extra = _TARGET.value - _SOURCE.value + 1  # room for exactly target_length tokens

    def run():
        if _BEAM.value == 1:
            out = decode.greedy_search(
                model, inputs, max_extra_length=extra, min_length=_TARGET.value
            )
        else:
            out, _ = decode.beam_search(
                model,
                inputs,
                beam_size=_BEAM.value,
                max_extra_length=extra,
                min_length=_TARGET.value,
            )
        return np.asarray(jax.block_until_ready(out))

    start = time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    times = []
    for _ in range(_RUNS.value):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens = int(((out != 0) & (out != EOS_ID)).sum())  # as ANCHORS.md: EOS not counted
    print(
        json.dumps(
            {  # noqa: T201 - the benchmark's report
                'size': _SIZE.value,
                'beam_size': _BEAM.value,
                'dtype': _DTYPE.value,
                'batch': _BATCH.value,
                'target_tokens_per_batch': tokens,
                'median_s': round(median, 4),
                'min_s': round(min(times), 4),
                'max_s': round(max(times), 4),
                'target_tokens_per_s': round(tokens / median, 1),
                'sentences_per_s': round(_BATCH.value / median, 2),
                'compile_s': round(first - median, 2),
                'device': jax.devices()[0].device_kind,
            }
        )
    )


if __name__ == '__main__':
    app.run(main)
