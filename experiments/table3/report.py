"""Table 3 report: each row's run beside the paper's numbers.

    python experiments/table3/report.py --root=runs/table3 [--out=runs/table3/report]

Reads every row's workdir under --root (W/config.json, W/metrics.jsonl and the evaluation
report W/eval/<split>-<step>.json that `launch/sweep.py` has `attn.evaluate` write), and
writes report.md and table3.png to --out. Rows without a finished run are listed as
missing, not left out. Runs of other seeds (<row>-seedN, and <row>-initN, <row>-dropoutN,
<row>-dataN for one noise source) are listed under seed noise.

Each row's change from base gets a 95% interval: Welch's t interval over seeds where the row
and base both have 3 or more runs of every seed; otherwise the paired bootstrap of
`attn.compare` between their first runs (sacreBLEU and perplexity on the eval split), which
holds test-set noise only and is labelled so (it needs the runs' checkpoints and dataset).
"Agrees with the paper" is yes or no only where the interval excludes zero.
"""

import json
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from attn import configs, rundir  # noqa: E402
from attn import plot as learning_curves  # noqa: E402
from attn.errors import UserError  # noqa: E402
from attn.inference import comparison, significance  # noqa: E402
from attn.model.config import ModelConfig  # noqa: E402
from attn.summary import summarize  # noqa: E402

table3 = configs.load_module(pathlib.Path(__file__).parents[2] / 'configs' / 'table3.py')

SOURCES = configs.SEED_SOURCES
_ROOT = flags.DEFINE_string('root', 'runs/table3', 'Folder holding one workdir per row.')
_OUT = flags.DEFINE_string('out', None, 'Where report.md and table3.png go (default: --root).')


def read_run(workdir: pathlib.Path) -> dict | None:
    """Our figures for one row, or None when the run has no evaluation report yet."""
    if not (workdir / 'config.json').exists():
        return None
    config = configs.upgrade(json.loads((workdir / 'config.json').read_text()))
    split, steps = config.data.eval_split, config.total_steps
    report = rundir.read_report(str(workdir), split, steps, config)
    if report is None:
        return None
    rows = learning_curves.read_metrics(str(workdir))
    train_rows = [r for r in rows if 'split' not in r and 'time' in r]
    wall = train_rows[-1]['time'] - train_rows[0]['time'] if len(train_rows) > 1 else None
    return {
        'dataset': f'{config.data.name}/{config.data.config}',
        'model': config.model.to_dict(),
        'seeds': {source: configs.source_seed(config, source) for source in SOURCES},
        'params': summarize(config)['params'],
        'steps': steps,
        'wall_minutes': None if wall is None else wall / 60,
        'perplexity': report['perplexity'],
        'bleu': report['paper_bleu']['bleu'],
        'sacrebleu': report['sacrebleu']['bleu'],
    }


def _cell(value, fmt: str) -> str:
    return '—' if value is None else format(value, fmt)


def deltas(results: dict[str, dict | None]) -> dict[str, tuple | None]:
    """(ours dPPL, ours dBLEU, paper dPPL, paper dBLEU) of each row against base; ours are
    None where the row or base has no run. At a reduced scale only these compare."""
    base = results.get('base')
    paper_ppl, paper_bleu, _ = table3.PAPER['base']
    out = {}
    for row, ours in results.items():
        ppl, bleu, _ = table3.PAPER[row]
        mine = (None, None)
        if ours is not None and base is not None:
            mine = (ours['perplexity'] - base['perplexity'], ours['bleu'] - base['bleu'])
        out[row] = (*mine, ppl - paper_ppl, bleu - paper_bleu)
    return out


def settings(results: dict[str, dict | None]) -> str:
    """The data and base model the runs share, from the base run (or any finished one)."""
    run = results.get('base') or next((r for r in results.values() if r), None)
    if run is None:
        return 'No run has finished yet.'
    m = run['model']
    layout = 'pre-LN' if m['pre_ln'] else 'post-LN (as the paper)'
    return (
        f'Data `{run["dataset"]}`; the {"base" if results.get("base") else "first finished"} '
        f'run has N={m["num_layers"]}, d_model={m["emb_dim"]}, d_ff={m["mlp_dim"]}, '
        f'h={m["num_heads"]}, {layout}, {run["steps"]} steps.'
    )


def markdown(
    results: dict[str, dict | None],
    root: pathlib.Path,
    seeds: dict | None = None,
    spans: dict | None = None,
) -> str:
    lines = [
        '# Table 3: ours beside the paper',
        '',
        f'Runs under `{root}`. {settings(results)} Ours: dev perplexity and BLEU (tokenized, '
        'compound-split, as the paper; sacreBLEU beside it) without checkpoint averaging, and '
        "their change from our base row (d); the paper's the same from its base. Params of "
        "our configs; the paper's Table 3 params are for WMT14 base widths. Training wall "
        'time counts the logged steps only.',
        '',
        '| row | ours: params (M) | steps | wall (min) | PPL | BLEU | sacreBLEU | dPPL | dBLEU '
        '| paper: params (M) | PPL | BLEU | dPPL | dBLEU |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    changes = deltas(results)
    spans = spans or {}
    for row, ours in results.items():
        ppl, bleu, params = table3.PAPER[row]
        my_dppl, my_dbleu, paper_dppl, paper_dbleu = changes[row]
        paper = f'{_cell(params, "d")} | {ppl:.2f} | {bleu:.1f} | {paper_dppl:+.2f}'
        paper += f' | {paper_dbleu:+.1f}'
        if ours is None:
            lines.append(f'| {row} | missing | | | | | | | | {paper} |')
            continue
        lines.append(
            f'| {row} | {ours["params"] / 1e6:.2f} | {ours["steps"]} | '
            f'{_cell(ours["wall_minutes"], ".1f")} | {ours["perplexity"]:.2f} | '
            f'{ours["bleu"]:.1f} | {ours["sacrebleu"]:.1f} | {_cell(my_dppl, "+.2f")} | '
            f'{_cell(my_dbleu, "+.1f")} | {paper} |'
        )
    lines += against_base(results, spans)
    lines += seed_noise(seeds or {})
    return '\n'.join(lines) + '\n'


def all_seeds(row: str, results: dict, seeds: dict) -> list[dict]:
    """The row's runs at seeds of every noise source (its first run alone without more)."""
    runs = [run for _, run in seeds.get(row, [])]
    return runs or ([results[row]] if results.get(row) else [])


def intervals(results: dict, seeds: dict, root: pathlib.Path) -> dict[str, dict | None]:
    """Each row's change from base with a 95% interval, per metric: (change, low, high) and
    where the interval comes from, or None where neither seeds nor a bootstrap give one."""
    base = all_seeds('base', results, seeds)
    outputs = {}  # attn.compare's per-run outputs, read once

    def run_outputs(row):
        if row not in outputs:
            try:
                split = configs.upgrade(json.loads((root / row / 'config.json').read_text()))
                outputs[row] = comparison.run_outputs(str(root / row), split=split.data.eval_split)
            except (UserError, OSError) as error:
                outputs[row] = None
                print(f'{row}: no bootstrap ({error})')  # noqa: T201
        return outputs[row]

    out = {}
    for row in results:
        runs = all_seeds(row, results, seeds)
        if row == 'base' or not runs or not base:
            continue
        if len(runs) >= 3 and len(base) >= 3:
            out[row] = {
                metric: significance.welch_interval(
                    [r[metric] for r in runs], [r[metric] for r in base]
                )
                for metric in ('perplexity', 'bleu')
            } | {'from': f'seeds ({len(runs)} and {len(base)} runs)'}
            continue
        mine, theirs = run_outputs(row), run_outputs('base')
        if mine is not None and theirs is not None:
            try:
                comparison.check_comparable([theirs, mine], 'eval')
            except comparison.CompareError as error:
                print(f'{row}: no bootstrap ({error})')  # noqa: T201
                mine = None
        if mine is None or theirs is None:
            out[row] = None
            continue
        bleu = significance.bleu_tests(
            theirs['translations'], mine['translations'], theirs['references']
        )
        ppl = significance.perplexity_test(
            (theirs['nll'], theirs['tokens']), (mine['nll'], mine['tokens'])
        )
        out[row] = {
            'perplexity': (ppl['difference'], *ppl['interval']),
            'bleu': (bleu['difference'], *bleu['interval']),
            'from': 'test set only (paired bootstrap, sacreBLEU)',
        }
    return out


def against_base(results: dict, spans: dict | None) -> list[str]:
    """The section of each row's change from base with its interval and the paper's."""
    if not spans:
        return []
    lines = [
        '',
        '## Changes from base, with 95% intervals',
        '',
        "Where the row and base both have 3 or more seeds, Welch's t interval over seeds (BLEU "
        'tokenized as the paper); otherwise the paired bootstrap of their first runs on the '
        'eval split, which shows test-set noise only (BLEU: sacreBLEU). "Agrees" is yes or no '
        "against the paper's sign only where the interval excludes zero.",
        '',
        '| row | dPPL [95%] | dBLEU [95%] | interval from | paper dPPL | paper dBLEU | '
        'agrees (PPL) | agrees (BLEU) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    changes = deltas(results)
    for row, span in spans.items():
        _, _, paper_ppl, paper_bleu = changes[row]
        if span is None:
            lines.append(
                f'| {row} | — | — | no seeds, no checkpoints | {paper_ppl:+.2f} | '
                f'{paper_bleu:+.1f} | — | — |'
            )
            continue
        (dp, pl, ph), (db, bl, bh) = span['perplexity'], span['bleu']
        lines.append(
            f'| {row} | {dp:+.2f} [{pl:+.2f}, {ph:+.2f}] | {db:+.2f} [{bl:+.2f}, {bh:+.2f}] | '
            f'{span["from"]} | {paper_ppl:+.2f} | {paper_bleu:+.1f} | '
            f'{significance.agrees(pl, ph, paper_ppl)} | '
            f'{significance.agrees(bl, bh, paper_bleu)} |'
        )
    return lines


def read_seeds(root: pathlib.Path) -> dict[str, list[tuple[tuple[int, ...], dict]]]:
    """Rows run with more than one seed: row (every noise source's seed varies) or
    'row (sources)' (only those vary) -> [(their seeds, figures)], from the row's workdir
    and its <row>-seedN, <row>-initN, ... workdirs (`launch/sweep.py ... --arg=seed=N`),
    keeping the runs with the same data and model as the first."""
    out = {}
    for row in table3.ROWS:
        workdirs = [root / row, *sorted(root.glob(f'{row}-*'))]
        runs = [run for run in map(read_run, workdirs) if run is not None]
        # Compared as ModelConfig: a config saved before a field existed has its default.
        kind = [(run['dataset'], ModelConfig.from_mapping(run['model'])) for run in runs]
        same = [run for run, k in zip(runs, kind, strict=True) if k == kind[0]]
        groups = {}
        for run in same[1:]:
            varied = tuple(s for s in SOURCES if run['seeds'][s] != same[0]['seeds'][s])
            groups.setdefault(varied, [same[0]]).append(run)
        for varied, group in groups.items():
            name = row if len(varied) == len(SOURCES) else f'{row} ({", ".join(varied)})'
            by_seed = {tuple(run['seeds'][s] for s in varied): run for run in group}
            if len(by_seed) > 1:
                out[name] = sorted(by_seed.items())
    return out


def _seeds(seeds: tuple[int, ...]) -> str:
    """One run's varied seeds: one number where they are all the same."""
    return str(seeds[0]) if len(set(seeds)) == 1 else '/'.join(map(str, seeds))


def seed_noise(seeds: dict[str, list[tuple[int, dict]]]) -> list[str]:
    """The seed-noise section of the report: each seed's figures and their spread."""
    if not seeds:
        return []
    lines = [
        '',
        '## Seed noise',
        '',
        'Rows trained with several seeds (initialization, dropout and data order; `row '
        '(sources)`: those alone, the others as the first run). A change from base smaller '
        "than base's spread here is within seed noise.",
        '',
        '| row | seeds | PPL | BLEU | PPL spread | BLEU spread | PPL mean [95% t] | '
        'BLEU mean [95% t] |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for row, runs in seeds.items():
        ppl = [run['perplexity'] for _, run in runs]
        bleu = [run['bleu'] for _, run in runs]
        means = [significance.t_interval(x) for x in (ppl, bleu)]
        lines.append(
            f'| {row} | {", ".join(_seeds(seeds) for seeds, _ in runs)} | '
            f'{", ".join(f"{p:.2f}" for p in ppl)} | {", ".join(f"{b:.1f}" for b in bleu)} | '
            f'{max(ppl) - min(ppl):.2f} | {max(bleu) - min(bleu):.1f} | '
            + ' | '.join(f'{m:.2f} [{lo:.2f}, {hi:.2f}]' for m, lo, hi in means)
            + ' |'
        )
    return lines


def plot(results: dict[str, dict | None], path: pathlib.Path, spans: dict | None = None) -> None:
    """Each row's change in dev BLEU and perplexity from base: ours (bars, with their 95%
    intervals where there are some), the paper's (markers)."""
    rows = [row for row in results if row != 'base']
    changes = deltas(results)
    spans = spans or {}
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for ax, mine, paper, label in ((axes[0], 1, 3, 'dev BLEU'), (axes[1], 0, 2, 'dev perplexity')):
        metric = 'bleu' if mine == 1 else 'perplexity'
        ours = [changes[r][mine] or 0.0 for r in rows]
        errors = [[0.0] * len(rows), [0.0] * len(rows)]
        for i, row in enumerate(rows):
            if spans.get(row):  # the bar is then the interval's own change (seed means, or
                # sacreBLEU's for a bootstrap), so that the interval sits on it
                ours[i], low, high = spans[row][metric]
                errors[0][i], errors[1][i] = ours[i] - low, high - ours[i]
        ax.bar(rows, ours, color='tab:blue', label='ours (95% interval)', yerr=errors, capsize=3)
        ax.plot(rows, [changes[r][paper] for r in rows], 'o', color='tab:red', label='paper')
        ax.axhline(0.0, color='gray', linewidth=0.8)
        ax.set_ylabel(f'{label} - base')
        ax.legend(loc='upper right')
    axes[1].set_xlabel('Table 3 row (rows without a run, or without base, have no bar)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    root = pathlib.Path(_ROOT.value)
    out = pathlib.Path(_OUT.value or root)
    out.mkdir(parents=True, exist_ok=True)
    results = {row: read_run(root / row) for row in table3.ROWS}
    seeds = read_seeds(root)
    spans = intervals(results, seeds, root)
    report = markdown(results, root, seeds, spans)
    finished = [str(root / row) for row, run in results.items() if run is not None]
    if finished:
        learning_curves.write(finished, str(out / 'curves'))
        report += '\n[Learning curves of the finished rows](curves/steps.png) (`curves/`).\n'
    (out / 'report.md').write_text(report)
    plot(results, out / 'table3.png', spans)
    done = sum(r is not None for r in results.values())
    print(f'{done} of {len(results)} rows finished; wrote {out}/report.md and table3.png')  # noqa: T201


if __name__ == '__main__':
    app.run(main)
