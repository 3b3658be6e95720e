"""Learning curves of several runs on shared axes: training loss, validation perplexity and
BLEU (where logged) against steps and against wall time.

    python -m attn.plot --workdirs=W1,W2,... --out=D

Writes D/steps.png, D/wall.png and D/curves.json (per run, per metric, the
[step, wall seconds since the run's first record, value] points plotted), read from each
W/metrics.jsonl. Each run's legend names the fields of its W/config.json that differ from
the first run's (`W2: model.num_heads=16, seed=1`).
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from attn import cli, configs  # noqa: E402
from attn.errors import UserError  # noqa: E402

# (name in curves.json, the row's field); eval rows' names are '<split>/perplexity', ...
METRICS = (('train/loss', 'loss'), ('perplexity', 'perplexity'), ('bleu', 'bleu'))
AXES = {'steps': (0, 'step'), 'wall': (1, 'wall time since the first record (s)')}
_SHOWN_DIFFERENCES = 6  # more differing fields than this are counted, not listed


def read_metrics(workdir: str) -> list[dict]:
    """The rows of W/metrics.jsonl, as `metrics.truncate_jsonl` leaves them: an unreadable
    line (cut short by a kill) is skipped. UserError when the file is missing."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist: {workdir} is not the workdir of a run.')
    rows = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and 'step' in row and 'time' in row:
                rows.append(row)
    return rows


def curves(rows: list[dict]) -> dict[str, list[list[float]]]:
    """metric -> [[step, wall seconds since the first row, value]] in the order logged;
    training rows give 'train/loss', eval rows '<split>/perplexity' and '<split>/bleu'."""
    if not rows:
        return {}
    start = min(row['time'] for row in rows)
    out = {}
    for row in rows:
        is_eval = 'split' in row
        for name, field in METRICS:
            if field in row and is_eval == (name != 'train/loss'):
                key = f'{row["split"]}/{name}' if is_eval else name
                point = [row['step'], round(row['time'] - start, 3), row[field]]
                out.setdefault(key, []).append(point)
    return out


def flatten(config: dict, prefix: str = '') -> dict:
    """{'model': {'num_heads': 8}} -> {'model.num_heads': 8}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f'{prefix}{key}.')
        else:
            out[f'{prefix}{key}'] = value
    return out


def label(name: str, config: dict | None, reference: dict | None) -> str:
    """'name: a.b=v, c=w' listing the dotted fields of `config` that differ from
    `reference` (both as read from config.json); just the name when either is None."""
    if config is None or reference is None:
        return name
    mine, theirs = flatten(config), flatten(reference)
    keys = sorted(mine.keys() | theirs.keys())
    changed = [f'{k}={mine.get(k, "(unset)")}' for k in keys if mine.get(k) != theirs.get(k)]
    if not changed:
        return f'{name}: same config'
    if len(changed) > _SHOWN_DIFFERENCES:
        more = len(changed) - _SHOWN_DIFFERENCES
        changed = [*changed[:_SHOWN_DIFFERENCES], f'+{more} more']
    return f'{name}: {", ".join(changed)}'


def _read_config(workdir: str) -> dict | None:
    """W/config.json through `configs.upgrade`: a field that an older run lacks is no
    difference when it has the value that run used."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return configs.upgrade(json.load(f)).to_dict()


def _names(workdirs: list[str]) -> list[str]:
    """Each workdir's last path component, or the whole path where two components agree."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else list(workdirs)


def collect(workdirs: list[str]) -> list[dict]:
    """Per run: {'workdir', 'label', 'curves'}; labels compare configs with the first run's
    (whose label is its name)."""
    saved = [_read_config(w) for w in workdirs]
    runs = []
    for w, name, config in zip(workdirs, _names(workdirs), saved, strict=True):
        reference = saved[0] if runs else None
        runs.append({'workdir': w, 'label': label(name, config, reference)})
        runs[-1]['curves'] = curves(read_metrics(w))
    return runs


def _metric(name: str) -> tuple:
    """The METRICS entry of a curve's name ('validation/perplexity' -> the perplexity one)."""
    return next(metric for metric in METRICS if name.endswith(metric[0]))


def _draw(runs: list[dict], axis: str, path: str) -> None:
    """One panel per metric any run logged, every run on it, x = step or wall time."""
    names = {name for run in runs for name in run['curves']}
    names = sorted(names, key=lambda name: METRICS.index(_metric(name)))
    column, xlabel = AXES[axis]
    fig, axes = plt.subplots(
        len(names), 1, figsize=(9, 2.8 * len(names)), sharex=True, squeeze=False
    )
    for ax, name in zip(axes[:, 0], names, strict=True):
        for color, run in enumerate(runs):
            points = run['curves'].get(name, [])
            xs, ys = [p[column] for p in points], [p[2] for p in points]
            ax.plot(xs, ys, marker='.' if len(points) < 30 else None, color=f'C{color}')
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    lines, labels = axes[0, 0].get_lines(), [run['label'] for run in runs]  # one line per run
    fig.legend(lines, labels, loc='upper center', bbox_to_anchor=(0.5, 0.0), fontsize='small')
    fig.savefig(path, dpi=110, bbox_inches='tight')  # 'tight' keeps the legend below the panels
    plt.close(fig)


def write(workdirs: list[str], out: str) -> list[dict]:
    """Writes out/steps.png, out/wall.png and out/curves.json for `workdirs`; returns the runs."""
    runs = collect(workdirs)
    if not any(run['curves'] for run in runs):
        raise UserError(f'Nothing to plot: no loss, perplexity or BLEU rows in {workdirs}.')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'curves.json'), 'w', encoding='utf-8') as f:
        json.dump({'runs': runs}, f, indent=1)
    for axis in AXES:
        _draw(runs, axis, os.path.join(out, f'{axis}.png'))
    return runs


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.workdirs or FLAGS.out is None:
        raise app.UsageError('--workdirs=W1,W2,... and --out=D are required.')
    runs = write(FLAGS.workdirs, FLAGS.out)
    plotted = sum(len(points) for run in runs for points in run['curves'].values())
    wrote = f'{FLAGS.out}/steps.png, wall.png, curves.json'
    print(f'{plotted} points of {len(runs)} runs; wrote {wrote}')  # noqa: T201


def run():
    flags.DEFINE_list('workdirs', None, 'Comma-separated workdirs; legends compare with the first.')
    flags.DEFINE_string('out', None, 'Directory for steps.png, wall.png and curves.json.')
    cli.run(main)


if __name__ == '__main__':
    run()
