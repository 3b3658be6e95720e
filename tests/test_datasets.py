"""Datasets from configs: WMT14 prepared and read through TFDS's own builder, fail-fast
when missing, damaged record files named."""

import pathlib
import shutil
import socket
import time
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attn import configs
from attn import prepare as prepare_lib
from attn.data import datasets
from attn.data import tokenizer as tokenizer_lib
from tests import toy
from tests.toy import CONFIGS


def _offline(monkeypatch, reachable=False):
    monkeypatch.setattr(datasets, '_host_reachable', lambda host, timeout=5.0: reachable)


@pytest.mark.parametrize('file,arg', [('wmt14.py', None), ('lm.py', 'dataset=lm1b')])
def test_unprepared_dataset_fails_fast_with_instructions(file, arg, tmp_path, monkeypatch):
    _offline(monkeypatch)
    config = configs.load(CONFIGS / file, arg)
    config.data.data_dir = str(tmp_path)
    for prepare in (False, True):
        start = time.monotonic()
        with pytest.raises(datasets.DataError, match='python -m attn.prepare'):
            datasets.builder(config.data, prepare=prepare)
        assert time.monotonic() - start < 5  # no download retry loop
    with pytest.raises(datasets.DataError, match='cannot be reached'):
        datasets.builder(config.data, prepare=True)


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError('no network in tests')

    monkeypatch.setattr(socket.socket, 'connect', refuse)


def _fake_wmt14_downloads(root: pathlib.Path) -> dict[str, list[dict[str, bytes]]]:
    """The files TFDS's wmt14_translate/de-en extracts from its downloads, written under
    `root` with the toy corpus in them (plain text for training and newstest2013, SGML for
    newstest2014); the examples of each split."""
    from tensorflow_datasets.translate import wmt

    splits = {'train': [], 'validation': [], 'test': []}
    subsets = {
        'train': ['europarl_v7', 'commoncrawl', 'newscommentary_v9'],
        'validation': ['newstest2013'],
        'test': ['newstest2014'],
    }
    sizes = {'train': 100, 'validation': 30, 'test': 20}
    for seed, (split, name) in enumerate((s, n) for s, names in subsets.items() for n in names):
        examples = toy.corpus(sizes[split], seed=seed)
        splits[split] += examples
        for path in wmt.DATASET_MAP[name].get_path('de'):
            lang = path.removesuffix('.sgm').rsplit('.', 1)[-1]
            lines = [x[lang].decode() for x in examples]
            if path.endswith('.sgm'):
                lines = [f'<seg id="{i}">{line}</seg>' for i, line in enumerate(lines, 1)]
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text('\n'.join(lines) + '\n')
    return splits


def test_wmt14_prepared_by_tfds_own_builder_is_found_and_read(tmp_path, monkeypatch):
    """attn.prepare runs TFDS's wmt14_translate builder (its downloads are local files
    here), which writes array_record; the next run finds it prepared and reads it."""
    _no_network(monkeypatch)
    _offline(monkeypatch, reachable=True)  # www.statmt.org answers, as on a prepare host
    downloads = tmp_path / 'extracted'
    written = _fake_wmt14_downloads(downloads)

    def extracted(self, resources):  # every URL: the folder its files were extracted to
        return tfds.core.utils.map_nested(lambda _: str(downloads), resources)

    monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract', extracted)
    monkeypatch.setattr(tfds.download.DownloadManager, 'extract', extracted)
    config = configs.load(CONFIGS / 'wmt14.py')
    config.data.data_dir = str(tmp_path / 'data')
    config.data.vocab_size = toy.VOCAB_SIZE
    config.data.tokens_per_batch = 256
    config.data.max_length = 64
    with pytest.raises(datasets.DataError, match='not built yet'):
        datasets.builder(config.data)
    summary = prepare_lib.prepare(config)
    assert summary['dataset'] == 'wmt14_translate/de-en' and summary['vocab_size'] == toy.VOCAB_SIZE
    assert summary['examples'] == {'train': 300, 'validation': 30, 'test': 20}
    prepared = tmp_path / 'data' / 'wmt14_translate' / 'de-en'
    assert len(list(prepared.glob('*/wmt14_translate-train.array_record-*'))) == 1
    monkeypatch.undo()  # nothing is downloaded again: the prepared files are read
    _no_network(monkeypatch)
    data = datasets.load(config, list(written))
    assert data.features == ('en', 'de')
    for split, examples in written.items():
        source = data.splits[split]
        read = sorted((source[i]['en'], source[i]['de']) for i in range(len(source)))
        assert read == sorted((x['en'], x['de']) for x in examples), split
    batch = next(data.train_iterator(config))
    assert batch['inputs'].shape == batch['targets'].shape == (4, 64)
    indices = np.concatenate([b['index'] for b in data.eval_batches(config, 'test')])
    assert sorted(indices[indices >= 0]) == list(range(20))  # the whole test split, once


def test_a_truncated_record_file_is_named_before_anything_runs(fixture_corpus, tmp_path):
    data_dir = tmp_path / 'data'
    shutil.copytree(fixture_corpus, data_dir)
    (train,) = data_dir.glob('l10n_translate/en-de/*/l10n_translate-train.array_record*')
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    config = configs.load(CONFIGS / 'l10n.py', 'size=tiny')
    config.data.data_dir = str(data_dir)
    with pytest.raises(datasets.DataError, match=r"of the 'train' split .* damaged or truncated"):
        datasets.load(config)


def test_a_rebuilt_corpus_of_the_same_size_gets_its_own_tokenizer(tmp_path, monkeypatch):
    """The tokenizer's key holds the training split's content: the same files (rewritten,
    so re-hashed) reuse it; other text of the same size and count trains another."""
    from tests.test_tokenizer import VOCAB, _must_not_train, make_sentences

    records = tmp_path / 'data' / 'l10n_translate' / 'train.array_record-00000-of-00001'
    records.parent.mkdir(parents=True)
    dataset = types.SimpleNamespace(
        info=types.SimpleNamespace(
            full_name='l10n_translate/en-de/1.0.0',
            splits={'train': types.SimpleNamespace(filepaths=[str(records)])},
        )
    )
    config = configs.set_fields(
        configs.load(CONFIGS / 'l10n.py', 'size=tiny'),
        {'data.data_dir': str(tmp_path / 'data'), 'data.vocab_size': VOCAB},
    )

    def tokenizer(seed: int):
        """The corpus of `seed` (its record file: its sentences), and its tokenizer."""
        sentences = make_sentences(600, seed)
        records.write_text('\n'.join(sentences).ljust(60_000))  # always the same size
        source = [{'en': s.encode(), 'de': s.encode()} for s in sentences]
        return datasets.load_tokenizer(config, dataset, source)

    first = tokenizer(0)
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_lib, '_train', _must_not_train)
        assert tokenizer(0).path == first.path  # written again, the same content
    other = tokenizer(1)
    assert other.path != first.path and other.path.exists() and first.path.exists()
