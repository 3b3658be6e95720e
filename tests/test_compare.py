"""attn.compare: paired significance tests (sacreBLEU's, and a bootstrap of perplexity)
on constructed outputs with known answers, and two toy runs compared end to end."""

import json
import os
import shutil

import numpy as np
import pytest
import sacrebleu

from attn.inference import comparison, evaluation, significance

WORDS = 'the a cell sheet value row column format insert delete open save'.split()


def _references(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [' '.join(rng.choice(WORDS, 8)) for _ in range(n)]


def _damaged(lines, share, seed):
    """`lines` with the second half of a `share` of them cut off."""
    rng = np.random.default_rng(seed)
    return [' '.join(x.split()[:4]) if rng.random() < share else x for x in lines]


def test_identical_outputs_give_p_1_and_a_zero_interval():
    refs = _references()
    system = _damaged(refs, 0.5, 1)
    bleu = significance.bleu_tests(system, list(system), refs, resamples=200, trials=200)
    assert bleu['difference'] == 0 and bleu['interval'] == [0.0, 0.0]
    assert bleu['bootstrap_p'] == bleu['randomization_p'] == 1.0
    assert significance.verdict(bleu['difference'], bleu['bootstrap_p']) == 'within noise'
    nll, tokens = np.linspace(5, 20, 300), np.full(300, 9.0)
    ppl = significance.perplexity_test((nll, tokens), (nll.copy(), tokens), resamples=200)
    assert ppl['difference'] == 0 and ppl['bootstrap_p'] == 1.0


def test_a_clearly_better_system_gives_p_below_0_01_both_ways():
    """Half the baseline's lines cut short, a tenth of the system's: the system is better by
    both tests, with an interval above zero; swapped, it is worse."""
    refs = _references()
    baseline, system = _damaged(refs, 0.5, 1), _damaged(refs, 0.1, 2)
    bleu = significance.bleu_tests(baseline, system, refs, resamples=300, trials=300)
    assert bleu['difference'] > 5 and bleu['interval'][0] > 0
    assert bleu['bootstrap_p'] < 0.01 and bleu['randomization_p'] < 0.01
    assert significance.verdict(bleu['difference'], bleu['bootstrap_p']) == 'better'
    worse = significance.bleu_tests(system, baseline, refs, resamples=300, trials=300)
    assert significance.verdict(worse['difference'], worse['bootstrap_p']) == 'worse'
    # Perplexity: lower is better.
    rng = np.random.default_rng(3)
    tokens = rng.integers(5, 20, 300).astype(float)
    base_nll = tokens * rng.uniform(2.0, 3.0, 300)
    ppl = significance.perplexity_test((base_nll, tokens), (base_nll - tokens * 0.2, tokens))
    assert ppl['difference'] < 0 and ppl['interval'][1] < 0 and ppl['bootstrap_p'] < 0.01
    assert significance.verdict(ppl['difference'], ppl['bootstrap_p'], False) == 'better'


def test_the_difference_interval_is_sacrebleus_bleu_of_the_resampled_corpora():
    """The bootstrap's differences, from sentence statistics, are sacreBLEU's corpus BLEU of
    the resampled lines (the first resamples, computed the slow way)."""
    refs = _references(60)
    baseline, system = _damaged(refs, 0.5, 1), _damaged(refs, 0.3, 2)
    indices = significance.resample_indices(len(refs), 1000)
    slow = [
        sacrebleu.corpus_bleu([system[j] for j in i], [[refs[j] for j in i]]).score
        - sacrebleu.corpus_bleu([baseline[j] for j in i], [[refs[j] for j in i]]).score
        for i in indices
    ]
    got = significance.bleu_tests(baseline, system, refs, resamples=1000, trials=100)
    np.testing.assert_allclose(got['interval'], np.percentile(slow, [2.5, 97.5]), atol=1e-9)
    whole = (
        sacrebleu.corpus_bleu(system, [refs]).score - sacrebleu.corpus_bleu(baseline, [refs]).score
    )
    assert got['difference'] == pytest.approx(whole, abs=1e-9)


def test_runs_of_other_test_sets_or_tokenizers_are_refused():
    base = {'workdir': 'A', 'references': ['x', 'y'], 'tokenizer': 't1'}
    with pytest.raises(comparison.CompareError, match=r'B and A have different test sets'):
        comparison.check_comparable([base, base | {'workdir': 'B', 'references': ['x']}], 'test')
    with pytest.raises(comparison.CompareError, match=r'different tokenizers'):
        comparison.check_comparable([base, base | {'workdir': 'B', 'tokenizer': 't2'}], 'test')


def test_two_runs_compared_reusing_an_evaluations_translations(toy_run, tmp_path):
    """The toy run against itself at step 3 (its step-6 checkpoint removed): the evaluated
    run's translations are reused, the other's decoded; against itself, p = 1."""
    workdir, data = toy_run
    evaluation.evaluate(workdir, split='test', data=data)
    early = str(tmp_path / 'early')
    shutil.copytree(workdir, early, ignore=shutil.ignore_patterns('eval'))
    shutil.rmtree(os.path.join(early, 'checkpoints', '6'))
    runs = [comparison.run_outputs(w, split='test', data=data) for w in (workdir, early, workdir)]
    assert [r['reused_translations'] for r in runs] == [True, False, True]
    assert runs[1]['checkpoint_steps'] == [3]
    report = comparison.compare(runs, 'test')
    assert report['sentences'] == len(data.splits['test'])
    first, other, same = report['runs']
    assert first['bleu'] == same['bleu'] and 'bleu_difference' not in first
    assert same['bleu_difference']['bootstrap_p'] == 1.0
    assert same['perplexity_difference']['verdict'] == 'within noise'
    assert other['perplexity'] != first['perplexity']  # another model
    assert other['perplexity_difference']['difference'] == pytest.approx(
        other['perplexity'] - first['perplexity']
    )
    # Its translations were written for the next comparison.
    name = f'test-3-beam{runs[1]["search"]["beam_size"]}-alpha{runs[1]["search"]["alpha"]:g}'
    assert evaluation.read_translations(early, name, report['sentences']) == runs[1]['translations']
    table = comparison.table(report)
    assert table.count('\n| ') == 4 and '(baseline)' in table  # the header, 3 runs
    assert json.loads(json.dumps(report)) == report  # JSON as it is


def test_seed_intervals_equal_scipys():
    """The t interval of a mean and Welch's interval of a difference, against scipy's own
    (scipy.stats.t.interval; ttest_ind(equal_var=False).confidence_interval)."""
    from scipy import stats

    a, b = [24.1, 25.3, 24.8, 23.9], [26.6, 27.2, 26.1]
    mean, low, high = significance.t_interval(a)
    want = stats.t.interval(0.95, len(a) - 1, loc=np.mean(a), scale=stats.sem(a))
    np.testing.assert_allclose([low, high], want, rtol=1e-12)
    assert mean == pytest.approx(np.mean(a))
    difference, low, high = significance.welch_interval(b, a)
    want = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    np.testing.assert_allclose([low, high], [want.low, want.high], rtol=1e-12)
    assert difference == pytest.approx(np.mean(b) - np.mean(a))
    assert significance.agrees(low, high, paper=0.5) == 'yes'
    assert significance.agrees(-high, -low, paper=0.5) == 'no'
    assert significance.agrees(-1.0, 2.0, paper=0.5) == 'within noise'


def test_agreement_where_the_paper_saw_no_change_and_degenerate_seeds(monkeypatch):
    """A change the paper did not see (its difference 0) disagrees once ours is real; runs
    alike on both sides give the difference itself as the interval; SACREBLEU_SEED=none
    draws unseeded, as sacreBLEU does."""
    assert significance.agrees(0.2, 0.9, paper=0.0) == 'no'
    assert significance.agrees(-0.2, 0.9, paper=0.0) == 'within noise'
    assert significance.welch_interval([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    monkeypatch.setenv('SACREBLEU_SEED', 'none')
    assert significance.seed() is None
    monkeypatch.setenv('SACREBLEU_SEED', '7')
    assert significance.seed() == 7
