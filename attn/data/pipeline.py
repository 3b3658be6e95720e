"""The Grain input pipeline: host-local numpy batches for training (packed) and evaluation.

Training (§5.1: "sentence pairs were batched together by approximate sequence length"): the
source is reshuffled every epoch, tokenized, examples longer than `length` dropped, and
several examples packed into each row of a global batch with Grain's first-fit packer. Every
host runs the same pipeline and keeps its own rows of each global batch, so the batches, and
the iterator's state, are the same on any number of hosts: a run resumes exactly on another
number of processes, and trains as one process would. (Each host tokenizes the whole global
batch: `worker_count` spreads that over worker processes where it shows.) Packed
rows carry, per side, segment ids 1, 2, ... per example (0 = padding) and positions restarting
at 0 for each example; the model masks attention across segments and shifts targets itself.
The iterator's state (Grain's get_state/set_state) is saved with the checkpoint, so a restored
run continues at exactly the next batch. Reading and tokenizing can run in worker processes
and packing in a background thread, while the step runs; the batches stay the same.

Evaluation: every example exactly once, in order, one per row, with its index.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from attn.data.tokenizer import Tokenizer
from attn.model.tokens import PAD_ID

# Packing bins per row of a batch: more bins fill rows a little better (first fit over more
# open rows; measured 0.916 / 0.923 / 0.928 / 0.932 target efficiency for 1 / 2 / 4 / 8 at
# rows=32, length=128) and are emitted in a shuffled order over the next few batches.
PACKING_BINS_PER_ROW = 4
# Reader threads per process. Tokenization and packing hold the GIL: with in-memory or local
# sources extra threads only contend for it (measured 2.7x slower with 2 threads); use worker
# processes (worker_count) to scale instead.
READ_THREADS = 0
EVAL_WIDTH_MULTIPLE = 8
# Examples a worker process reads and tokenizes per hand-over to the training process.
WORKER_CHUNK = 64


def feature_keys(features: tuple[str, ...]) -> tuple[str, ...]:
    """Model keys fed by `features`: ('inputs', 'targets') for a pair, ('targets',) for an LM."""
    if len(features) == 2:
        return ('inputs', 'targets')
    if len(features) == 1:
        return ('targets',)
    raise ValueError(
        f'features={features!r}: give (source, target) for translation or (text,) for a '
        'language model.'
    )


class Tokenize(grain.transforms.Map):
    """{feature: str | bytes} -> {'inputs'?, 'targets': np.int32 [L] ids ending with EOS}."""

    def __init__(self, tokenizer: Tokenizer, features: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._pairs = tuple(zip(feature_keys(features), features, strict=True))

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        return {
            key: np.asarray(self._tokenizer.encode(element[feature]), np.int32)
            for key, feature in self._pairs
        }


class FitsIn(grain.transforms.Filter):
    """Keeps examples whose every side has at most `length` tokens (EOS included)."""

    def __init__(self, length: int):
        self._length = length

    def filter(self, element: dict[str, np.ndarray]) -> bool:
        return all(len(ids) <= self._length for ids in element.values())


class RenamePacked(grain.transforms.Map):
    """Grain's packer names ({k}_segment_ids, {k}_positions) -> the model's names."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for key, value in batch.items():
            key = key.replace('_segment_ids', '_segmentation').replace('_positions', '_position')
            out[key] = value.astype(np.int32, copy=False)
        return out


class HostRows(grain.transforms.Map):
    """A global batch -> the `index`-th of its `count` equal parts of rows."""

    def __init__(self, index: int, count: int):
        self._index, self._count = index, count

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = next(iter(batch.values())).shape[0] // self._count
        return {k: v[self._index * rows : (self._index + 1) * rows] for k, v in batch.items()}


def train_batches(
    source: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    features: tuple[str, ...],
    rows: int,
    length: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    prefetch: int = 0,
) -> grain.DatasetIterator:
    """Endless iterator of packed batches, this host's rows of each global batch.

    Each batch is a dict of np.int32 [rows / shard_count, length] arrays: inputs, targets,
    inputs_segmentation, targets_segmentation, inputs_position, targets_position (for a
    language model, features=(text,), only the three targets* keys). The i-th source and the
    i-th target segment of a row are the same example; no example is split across rows.

    Args:
      source: random access examples (`len`, `[i] -> {feature: str | bytes}`), e.g.
        `tfds.data_source(...)`.
      tokenizer: the shared vocabulary.
      features: (source, target) feature names for translation, (text,) for an LM.
      rows, length: global batch shape (every host's rows together).
      seed: shuffle seed (each epoch is reshuffled).
      shard_index, shard_count: this host's rows of each global batch, the shard_index-th
        of shard_count equal parts (rows must divide evenly).
      worker_count: Grain worker processes that read and tokenize the examples (0: this
        process does). The batches are the same for every count; the saved state is not
        (a state restores only into an iterator of the same worker_count).
      worker_buffer_size: chunks of WORKER_CHUNK examples each worker holds ready.
      prefetch: batches a background thread packs ahead (0: packed on demand).
    Returns:
      A Grain iterator with get_state()/set_state().
    """
    keys = feature_keys(features)
    _check_shard(shard_index, shard_count)
    if rows < 1 or length < 1:
        raise ValueError(f'rows={rows} and length={length} must be positive.')
    if rows % shard_count:
        raise ValueError(f'rows={rows} do not split into shard_count={shard_count} equal parts.')
    ds = grain.MapDataset.source(source)
    if len(ds) == 0:
        raise ValueError('The training source is empty.')
    ds = ds.shuffle(seed).repeat()  # shuffle before repeat: each epoch a new permutation
    tokenize, fits = Tokenize(tokenizer, features), FitsIn(length)
    if worker_count:
        it = _in_workers(ds, tokenize, fits, worker_count, worker_buffer_size)
    else:
        ds = ds.map(tokenize).filter(fits)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS))
    it = grain.experimental.FirstFitPackIterDataset(
        it,
        length_struct={key: length for key in keys},
        num_packing_bins=rows * PACKING_BINS_PER_ROW,
        seed=seed,
        shuffle_bins=True,
    )
    it = it.batch(rows, drop_remainder=True).map(RenamePacked())
    if shard_count > 1:
        it = it.map(HostRows(shard_index, shard_count))
    if prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return iter(it)


class _TokenizeChunk(grain.transforms.Map):
    """A chunk of examples -> those of them that fit, tokenized, in order."""

    def __init__(self, tokenize: Tokenize, fits: FitsIn):
        self._tokenize, self._fits = tokenize, fits

    def map(self, chunk: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        return [ex for ex in map(self._tokenize.map, chunk) if self._fits.filter(ex)]


class _Unchunk(grain.experimental.FlatMapTransform):
    """A chunk of tokenized examples -> its examples, one by one."""

    max_fan_out = WORKER_CHUNK

    def flat_map(self, chunk: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return chunk


def _in_workers(ds, tokenize, fits, worker_count: int, buffer_size: int) -> grain.IterDataset:
    """The examples of `ds` tokenized and filtered by Grain worker processes, in `ds`'s
    order: worker i takes chunks i, i + n, ... and Grain takes one chunk from each in turn.
    Chunks, not examples, cross the process boundary: one at a time costs more to pass than
    to tokenize."""
    if not flags.FLAGS.is_parsed():  # Grain reads absl flags, unparsed outside absl.app
        flags.FLAGS.mark_as_parsed()  # their defaults
    chunks = ds.batch(WORKER_CHUNK, batch_fn=list).map(_TokenizeChunk(tokenize, fits))
    it = chunks.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS))
    options = grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=buffer_size
    )
    it = it.mp_prefetch(options, worker_init_fn=_exit_with_the_trainer)
    return grain.experimental.FlatMapIterDataset(it, _Unchunk())


def _exit_with_the_trainer(worker_index: int, worker_count: int) -> None:
    """Runs in each worker process: ends it once the process that started it is gone.
    Grain's workers outlive a trainer killed with SIGKILL otherwise, holding its output
    pipes open for ever."""
    del worker_index, worker_count
    trainer = os.getppid()

    def watch():
        while os.getppid() == trainer:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name='exit-with-the-trainer', daemon=True).start()


def eval_batches(
    source: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    features: tuple[str, ...],
    rows: int,
    shard_index: int = 0,
    shard_count: int = 1,
    order: Sequence[int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `source` exactly once, in order (or in `order`, a permutation of
    the example indices), none dropped for length.

    Global batch b holds examples [b * G, (b + 1) * G) of that order, G = rows *
    shard_count; this host takes rows [shard_index * rows, (shard_index + 1) * rows) of it.
    So the global batches, and every result over them, are the same whatever the number of
    hosts, and joining the hosts' rows in process order gives back that order.

    Batches hold one example per row: 'inputs'?, 'targets' [rows, W] right-padded with
    PAD_ID, W this host's longest of the batch rounded up to a multiple of 8 (per side; hosts
    agree on one W with `pad_width`), the matching *_segmentation (1 at tokens, 0 at padding)
    and *_position [rows, W], and 'index' [rows] (example index in `source`, -1 for filler
    rows). Every host yields the same number of batches (the last ones may be all filler).
    """
    keys = feature_keys(features)
    _check_shard(shard_index, shard_count)
    if rows < 1:
        raise ValueError(f'rows={rows} must be positive.')
    num_batches = max(1, math.ceil(len(source) / (rows * shard_count)))
    order = range(len(source)) if order is None else order
    batch = _EvalBatch(
        source, order, Tokenize(tokenizer, features), keys, rows, shard_index, shard_count
    )
    ds = grain.MapDataset.range(num_batches).map(batch)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS)))


class _EvalBatch(grain.transforms.Map):
    """Global batch number -> this host's rows of it, each side padded to a multiple of 8."""

    def __init__(self, source, order, tokenize: Tokenize, keys, rows, shard: int, shards: int):
        self._source, self._order, self._tokenize, self._keys = source, order, tokenize, keys
        self._rows, self._shard, self._shards = rows, shard, shards

    def map(self, number: int) -> dict[str, np.ndarray]:
        first = (number * self._shards + self._shard) * self._rows
        indices = self._order[first : first + self._rows]
        examples = [self._tokenize.map(self._source[i]) for i in indices]
        batch = {'index': np.full((self._rows,), -1, np.int32)}
        batch['index'][: len(examples)] = indices
        for key in self._keys:
            width = max((len(ex[key]) for ex in examples), default=1)
            width = EVAL_WIDTH_MULTIPLE * max(1, math.ceil(width / EVAL_WIDTH_MULTIPLE))
            tokens = np.full((self._rows, width), PAD_ID, np.int32)  # [B, W]
            for row, ex in enumerate(examples):
                tokens[row, : len(ex[key])] = ex[key]
            batch.update(_unpacked(key, tokens))
        return batch


def length_order(source, tokenizer: Tokenizer, features: tuple[str, ...]) -> list[int]:
    """The example indices of `source` by the token length of their first feature (the
    source side; the text of a language model), ties in the split's order: batches of like
    length stop their search together and pad little."""
    lengths = [len(tokenizer.encode(source[i][features[0]])) for i in range(len(source))]
    return sorted(range(len(source)), key=lengths.__getitem__)


def widths(batch: dict[str, np.ndarray], features: tuple[str, ...]) -> list[int]:
    """The padded width of each side of an evaluation batch."""
    return [batch[key].shape[1] for key in feature_keys(features)]


def pad_width(
    batch: dict[str, np.ndarray], features: tuple[str, ...], new_widths
) -> dict[str, np.ndarray]:
    """An evaluation batch with each side right-padded to `new_widths` (PAD_ID, segment 0,
    position 0), e.g. to the widest host's width, so every host's rows join into one array."""
    out = dict(batch)
    for key, width in zip(feature_keys(features), new_widths, strict=True):
        for name, fill in ((key, PAD_ID), (f'{key}_segmentation', 0), (f'{key}_position', 0)):
            extra = int(width) - batch[name].shape[1]
            out[name] = np.pad(batch[name], [(0, 0), (0, extra)], constant_values=fill)
    return out


def _unpacked(key: str, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """tokens [B, W] of one example per row -> tokens, segmentation and positions [B, W]."""
    real = tokens != PAD_ID  # [B, W]
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return {
        key: tokens,
        f'{key}_segmentation': real.astype(np.int32),
        f'{key}_position': np.where(real, positions, 0).astype(np.int32),
    }


def batch_rows(tokens_per_batch: int, length: int, process_count: int, device_count: int) -> int:
    """Rows per host so a step holds about `tokens_per_batch` tokens per side.

    The global row count (rows x process_count) is tokens_per_batch / length rounded to the
    nearest multiple of `device_count` (all devices of all hosts), so the global batch splits
    evenly over the devices.
    """
    for name, value in dict(
        tokens_per_batch=tokens_per_batch,
        length=length,
        process_count=process_count,
        device_count=device_count,
    ).items():
        if value < 1:
            raise ValueError(f'batch_rows: {name}={value} must be positive.')
    if device_count % process_count:
        raise ValueError(
            f'device_count={device_count} is not a multiple of process_count={process_count}: '
            'pass the global device count (jax.device_count()).'
        )
    if tokens_per_batch // length < device_count:
        raise ValueError(
            f'tokens_per_batch={tokens_per_batch} fills {tokens_per_batch / length:.2f} rows of '
            f'length {length}, fewer than one per device ({device_count} devices). Raise '
            f'tokens_per_batch to at least {length * device_count}, or lower the length to '
            f'{tokens_per_batch // device_count} or less.'
        )
    global_rows = device_count * math.floor(tokens_per_batch / length / device_count + 0.5)
    return global_rows // process_count


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Share of target cells [B, T] that hold a real token rather than padding."""
    if 'targets_segmentation' in batch:
        return float(np.mean(batch['targets_segmentation'] != 0))
    return float(np.mean(batch['targets'] != PAD_ID))


def _check_shard(shard_index: int, shard_count: int) -> None:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f'shard_index={shard_index} must be in [0, shard_count={shard_count}).')
