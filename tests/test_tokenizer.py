"""The shared SentencePiece tokenizer: fixed special ids, round trips, reuse vs retrain."""

import pickle

import numpy as np
import pytest

from attn.data import tokenizer as tokenizer_lib
from attn.errors import UserError
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID

WORDS = (
    'the house is small and the garden green water bread child school street city money '
    'das Haus ist klein und der Garten grün Wasser Brot Kind Schule Straße Stadt Geld '
    'über für Mädchen Bäume schön größer Füße café naïve résumé déjà élève français'
).split()
PUNCT = ['.', '!', '?', ',', ';', ':', ' (ok).', ' – gut.', ' „ja“.', ' «oui».']
VOCAB = 400


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences of 3-15 words (EN, DE and FR words mixed), ending in punctuation."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, rng.integers(3, 16))
        text = ' '.join(words) + str(rng.choice(PUNCT))
        out.append(f'{text[0].upper()}{text[1:]} {i}' if i % 5 == 0 else text[0].upper() + text[1:])
    return out


@pytest.fixture(scope='module')
def corpus():
    return make_sentences(600)


@pytest.fixture(scope='module')
def tok(corpus, tmp_path_factory):
    directory = tmp_path_factory.mktemp('spm')
    return tokenizer_lib.train_or_load(corpus, directory=directory, name='t', vocab_size=VOCAB)


def test_special_ids_are_the_models(tok):
    pieces = [tok.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)]
    assert pieces == ['<pad>', '<unk>', '<s>', '</s>']
    assert tok.vocab_size == VOCAB


@pytest.mark.parametrize(
    'text',
    [
        'Die Bäume sind größer als das Haus, über die Straße!',
        'Déjà vu: naïve café, résumé — « voilà » ¿qué?',
        'Füße (ok) – gut; „ja“ 42.',
        'Unseen: 北京, Ωμέγα, emoji 🙂 and tab-free ß.',
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[-1] == EOS_ID
    assert EOS_ID not in ids[:-1] and PAD_ID not in ids and BOS_ID not in ids
    assert UNK_ID not in ids  # byte fallback: unseen characters become bytes
    assert tok.decode(ids) == text
    assert tok.encode(text.encode('utf-8')) == ids  # TFDS features arrive as bytes


def test_decode_stops_at_eos_and_drops_pad_and_bos(tok):
    ids = tok.encode('Das Haus ist klein.')
    noisy = [BOS_ID, *ids, PAD_ID, PAD_ID, *tok.encode('Garbage after the end.')]
    assert tok.decode(np.asarray(noisy, np.int32)) == 'Das Haus ist klein.'
    assert tok.decode([PAD_ID, *ids[:-1], PAD_ID]) == 'Das Haus ist klein.'


def test_encode_batch_matches_encode(tok, corpus):
    assert tok.encode_batch(corpus[:20]) == [tok.encode(s) for s in corpus[:20]]


def test_pickles(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode('Schöne Straße.') == tok.encode('Schöne Straße.')
    assert again.path == tok.path


def test_reuse_when_unchanged_retrain_when_changed(corpus, tok, monkeypatch):
    directory = tok.path.parent.parent
    monkeypatch.setattr(tokenizer_lib, '_train', _must_not_train)
    again = tokenizer_lib.train_or_load(
        lambda: iter(corpus), directory=directory, name='t', vocab_size=VOCAB
    )
    assert again.path == tok.path
    monkeypatch.undo()
    changed = tokenizer_lib.train_or_load(
        [*corpus[:-1], 'Ein neuer Satz.'], directory=directory, name='t', vocab_size=VOCAB
    )
    resized = tokenizer_lib.train_or_load(corpus, directory=directory, name='t', vocab_size=380)
    paths = {tok.path, changed.path, resized.path}
    assert len(paths) == 3 and all(p.exists() for p in paths)
    assert resized.vocab_size == 380


def test_fingerprint_skips_reading_the_corpus(corpus, tmp_path):
    kwargs = dict(directory=tmp_path, name='t', vocab_size=VOCAB, fingerprint='tfds:1.0.0:600')
    first = tokenizer_lib.train_or_load(lambda: iter(corpus), **kwargs)
    again = tokenizer_lib.train_or_load(_must_not_read, **kwargs)
    assert again.path == first.path


def test_training_is_deterministic(corpus, tok, tmp_path):
    again = tokenizer_lib.train_or_load(corpus, directory=tmp_path, name='t', vocab_size=VOCAB)
    assert again.path.read_bytes() == tok.path.read_bytes()


def test_sample_is_capped_seeded_and_in_order():
    sentences = [f's{i}' for i in range(1000)]
    sample, count = tokenizer_lib._sample(iter(sentences), 100, None)
    assert count == 1000 and len(sample) == 100 and len(set(sample)) == 100
    assert sample == sorted(sample, key=lambda s: int(s[1:]))  # input order kept
    assert int(sample[-1][1:]) > 500  # drawn from the whole stream, not its head
    assert tokenizer_lib._sample(iter(sentences), 100, None)[0] == sample


def test_max_sentences_caps_training(corpus, tmp_path):
    tok = tokenizer_lib.train_or_load(
        corpus, directory=tmp_path, name='t', vocab_size=350, max_sentences=300
    )
    meta = (tok.path.parent / tokenizer_lib.META_FILE).read_text()
    assert '"sentences_used": 300' in meta and '"sentences_seen": 600' in meta


def test_too_small_corpus_says_what_to_change(corpus, tmp_path):
    with pytest.raises(ValueError, match=r'too small for vocab_size=20000.*Lower vocab_size'):
        tokenizer_lib.train_or_load(corpus, directory=tmp_path, name='t', vocab_size=20000)
    with pytest.raises(ValueError, match='empty corpus'):
        tokenizer_lib.train_or_load(['', ' '], directory=tmp_path, name='t', vocab_size=300)


def _must_not_train(*args, **kwargs):
    raise AssertionError('retrained a tokenizer whose inputs did not change')


def _must_not_read():
    raise AssertionError('read the corpus although the fingerprint matched')


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_a_damaged_model_file_is_named(tok, tmp_path, damage):
    from attn.errors import UserError

    model = tmp_path / 'spm.model'
    good = tok.path.read_bytes()
    model.write_bytes(good[: len(good) // 3] if damage == 'truncated' else b'not a model')
    with pytest.raises(UserError, match=f'SentencePiece model {model} cannot be read'):
        tokenizer_lib.Tokenizer.load(tmp_path)


def test_an_unwritable_directory_is_named_before_training(corpus, tmp_path, monkeypatch):
    """(As root, permissions do not stop a write: a file where a folder must go does.)"""
    (tmp_path / 'data').write_text('a file where the data dir goes')
    monkeypatch.setattr(tokenizer_lib, '_train', _must_not_train)
    with pytest.raises(UserError, match=r'written to .*/data/tokenizers/t-bpe400-.* cannot be'):
        tokenizer_lib.train_or_load(
            corpus, directory=tmp_path / 'data' / 'tokenizers', name='t', vocab_size=VOCAB
        )
