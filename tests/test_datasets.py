"""Datasets from configs: WMT14 through TFDS's own builder (mocked), fail-fast when missing."""

import itertools
import shutil
import time

import pytest
import tensorflow_datasets as tfds

from attn.data import datasets, pipeline
from configs import l10n, lm, wmt14


def _offline(monkeypatch, reachable=False):
    monkeypatch.setattr(datasets, '_host_reachable', lambda host, timeout=5.0: reachable)


@pytest.mark.parametrize('get_config', [wmt14.get_config, lambda: lm.get_config('dataset=lm1b')])
def test_unprepared_dataset_fails_fast_with_instructions(get_config, tmp_path, monkeypatch):
    _offline(monkeypatch)
    config = get_config()
    config.data.data_dir = str(tmp_path)
    for prepare in (False, True):
        start = time.monotonic()
        with pytest.raises(datasets.DataError, match='python -m attn.prepare'):
            datasets.builder(config.data, prepare=prepare)
        assert time.monotonic() - start < 5  # no download retry loop
    with pytest.raises(datasets.DataError, match='cannot be reached'):
        datasets.builder(config.data, prepare=True)


def test_wmt14_through_tfds_mock_data(tmp_path, monkeypatch):
    """As if prepared: mock_data serves random examples in WMT14's features."""
    monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
    config = wmt14.get_config()
    config.data.data_dir = str(tmp_path)
    config.data.vocab_size = 280
    config.data.tokens_per_batch = 256
    config.data.max_length = 64
    with tfds.testing.mock_data(num_examples=300, policy=tfds.testing.MockPolicy.USE_CODE):
        builder = datasets.builder(config.data)
        data = datasets.load(config)
        assert builder.info.full_name.startswith('wmt14_translate/de-en')
        assert data.features == ('en', 'de')
        assert len(data.splits['train']) == 300
        batch = next(data.train_iterator(config))
        assert batch['inputs'].shape == batch['targets'].shape == (4, 64)
        assert pipeline.packing_efficiency(batch) > 0.5
        eval_batch = next(iter(data.eval_batches(config)))
        assert {'inputs', 'targets', 'index'} <= set(eval_batch)
        assert list(itertools.islice(data.eval_batches(config), 100))  # whole test split
    assert data.tokenizer.vocab_size == 280


def test_a_truncated_record_file_is_named_before_anything_runs(fixture_corpus, tmp_path):
    data_dir = tmp_path / 'data'
    shutil.copytree(fixture_corpus, data_dir)
    (train,) = data_dir.glob('l10n_translate/en-de/*/l10n_translate-train.array_record*')
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    config = l10n.get_config('size=tiny')
    config.data.data_dir = str(data_dir)
    with pytest.raises(datasets.DataError, match=r"of the 'train' split .* damaged or truncated"):
        datasets.load(config)
