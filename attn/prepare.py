"""Builds a config's dataset (TFDS, array_record) and its tokenizer ahead of a launch.

    python -m attn.prepare --config=configs/l10n.py [--config.data.data_dir=/shared/tfds]

Prints one JSON line: examples per split (and per source), vocabulary size, mean tokens
per example, and the packing efficiency (share of non-pad tokens) of the configured batch.
"""

from __future__ import annotations

import collections
import itertools
import json
import time

import jax
import numpy as np

from attn import cli
from attn.data import datasets, pipeline

SAMPLE = 2000  # examples tokenized for the mean length
PACKED_BATCHES = 8  # batches packed for the efficiency figure


def _per_source(source) -> dict[str, int] | None:
    """Examples per `source` feature value (None when the dataset has no such feature)."""
    if not len(source) or 'source' not in source[0]:
        return None
    counts = collections.Counter(source[i]['source'] for i in range(len(source)))
    return {datasets.text(k): v for k, v in sorted(counts.items())}


def _mean_tokens(data: datasets.Data) -> dict[str, float]:
    train = data.splits['train']
    indices = np.random.default_rng(0).permutation(len(train))[:SAMPLE]
    return {
        name: float(np.mean([len(data.tokenizer.encode(train[int(i)][name])) for i in indices]))
        for name in data.features
    }


def _packing_efficiency(data: datasets.Data, config) -> float:
    batches = itertools.islice(data.train_iterator(config), PACKED_BATCHES)
    return float(np.mean([pipeline.packing_efficiency(b) for b in batches]))


def prepare(config) -> dict:
    """Builds the dataset and tokenizer; returns the summary `main` prints."""
    start = time.perf_counter()
    dataset = datasets.builder(config.data, prepare=True)
    data = datasets.load(config, list(dataset.info.splits))
    return {
        'dataset': datasets.builder_name(config.data),
        'data_dir': datasets.data_dir(config.data),
        'examples': {split: len(source) for split, source in data.splits.items()},
        'examples_per_source': {split: _per_source(s) for split, s in data.splits.items()},
        'vocab_size': data.tokenizer.vocab_size,
        'tokenizer': str(data.tokenizer.path),
        'mean_tokens_per_example': _mean_tokens(data),
        'packing_efficiency': _packing_efficiency(data, config),
        'seconds': round(time.perf_counter() - start, 1),
    }


def main(argv):
    del argv
    summary = prepare(cli.config())
    if jax.process_index() == 0:
        print(json.dumps(summary))  # noqa: T201 - the command's report


def run():
    cli.define_config_flag()
    cli.run(main)


if __name__ == '__main__':
    run()
