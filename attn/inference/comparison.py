"""Several runs on one test set, each against the first: BLEU and perplexity with paired
significance tests (`attn.compare`)."""

from __future__ import annotations

import numpy as np

from attn import rundir
from attn.data import datasets
from attn.errors import UserError
from attn.inference import evaluation, scoring, significance
from attn.training import distributed


class CompareError(UserError, ValueError):
    """Runs that cannot be compared; names the difference."""


def run_outputs(
    workdir: str,
    *,
    split: str,
    step=None,
    average_last: int = 1,
    beam_size: int | None = None,
    alpha: float | None = None,
    data: datasets.Data | None = None,
) -> dict:
    """One run's translations of `split` (its evaluation's, when `attn.evaluate` already wrote
    them with these settings; else decoded now, and written), per-sentence NLL and token
    counts, and what must agree between compared runs (references, tokenizer). `data`
    defaults to the run's dataset."""
    run = rundir.load(workdir, step=step, average_last=average_last)
    config = run.config
    if config.model_kind != 'transformer':
        raise CompareError(
            f'{workdir} is a language model: attn.compare tests translations (BLEU); compare '
            'language models by their perplexity in attn.evaluate.'
        )
    data = data or datasets.load(config, [split])
    beam_size = beam_size or config.decode.beam_size
    alpha = config.decode.alpha if alpha is None else alpha
    name = rundir.report_name(split, run.steps, (beam_size, alpha))
    examples = len(data.splits[split])
    hypotheses = evaluation.read_translations(workdir, name, examples)
    # Decoding is collective: every process decodes unless every one of them read the file.
    reused = not distributed.agreed_max([hypotheses is None])[0]
    if not reused:
        hypotheses, _, _ = evaluation.translate_split(
            run.model, config, data, split, beam_size=beam_size, alpha=alpha, mesh=run.mesh
        )
        if distributed.is_main():
            evaluation.write_translations(workdir, hypotheses, name)
    records = list(scoring.score_split(run, data, split))
    return {
        'workdir': workdir,
        'checkpoint_steps': run.steps,
        'translations': hypotheses,
        'reused_translations': reused,
        'nll': np.array([-r['logprob'] for r in records], np.float64),
        'tokens': np.array([r['num_tokens'] for r in records], np.float64),
        'references': evaluation.references(data, split),
        'tokenizer': rundir.tokenizer_fingerprint(data.tokenizer),
        'search': {'beam_size': beam_size, 'alpha': alpha},
    }


def check_comparable(runs: list[dict], split: str) -> None:
    """Refuses runs scored on another test set or through another tokenizer than the first."""
    first = runs[0]
    for other in runs[1:]:
        if other['references'] != first['references']:
            raise CompareError(
                f'{other["workdir"]} and {first["workdir"]} have different {split} sets '
                f'({len(other["references"])} and {len(first["references"])} references, or '
                'other sentences): compare runs of one dataset.'
            )
        if other['tokenizer'] != first['tokenizer']:
            raise CompareError(
                f'{other["workdir"]} and {first["workdir"]} use different tokenizers: their '
                'perplexities count different tokens. Compare runs trained with one tokenizer.'
            )


def compare(runs: list[dict], split: str) -> dict:
    """The report: every run's BLEU and perplexity, and each one's difference from the first
    with its tests and verdict."""
    check_comparable(runs, split)
    first = runs[0]
    report = {'split': split, 'sentences': len(first['references']), 'runs': []}
    for run in runs:
        entry = {
            'workdir': run['workdir'],
            'checkpoint_steps': run['checkpoint_steps'],
            'search': run['search'],
            'reused_translations': run['reused_translations'],
        }
        bleu = significance.bleu_tests(
            first['translations'], run['translations'], first['references']
        )
        ppl = significance.perplexity_test(
            (first['nll'], first['tokens']), (run['nll'], run['tokens'])
        )
        entry['bleu'], entry['perplexity'] = bleu['system'], ppl['system']
        if run is not first:
            entry['bleu_difference'] = bleu | {
                'verdict': significance.verdict(bleu['difference'], bleu['bootstrap_p'])
            }
            entry['perplexity_difference'] = ppl | {
                'verdict': significance.verdict(ppl['difference'], ppl['bootstrap_p'], False)
            }
        report['runs'].append(entry)
    return report


def table(report: dict) -> str:
    """The report as a short markdown table."""
    lines = [
        f'{report["split"]}: {report["sentences"]} sentences; each run against the first, '
        f'p < {significance.LEVEL} (BLEU: sacreBLEU paired bootstrap; perplexity: bootstrap '
        'over sentences)',
        '',
        '| run | BLEU | ΔBLEU [95%] | p (bs / ar) | BLEU verdict | ppl | Δppl [95%] | p | '
        'ppl verdict |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for entry in report['runs']:
        cells = [entry['workdir'], f'{entry["bleu"]:.2f}']
        if 'bleu_difference' not in entry:
            cells += ['(baseline)', '', '', f'{entry["perplexity"]:.3f}', '', '', '']
        else:
            b, p = entry['bleu_difference'], entry['perplexity_difference']
            cells += [
                f'{b["difference"]:+.2f} [{b["interval"][0]:+.2f}, {b["interval"][1]:+.2f}]',
                f'{b["bootstrap_p"]:.4f} / {b["randomization_p"]:.4f}',
                b['verdict'],
                f'{entry["perplexity"]:.3f}',
                f'{p["difference"]:+.3f} [{p["interval"][0]:+.3f}, {p["interval"][1]:+.3f}]',
                f'{p["bootstrap_p"]:.4f}',
                p['verdict'],
            ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
