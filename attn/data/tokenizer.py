"""The shared source+target SentencePiece vocabulary (§5.1: ~37k BPE tokens for EN-DE).

One model is trained at prepare time from the sentences of both languages and stored in
`<directory>/<name>-<model_type><vocab_size>-<hash>/spm.model`, where the hash covers the
training sentences (or a caller's fingerprint of them) and every training option: a changed
corpus or size trains a new model, an unchanged one is loaded. Special ids are fixed to the
model's: pad 0, unk 1, bos 2, eos 3. Training is deterministic: at most `max_sentences`
sentences, drawn by a seeded reservoir sample, in input order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging
from etils import epath

from attn.errors import UserError
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID

MODEL_FILE = 'spm.model'
META_FILE = 'meta.json'
MODEL_TYPES = ('bpe', 'unigram', 'char', 'word')
_SAMPLE_SEED = 0  # the reservoir sample is part of the model's identity: keep it fixed
_TOO_HIGH = re.compile(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)')


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be used; the message names it and the fix."""


class Tokenizer:
    """SentencePiece ids with the model's fixed special ids (pad 0, unk 1, bos 2, eos 3)."""

    def __init__(self, model_proto: bytes, path: str | os.PathLike | None = None):
        self._proto = model_proto
        self.path = None if path is None else epath.Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as error:  # a truncated or overwritten file
            where = path if path is not None else 'the given model bytes'
            raise TokenizerError(
                f'The SentencePiece model {where} cannot be read ({str(error).strip()}); it is '
                'damaged or not a SentencePiece model. Restore it from a copy, or delete its '
                'directory to train it again (runs trained with the old one then refuse to '
                'resume, since their token ids would change).'
            ) from None
        found = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise TokenizerError(
                f'SentencePiece model {path} has special ids (pad, unk, bos, eos) = {found}; '
                f'the model needs {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}: retrain with train_or_load.'
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads `path` (a model file, or a directory holding spm.model)."""
        path = epath.Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        return cls(path.read_bytes(), path)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of one sentence, EOS appended."""
        return self._sp.encode(_as_str(text), add_eos=True)

    def encode_batch(self, texts: Sequence[str | bytes], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each sentence, EOS appended (C++ threads; -1 = all cores)."""
        return self._sp.encode([_as_str(t) for t in texts], add_eos=True, num_threads=num_threads)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ids [T], read up to the first EOS; pad and bos are dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self._sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save(self, directory: str | os.PathLike) -> epath.Path:
        """Writes the model to `directory`/spm.model, beside the meta.json of its training
        when it was loaded from a directory that has one; `Tokenizer.load(directory)` reads
        it back. Returns the model file's path."""
        meta = None
        if self.path is not None:
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads((self.path.parent / META_FILE).read_text())
        directory = epath.Path(directory)
        _write(directory, self._proto, meta)
        return directory / MODEL_FILE

    def __getstate__(self):  # pickled into Grain worker processes
        return {'model_proto': self._proto, 'path': None if self.path is None else str(self.path)}

    def __setstate__(self, state):
        self.__init__(state['model_proto'], state['path'])


def train_or_load(
    sentences: Callable[[], Iterable[str | bytes]] | Iterable[str | bytes],
    *,
    directory: str | os.PathLike,
    name: str,
    vocab_size: int,
    model_type: str = 'bpe',
    max_sentences: int = 1_000_000,
    character_coverage: float = 0.9999,
    byte_fallback: bool = True,
    normalization: str = 'identity',
    fingerprint: str | None = None,
    num_threads: int | None = None,
) -> Tokenizer:
    """The tokenizer of `name` at `vocab_size`, trained unless an identical one is stored.

    Args:
      sentences: the training text (both languages), or a function returning it; read once.
        With `fingerprint` set and a stored model found, it is never read.
      directory: where models live, one subdirectory per (name, type, size, inputs hash).
      name: dataset name, e.g. 'wmt14_translate-de-en'.
      vocab_size: number of pieces, special ids included.
      model_type: 'bpe' (the paper's EN-DE choice), 'unigram', 'char' or 'word'.
      max_sentences: training sample size cap (seeded reservoir sample over the whole input).
      character_coverage: share of characters given their own piece; the rarest others
        become bytes (`byte_fallback`) or unk.
      byte_fallback: encode characters outside the vocabulary as UTF-8 bytes, so any text
        round-trips instead of becoming unk (costs 256 pieces).
      normalization: SentencePiece normalization rule. 'identity' keeps every character, so
        decode(encode(s)) == s up to runs of whitespace (BLEU compares with raw references);
        'nmt_nfkc' folds Unicode variants (e.g. '…' -> '...') and does not round-trip them.
      fingerprint: a cheap identity of the corpus (e.g. TFDS name, version and split sizes)
        used instead of hashing every sentence.
      num_threads: SentencePiece trainer threads (default: all cores).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f'model_type={model_type!r}; choose one of {MODEL_TYPES}.')
    options = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        max_sentences=max_sentences,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        normalization=normalization,
    )
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    sample = None
    if fingerprint is None:
        sample, count = _sample(_iterate(sentences), max_sentences, key)
    else:
        key.update(b'fingerprint:' + fingerprint.encode())
    path = epath.Path(directory) / f'{name}-{model_type}{vocab_size}-{key.hexdigest()[:16]}'
    if (path / MODEL_FILE).exists():
        logging.info('Loading the SentencePiece model %s', path / MODEL_FILE)
        return Tokenizer.load(path)
    _check_writable(path)  # before the training, not after it
    if sample is None:
        sample, count = _sample(_iterate(sentences), max_sentences, None)
    start = time.perf_counter()
    proto = _train(sample, options, num_threads or os.cpu_count() or 1)
    meta = dict(
        options,
        name=name,
        sentences_seen=count,
        sentences_used=len(sample),
        train_seconds=round(time.perf_counter() - start, 1),
        sentencepiece=spm.__version__,
    )
    logging.info('Trained SentencePiece %s', meta)
    _write(path, proto, meta)
    return Tokenizer(proto, path / MODEL_FILE)


def _iterate(sentences) -> Iterable[str | bytes]:
    return sentences() if callable(sentences) else sentences


def _as_str(text: str | bytes) -> str:
    return text.decode('utf-8') if isinstance(text, bytes) else text


def _sample(sentences: Iterable[str | bytes], k: int, key) -> tuple[list[str], int]:
    """Seeded reservoir sample (Algorithm R) of <= k non-empty sentences, kept in input order.

    Also feeds every sentence to `key` (a hashlib object) when given. Returns (sample, count).
    """
    rng = random.Random(_SAMPLE_SEED)
    kept: list[tuple[int, str]] = []
    count = 0
    for raw in sentences:
        text = _as_str(raw).strip()
        if not text:
            continue
        if key is not None:
            key.update(text.encode('utf-8') + b'\n')
        if count < k:
            kept.append((count, text))
        else:
            j = int(rng.random() * (count + 1))
            if j < k:
                kept[j] = (count, text)
        count += 1
    kept.sort()
    return [text for _, text in kept], count


def _train(sample: list[str], options: dict, num_threads: int) -> bytes:
    """SentencePiece model proto trained on `sample`; clear error if the text is too small."""
    if not sample:
        raise ValueError('No training sentences for the SentencePiece model (empty corpus).')
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type=options['model_type'],
            vocab_size=options['vocab_size'],
            character_coverage=options['character_coverage'],
            byte_fallback=options['byte_fallback'],
            normalization_rule_name=options['normalization'],
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=0,  # sampled above, deterministically
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        match = _TOO_HIGH.search(str(e))
        if match is None:
            raise
        raise ValueError(
            f'The corpus ({len(sample)} sentences) is too small for vocab_size='
            f'{options["vocab_size"]}: SentencePiece finds at most {match.group(2)} pieces in it. '
            f'Lower vocab_size (e.g. --config.data.vocab_size={match.group(2)}) or train on more '
            'text.'
        ) from e
    return model.getvalue()


def _check_writable(path: epath.Path) -> None:
    """Raises UserError when the tokenizer about to be trained could not be written to
    `path` (a read-only data dir), naming it and the fixes."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f'.probe-{os.getpid()}'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as error:
        raise UserError(
            f'A tokenizer must be trained for this data and written to {path}, which cannot be '
            f'written ({error.strerror or error}). Make it writable, or point '
            '--config.data.data_dir (or TFDS_DATA_DIR) at a writable directory holding the '
            'data; nothing was trained.'
        ) from None


def _write(path: epath.Path, proto: bytes, meta: dict | None) -> None:
    """Writes spm.model last and by rename (replacing one there), so a model file present
    is a complete one."""
    path.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        (path / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp = path / f'{MODEL_FILE}.tmp-{os.getpid()}'
    tmp.write_bytes(proto)
    tmp.replace(path / MODEL_FILE)
