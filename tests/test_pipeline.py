"""The Grain input pipeline: packing, length filter, exact resume, sharding, eval coverage."""

import json

import numpy as np
import pytest

from attn.data import pipeline
from attn.data import tokenizer as tokenizer_lib
from attn.model.tokens import EOS_ID, PAD_ID

EN = 'the a house garden small green water bread child school street city big old new red'.split()
DE = 'das ein Haus Garten klein grün Wasser Brot Kind Schule Straße Stadt groß alt neu rot'.split()
FEATURES = ('en', 'de')
N = 300


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n EN-DE pairs, unique by their leading number, lognormal lengths (mean ~8 words)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        k = int(np.clip(rng.lognormal(np.log(7), 0.6), 1, 60))
        words = rng.integers(0, len(EN), k)
        en = ' '.join(EN[w] for w in words)
        de = ' '.join(DE[w] for w in words[: max(1, k + int(rng.integers(-1, 3)))])
        pairs.append({'en': f'{i} {en}.', 'de': f'{i} {de.capitalize()}.'})
    return pairs


@pytest.fixture(scope='module')
def pairs():
    return make_pairs(N)


@pytest.fixture(scope='module')
def tok(pairs, tmp_path_factory):
    text = [s for ex in pairs for s in (ex['en'], ex['de'])]
    directory = tmp_path_factory.mktemp('spm')
    return tokenizer_lib.train_or_load(text, directory=directory, name='p', vocab_size=320)


@pytest.fixture(scope='module')
def index_of(pairs):
    return {ex['de']: i for i, ex in enumerate(pairs)}


def row_segments(tokens, segments, positions):
    """One packed row [T] -> token lists per segment; checks contiguity and positions."""
    out = []
    count = segments.max()
    assert sorted(set(segments.tolist()) - {0}) == list(range(1, count + 1))
    assert np.all(tokens[segments == 0] == PAD_ID)
    assert np.all(np.diff((segments == 0).astype(int)) >= 0)  # padding only at the end
    for s in range(1, count + 1):
        (where,) = np.nonzero(segments == s)
        assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
        assert np.array_equal(positions[where], np.arange(len(where)))  # restart at 0
        ids = tokens[where]
        assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]  # whole example, EOS last
        out.append(ids)
    return out


def batch_examples(batch, tok, index_of, pairs):
    """Example indices of a batch in row-major order; checks source/target correspondence."""
    found = []
    for r in range(batch['targets'].shape[0]):
        targets = row_segments(*(batch[k][r] for k in pipeline_keys('targets')))
        if 'inputs' in batch:
            inputs = row_segments(*(batch[k][r] for k in pipeline_keys('inputs')))
            assert len(inputs) == len(targets)
        for s, ids in enumerate(targets):
            i = index_of[tok.decode(ids)]
            if 'inputs' in batch:
                assert tok.decode(inputs[s]) == pairs[i]['en']  # i-th source = i-th target
            found.append(i)
    return found


def pipeline_keys(side):
    return side, f'{side}_segmentation', f'{side}_position'


def take(it, n):
    return [next(it) for _ in range(n)]


def lengths(pairs, tok):
    return np.array([[len(tok.encode(ex[f])) for f in FEATURES] for ex in pairs])


def test_packed_batches(pairs, tok, index_of):
    it = pipeline.train_batches(pairs, tok, features=FEATURES, rows=4, length=48, seed=0)
    keys = {*pipeline_keys('inputs'), *pipeline_keys('targets')}
    for batch in take(it, 6):
        assert set(batch) == keys
        assert all(v.shape == (4, 48) and v.dtype == np.int32 for v in batch.values())
        assert len(batch_examples(batch, tok, index_of, pairs)) > 4  # several per row


def test_length_filter_keeps_exactly_the_examples_that_fit(pairs, tok, index_of):
    fits = set(np.nonzero(np.all(lengths(pairs, tok) <= 16, axis=1))[0].tolist())
    assert 0 < len(fits) < N  # the corpus has both kinds
    it = pipeline.train_batches(pairs, tok, features=FEATURES, rows=4, length=16, seed=1)
    seen = []
    while len(seen) < 2 * len(fits):
        seen += batch_examples(next(it), tok, index_of, pairs)
    assert set(seen) == fits


def test_packing_efficiency_floor(pairs, tok):
    # Lengths ~ lognormal, mean ~35 tokens (p99 ~100), into rows of 128 as WMT's ~33 would go.
    it = pipeline.train_batches(pairs, tok, features=FEATURES, rows=8, length=128, seed=0)
    assert np.mean([pipeline.packing_efficiency(b) for b in take(it, 10)]) > 0.85  # ~0.93


def test_restored_iterator_continues_at_the_next_batch(pairs, tok):
    # The 281 examples that fit fill ~39 batches of 4 x 64: 90 batches cross two epochs.
    def make():
        return pipeline.train_batches(pairs, tok, features=FEATURES, rows=4, length=64, seed=3)

    it = make()
    states, batches = [], []
    for _ in range(90):
        states.append(json.loads(json.dumps(it.get_state())))  # as a checkpoint stores it
        batches.append(next(it))
    examples = sum(int(b['targets_segmentation'].max(axis=1).sum()) for b in batches)
    assert examples > 2 * N  # the states span two epoch boundaries
    for step in (0, 7, 37, 38, 39, 40, 41, 78, 79, 80, 86):
        restored = make()
        restored.set_state(states[step])
        for expected in batches[step : step + 4]:
            got = next(restored)
            assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_workers_and_prefetch_give_the_same_batches_and_restore_exactly(pairs, tok):
    """Worker processes (chunks of 64 examples, two epochs' worth in 40 batches) and the
    prefetch thread change nothing in the batches; a state saved with them restores to the
    next batch."""

    def make(**pipeline_options):
        return pipeline.train_batches(
            pairs, tok, features=FEATURES, rows=4, length=64, seed=3, **pipeline_options
        )

    expected = take(make(), 40)
    it = make(worker_count=2, worker_buffer_size=2, prefetch=2)
    states, batches = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(it.get_state())))  # as a checkpoint stores it
        batches.append(next(it))
    it.set_state(states[37])  # (a fresh process restoring is tests/test_train.py's kill -9)
    batches += take(it, 3)
    it.close()
    for got, want in zip(batches, expected + expected[37:], strict=True):
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_seed_controls_order_and_epochs_reshuffle(pairs, tok, index_of):
    def order(seed):
        it = pipeline.train_batches(pairs, tok, features=FEATURES, rows=4, length=64, seed=seed)
        return [i for b in take(it, 100) for i in batch_examples(b, tok, index_of, pairs)]

    fits = set(np.nonzero(np.all(lengths(pairs, tok) <= 64, axis=1))[0].tolist())
    n, window = len(fits), 60  # packing reorders within 16 bins (~30 examples) only
    first = order(0)
    assert len(first) > 2 * n and first == order(0)
    assert first[:n] != order(1)[:n]
    assert len(set(first[: n - window])) == n - window  # no example twice within an epoch
    assert set(first[: n + window]) == fits  # every example in each epoch
    assert first[window : n - window] != first[n + window : 2 * n - window]  # reshuffled


def test_hosts_rows_join_into_the_one_process_batches(pairs, tok):
    """3 hosts each keep a third of the rows of every global batch: joined in host order,
    they are the batches one process reads, so training is the same on any number of
    processes and the iterator state is one state."""

    def batches(shard, count):
        it = pipeline.train_batches(
            pairs,
            tok,
            features=FEATURES,
            rows=6,
            length=64,
            seed=0,
            shard_index=shard,
            shard_count=count,
        )
        return [next(it) for _ in range(5)], it.get_state()

    whole, state = batches(0, 1)
    parts = [batches(shard, 3) for shard in range(3)]
    for b, batch in enumerate(whole):
        for key, value in batch.items():
            joined = np.concatenate([part[b][key] for part, _ in parts])
            np.testing.assert_array_equal(joined, value, err_msg=key)
    assert all(part_state == state for _, part_state in parts)


def test_language_model_mode(pairs, tok, index_of):
    it = pipeline.train_batches(pairs, tok, features=('de',), rows=3, length=32, seed=0)
    batch = next(it)
    assert set(batch) == set(pipeline_keys('targets'))
    assert len(batch_examples(batch, tok, index_of, pairs)) >= 3


@pytest.mark.parametrize('features', [FEATURES, ('de',)])
def test_eval_covers_every_example_once_in_order(pairs, tok, features):
    pairs = pairs[:100]
    long_pair = {'en': ' '.join(EN * 10) + '.', 'de': ' '.join(DE * 10) + '.'}
    pairs[37] = long_pair
    batches = list(pipeline.eval_batches(pairs, tok, features=features, rows=8))
    assert len(batches) == 13
    index = np.concatenate([b['index'] for b in batches])
    assert np.array_equal(index[:100], np.arange(100)) and np.all(index[100:] == -1)
    keys = pipeline.feature_keys(features)
    for b in batches:
        for key, feature in zip(keys, features, strict=True):
            width = b[key].shape[1]
            assert width % 8 == 0 and b[key].shape[0] == 8
            assert np.array_equal(b[f'{key}_segmentation'], (b[key] != PAD_ID).astype(np.int32))
            for row, i in enumerate(b['index']):
                text = tok.decode(b[key][row]) if i >= 0 else ''
                assert text == (pairs[i][feature] if i >= 0 else '')
    assert max(b['targets'].shape[1] for b in batches) > 160  # the long pair was kept


@pytest.mark.parametrize('features', [FEATURES, ('de',)])
def test_eval_batches_follow_a_given_order(pairs, tok, features):
    """By source length (`length_order`): every example once, in that order, each batch's
    sources of like length."""
    order = pipeline.length_order(pairs, tok, features)
    assert sorted(order) == list(range(len(pairs)))
    batches = list(pipeline.eval_batches(pairs, tok, features=features, rows=8, order=order))
    indices = [int(i) for b in batches for i in b['index'] if i >= 0]
    assert indices == order
    lengths = [len(tok.encode(pairs[i][features[0]])) for i in order]
    assert lengths == sorted(lengths)


def test_eval_shards_line_up(pairs, tok):
    pairs = pairs[:17]
    shards = [
        list(
            pipeline.eval_batches(
                pairs, tok, features=FEATURES, rows=4, shard_index=s, shard_count=3
            )
        )
        for s in range(3)
    ]
    assert [len(s) for s in shards] == [2, 2, 2]  # 6, 6, 5 examples: same step count
    index = np.concatenate([b['index'] for s in shards for b in s])
    assert sorted(index[index >= 0].tolist()) == list(range(17))


def test_batch_rows():
    assert pipeline.batch_rows(4096, 128, 1, 1) == 32
    assert pipeline.batch_rows(25000, 256, 2, 16) == 48  # 97.7 rows -> 96 global
    assert pipeline.batch_rows(4096, 128, 1, 3) == 33
    with pytest.raises(ValueError, match='fewer than one per device.*at least 8192'):
        pipeline.batch_rows(4096, 128, 1, 64)
    with pytest.raises(ValueError, match='not a multiple of process_count'):
        pipeline.batch_rows(4096, 128, 3, 4)


def test_packing_efficiency():
    batch = {'targets': np.array([[5, 6, 0, 0], [7, 0, 0, 0]], np.int32)}
    assert pipeline.packing_efficiency(batch) == 3 / 8
    batch['targets_segmentation'] = np.array([[1, 1, 0, 0], [1, 2, 2, 0]], np.int32)
    assert pipeline.packing_efficiency(batch) == 5 / 8
