"""Is a difference between runs real? Paired tests over the sentences of one test set, and
t intervals over seeds.

BLEU: sacreBLEU's paired bootstrap resampling (Koehn 2004; 1,000 resamples) and approximate
randomization (Riezler & Maxwell 2005; 10,000 trials), as `sacrebleu --paired-bs/--paired-ar`
run them, with the 95% interval of the difference from the bootstrap's own resamples.
Perplexity: the same paired bootstrap over sentences, of exp(sum of NLL / tokens).

sacreBLEU counts the resamples whose (centred) difference is strictly beyond the observed
one, so two systems with the same score would get p = 1 / (n + 1), "significant"; a
difference of exactly zero is reported here with p = 1, as no test can tell it apart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest

RESAMPLES = 1000  # bootstrap resamples (sacreBLEU's default)
TRIALS = 10000  # approximate randomization trials (sacreBLEU's default)
LEVEL = 0.05  # a difference with p below this is called real


def seed() -> int | None:
    """The seed sacreBLEU's tests use: its SACREBLEU_SEED, default 12345; 'none' (and 0, which
    sacreBLEU passes on as no seed) draw from the OS."""
    value = os.environ.get('SACREBLEU_SEED', '12345')
    return None if value.lower() == 'none' or int(value) == 0 else int(value)


def resample_indices(n: int, resamples: int) -> np.ndarray:
    """[resamples, n] sentence indices drawn with replacement: the draws of sacreBLEU's paired
    bootstrap (the same generator, seed and call)."""
    return np.random.default_rng(seed()).choice(n, size=(resamples, n), replace=True)


def bleu_tests(
    baseline: Sequence[str],
    system: Sequence[str],
    references: Sequence[str],
    *,
    resamples: int = RESAMPLES,
    trials: int = TRIALS,
) -> dict:
    """The system's BLEU against the baseline's on the same sentences: the difference
    (system - baseline), its 95% bootstrap interval, and both tests' p-values."""
    if not len(baseline) == len(system) == len(references):
        raise ValueError(
            f'Paired tests need one output per reference: {len(baseline)} baseline, '
            f'{len(system)} system and {len(references)} reference lines.'
        )
    metric = BLEU(references=[list(references)])
    base_stats, sys_stats = (
        np.asarray(metric._extract_corpus_statistics(list(hyps), None), np.float64)
        for hyps in (baseline, system)
    )
    base_score, sys_score = (_bleu(metric, s.sum(0)) for s in (base_stats, sys_stats))
    indices = resample_indices(len(references), resamples)
    differences = np.array(
        [_bleu(metric, sys_stats[i].sum(0)) - _bleu(metric, base_stats[i].sum(0)) for i in indices]
    )
    difference = sys_score - base_score
    p_values = {}
    for test, samples in (('bs', resamples), ('ar', trials)):
        if difference == 0:
            p_values[test] = 1.0
            continue
        systems = [('baseline', list(baseline)), ('system', list(system))]
        _, scores = PairedTest(
            systems, {'BLEU': BLEU(references=[list(references)])}, None, test, samples
        )()
        p_values[test] = float(scores['BLEU'][1].p_value)
    return {
        'baseline': base_score,
        'system': sys_score,
        'difference': difference,
        'interval': _interval(differences),
        'bootstrap_p': p_values['bs'],
        'randomization_p': p_values['ar'],
        'resamples': resamples,
        'trials': trials,
    }


def perplexity_test(
    baseline: tuple[np.ndarray, np.ndarray],
    system: tuple[np.ndarray, np.ndarray],
    *,
    resamples: int = RESAMPLES,
) -> dict:
    """The system's perplexity against the baseline's: each side is (per-sentence NLL sums,
    per-sentence token counts) over the same sentences. The difference (system - baseline),
    its 95% interval and p-value by paired bootstrap over sentences (the draws and the
    centred statistic of sacreBLEU's BLEU test)."""
    (base_nll, base_tokens), (sys_nll, sys_tokens) = (
        (np.asarray(nll, np.float64), np.asarray(tokens, np.float64))
        for nll, tokens in (baseline, system)
    )
    if not len(base_nll) == len(sys_nll):
        raise ValueError(
            f'Paired tests need the same sentences: {len(base_nll)} != {len(sys_nll)}.'
        )

    def perplexity(nll, tokens):  # [..., n] -> [...]
        return np.exp(nll.sum(-1) / tokens.sum(-1))

    indices = resample_indices(len(base_nll), resamples)
    base, sys = perplexity(base_nll, base_tokens), perplexity(sys_nll, sys_tokens)
    differences = perplexity(sys_nll[indices], sys_tokens[indices]) - perplexity(
        base_nll[indices], base_tokens[indices]
    )
    return {
        'baseline': float(base),
        'system': float(sys),
        'difference': float(sys - base),
        'interval': _interval(differences),
        'bootstrap_p': _centred_p(differences, float(sys - base)),
        'resamples': resamples,
    }


def verdict(difference: float, p: float, higher_is_better: bool = True) -> str:
    """'better', 'worse' or 'within noise' (p >= LEVEL) for a system - baseline difference."""
    if p >= LEVEL or difference == 0:
        return 'within noise'
    return 'better' if (difference > 0) == higher_is_better else 'worse'


def _bleu(metric: BLEU, stats: np.ndarray) -> float:
    return float(metric._compute_score_from_stats(list(stats)).score)


def _interval(samples: np.ndarray) -> list[float]:
    """The central 95% of the resampled values."""
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def _centred_p(differences: np.ndarray, observed: float) -> float:
    """Share of resampled |differences| beyond the observed one after centring them on zero
    (sacreBLEU's paired bootstrap statistic), p = 1 for a zero difference."""
    if observed == 0:
        return 1.0
    spread = np.abs(differences) - np.abs(differences).mean()
    return float((np.sum(spread > abs(observed)) + 1) / (len(differences) + 1))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of `values` (2 or more runs, e.g.
    one config at several seeds)."""
    from scipy import stats  # here: importing scipy.stats takes a second and probes torch

    values = np.asarray(values, np.float64)
    n = len(values)
    if n < 2:
        raise ValueError(f'A t interval needs 2 or more values, not {n}.')
    mean = float(values.mean())
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return mean, mean - float(half), mean + float(half)


def welch_interval(
    system: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """(difference, low, high) of the means, system - baseline, by Welch's t interval (runs
    of two configs, 2 or more seeds each, variances not assumed equal)."""
    from scipy import stats

    a, b = (np.asarray(x, np.float64) for x in (system, baseline))
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f'A Welch interval needs 2 or more values a side, not {len(a)}, {len(b)}.')
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    difference = float(a.mean() - b.mean())
    if va + vb == 0:  # every run alike on both sides: no spread to widen it
        return difference, difference, difference
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof) * np.sqrt(va + vb))
    return difference, difference - half, difference + half


def agrees(low: float, high: float, paper: float) -> str:
    """'yes' or 'no' (the sign of an interval that excludes zero against the paper's
    difference; 'no' where the paper saw none), 'within noise' where the interval holds
    zero."""
    if low <= 0 <= high:
        return 'within noise'
    if paper == 0:
        return 'no'
    return 'yes' if (low > 0) == (paper > 0) else 'no'
