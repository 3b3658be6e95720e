"""From `config.data` to ready inputs: TFDS data sources (array_record), the shared
tokenizer and the Grain iterators over them.

The embedded corpus (`l10n_translate`) is built on demand. WMT14 and LM1B come from
TFDS's own builders and are prepared ahead of a launch (`python -m attn.prepare`), on a
machine with internet; here they are only read, never downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import json
import os
import re
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from attn import configs
from attn.data import pipeline
from attn.data import tokenizer as tokenizer_lib
from attn.errors import UserError
from attn.training import distributed

EMBEDDED = 'l10n_translate'
# Hosts the TFDS builders download from, checked before a download is attempted (an
# offline TFDS download otherwise retries for minutes before failing).
DOWNLOAD_HOSTS = {'wmt14_translate': 'www.statmt.org', 'lm1b': 'www.statmt.org'}
# TFDS modules that register builders only once imported.
REGISTERING_MODULES = {'wmt14_translate': 'tensorflow_datasets.translate.wmt14'}


class DataError(UserError, RuntimeError):
    """A dataset that is missing or cannot be built; the message says how to get it."""


def builder_name(data_config) -> str:
    """'name/config' as TFDS spells it (just 'name' when there is no builder config)."""
    return f'{data_config.name}/{data_config.config}' if data_config.config else data_config.name


def data_dir(data_config) -> str:
    """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data_config.data_dir or tfds.core.constants.DATA_DIR)


def features(config) -> tuple[str, ...]:
    """(source, target) text features for translation, (text,) for a language model."""
    if config.model_kind == 'lm':
        return (config.data.target_lang,)
    return (config.data.source_lang, config.data.target_lang)


def _host_reachable(host: str, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _missing(data_config, reason: str) -> DataError:
    name = builder_name(data_config)
    return DataError(
        f'Dataset {name} is not prepared in {data_dir(data_config)} ({reason}). On a machine with '
        f'internet run: python -m attn.prepare --config=<this config> '
        f'--config.data.data_dir=/shared/tensorflow_datasets, then point '
        f'--config.data.data_dir at that shared directory.'
    )


def builder(data_config, *, prepare: bool = False) -> tfds.core.DatasetBuilder:
    """The dataset's TFDS builder, prepared as array_record.

    The embedded corpus is built whenever it is missing; other datasets are built only
    with `prepare=True` and only when their download host answers.
    """
    directory = data_dir(data_config)
    if data_config.name == EMBEDDED:
        from attn.data import l10n_translate  # registers the builder

        with _building(directory):
            return l10n_translate.prepare(data_config.config, directory)
    if data_config.name in REGISTERING_MODULES:
        importlib.import_module(REGISTERING_MODULES[data_config.name])
    try:
        dataset = tfds.builder(
            builder_name(data_config), data_dir=directory, file_format='array_record'
        )
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataError(f'Unknown TFDS dataset {builder_name(data_config)}: {error}') from error
    if dataset.is_prepared():
        return dataset
    if not prepare:
        raise _missing(data_config, 'not built yet')
    host = DOWNLOAD_HOSTS.get(data_config.name)
    if host and not _host_reachable(host):
        raise _missing(data_config, f'{host} cannot be reached from here')
    logging.info('Building %s in %s (array_record)...', builder_name(data_config), directory)
    with _building(directory):
        dataset.download_and_prepare(file_format='array_record')
    return dataset


@contextlib.contextmanager
def _building(directory: str) -> Iterator[None]:
    """A dataset that cannot be written (a read-only or full disk) as one DataError."""
    try:
        yield
    except OSError as error:
        reason = f'{error.strerror or type(error).__name__}: {error.filename or directory}'
        raise DataError(
            f'Cannot build the dataset in {directory} ({reason}). Point '
            '--config.data.data_dir at a writable directory with room for it, or build it '
            'where it can be written (python -m attn.prepare) and copy it here.'
        ) from error


def sources(dataset: tfds.core.DatasetBuilder, splits: Sequence[str]) -> dict[str, Any]:
    """Random-access array_record sources for `splits` (names, or TFDS split specs such as
    'validation[:100]'); a DataError naming the dataset's splits for one it lacks."""
    name = dataset.info.full_name
    available = sorted(dataset.info.splits)  # empty under tfds.testing.mock_data
    fix = (
        f'its splits are {available}: pass one as attn.evaluate --split=... or as '
        'config.data.eval_split / config.data.test_split.'
    )
    opened = {}
    for split in splits:
        if available and re.fullmatch(r'\w+', split) and split not in available:
            close = difflib.get_close_matches(split, available, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            raise DataError(f'There is no split {split!r} in {name}{hint}; {fix}')
        try:
            opened[split] = dataset.as_data_source(split=split)
        except ValueError as error:  # TFDS: a slice or sum of splits it cannot read
            reason = str(error).strip().splitlines()[0].rstrip('.')
            raise DataError(f'Split {split!r} of {name}: {reason}; {fix}') from error
        opened[split] = _CheckedSource(dataset, split, opened[split])
        opened[split].probe()
    return opened


class _CheckedSource:
    """A split's random-access source whose damaged records raise a DataError naming the
    dataset's directory and the fix, wherever in the file the damage lies (a truncated or
    overwritten record file either fails its chunk checksum or reads as examples whose
    every field is None)."""

    def __init__(self, dataset: tfds.core.DatasetBuilder, split: str, source):
        # Names, not the builder: Grain's worker processes receive the source pickled.
        self.name, self.directory = dataset.info.full_name, str(dataset.data_dir)
        self.split, self.source = split, source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        try:
            example = self.source[index]
        except Exception as error:  # noqa: BLE001 - any decoding failure: a damaged file
            raise self._damaged(index) from error
        if any(value is None for value in example.values()):
            raise self._damaged(index)
        return example

    def probe(self) -> None:
        """Reads the first, middle and last examples, so that a file damaged there fails
        before any work starts."""
        for index in sorted({0, len(self) // 2, len(self) - 1} - {-1}):
            self[index]

    def _damaged(self, index: int) -> DataError:
        return DataError(
            f'Example {index} of the {self.split!r} split of {self.name} in {self.directory} '
            'cannot be read: its record file is damaged or truncated. '
            f'Delete {self.directory} and build it again (python -m attn.prepare '
            '--config=<this config>; the embedded corpus is rebuilt on the next run). '
            'Checkpoints are not touched.'
        )


def load_tokenizer(
    config, dataset: tfds.core.DatasetBuilder, train_source
) -> tokenizer_lib.Tokenizer:
    """The shared SentencePiece model, trained on the training split the first time. Its
    cache key holds the split's content (`split_digest`), so a corpus rebuilt with other
    text, even of the same size, gets a tokenizer of its own."""
    names = features(config)

    def sentences():
        for i in range(len(train_source)):
            example = train_source[i]
            for name in names:
                yield example[name]

    directory = os.path.join(data_dir(config.data), 'tokenizers')
    digest = split_digest(dataset, 'train', directory)
    return tokenizer_lib.train_or_load(
        sentences,
        directory=directory,
        name=builder_name(config.data).replace('/', '-'),
        vocab_size=config.data.vocab_size,
        fingerprint=f'{dataset.info.full_name}:{len(train_source)}:{digest}',
    )


DIGESTS = 'digests.json'  # in the tokenizers' directory: {file: [*_stamp(file), sha256]}


def split_digest(dataset: tfds.core.DatasetBuilder, split: str, cache_dir: str) -> str:
    """sha256 over the sha256 of each record file of `split`: the text a tokenizer trained on
    it saw. Reading a large split takes seconds, so each file's hash is kept in
    `cache_dir`/digests.json with its size and modification time, and read again only after
    the file changes (a rebuild); where the cache cannot be written, it is computed again."""
    cache_path = epath.Path(cache_dir) / DIGESTS
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digest, changed = hashlib.sha256(), False
    for path in sorted(epath.Path(p) for p in dataset.info.splits[split].filepaths):
        stamp = _stamp(path)
        entry = cache.get(str(path))
        if entry is None or entry[:-1] != stamp:
            with path.open('rb') as f:
                entry = [*stamp, hashlib.file_digest(f, 'sha256').hexdigest()]
            cache[str(path)], changed = entry, True
        digest.update(entry[-1].encode())
    if changed:
        with contextlib.suppress(OSError):  # a read-only data dir: computed on every load
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache_path.parent / f'.{DIGESTS}.{os.getpid()}'
            temporary.write_text(json.dumps(cache, indent=1))
            temporary.replace(cache_path)
    return digest.hexdigest()[:16]


def _stamp(path: epath.Path) -> list[int]:
    """What changes when a file is written again: size and mtime (local files: in ns, and
    the inode)."""
    if '://' in str(path):
        stat = path.stat()
        return [stat.length, int(stat.mtime)]
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


@dataclasses.dataclass
class Data:
    """A tokenizer and the splits a run reads, with the iterators the loop consumes."""

    tokenizer: tokenizer_lib.Tokenizer
    features: tuple[str, ...]
    splits: dict[str, Any]

    def train_iterator(self, config, restart_at: int | None = None):
        """Packed, shuffled training batches, this host's rows of each global batch
        (checkpointable). `restart_at`: a step at which the data order starts afresh (a
        resume whose saved iterator state does not fit): a new shuffle, seeded by the data
        seed and that step."""
        seed = configs.source_seed(config, 'data')
        if restart_at is not None:
            seed = int(np.random.SeedSequence([seed, restart_at]).generate_state(1)[0])
        return pipeline.train_batches(
            self.splits['train'],
            self.tokenizer,
            features=self.features,
            rows=self.train_layout(config)['global_rows'],
            length=config.data.max_length,
            seed=seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            worker_count=config.data.worker_count,
            worker_buffer_size=config.data.worker_buffer_size,
            prefetch=config.data.prefetch,
        )

    def train_layout(self, config) -> dict[str, int]:
        """What the training iterator's saved state is laid out by: the rows of a global
        batch (every host's, accumulated microbatches included), whatever the number of
        processes. A state restores exactly into an iterator of the same layout."""
        rows = pipeline.batch_rows(
            config.data.tokens_per_batch,
            config.data.max_length,
            jax.process_count(),
            jax.device_count(),
        )
        return {'global_rows': rows * jax.process_count() * config.grad_accum_steps}

    def eval_batches(
        self, config, split: str | None = None, by_length: bool = False
    ) -> Iterator[dict]:
        """Every example of `split` (default config.data.eval_split), one per row; in the
        split's order, or `by_length`, by source length (`pipeline.length_order`)."""
        rows = max(1, config.data.eval_batch_size // jax.process_count())
        local = jax.local_device_count()
        rows = -(-rows // local) * local  # a multiple of this host's devices
        source = self.splits[split or config.data.eval_split]
        order = pipeline.length_order(source, self.tokenizer, self.features) if by_length else None
        batches = pipeline.eval_batches(
            source,
            self.tokenizer,
            features=self.features,
            rows=rows,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            order=order,
        )
        for batch in batches:  # hosts pad each side to the widest host's width
            widths = distributed.agreed_max(pipeline.widths(batch, self.features))
            yield pipeline.pad_width(batch, self.features, widths)


def load(config, splits: Sequence[str] | None = None) -> Data:
    """Opens (building the embedded corpus and tokenizer if needed, on process 0 while the
    other processes wait) the splits a run reads."""
    splits = {'train', *(splits or [config.data.eval_split])}  # train: the tokenizer's text

    def open_all():
        dataset = builder(config.data)
        opened = sources(dataset, sorted(splits))
        return opened, load_tokenizer(config, dataset, opened['train'])

    # Process 0 builds what is missing (the corpus, the tokenizer); the others then read it.
    opened, tokenizer = distributed.main_first('attn-data', open_all)
    if tokenizer.vocab_size != config.data.vocab_size:
        raise DataError(
            f'The tokenizer has {tokenizer.vocab_size} pieces but config.data.vocab_size is '
            f'{config.data.vocab_size}.'
        )
    return Data(tokenizer, features(config), opened)


def text(value) -> str:
    """A text feature of an example as str (TFDS gives bytes; in-memory data may be str)."""
    return value.decode() if isinstance(value, bytes) else str(value)
