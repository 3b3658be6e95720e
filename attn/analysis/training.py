"""Heads followed through training (`attn.analyze --over_training`): every kept checkpoint's
head importance, attention entropy and peak weight on the same sentences, as curves over
steps. When do heads specialize (Voita et al., 2019), and which are prunable, since when
(Michel et al., 2019)?"""

from __future__ import annotations

import collections
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from attn import rundir  # noqa: E402
from attn.analysis import heads, report  # noqa: E402

# heads.json's fields followed, and how the pictures name them.
METRICS = {
    'importance': 'importance |dL/dξ|',
    'entropy': 'entropy (nats)',
    'confidence': 'peak weight (no EOS)',
}


def kept_steps(workdir: str) -> list[int]:
    """Every checkpoint step the run kept (`keep_checkpoints=None` keeps them all)."""
    ckpt = rundir.open_checkpoints(workdir)
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def over_training(workdir: str, out: str, *, data=None, **what) -> dict:
    """Writes heads_over_training.json ({module: [per head {'head', 'steps', and a list
    per METRICS field}]}) and one picture per attention kind to `out`; returns a summary.
    `what` to analyse (sentences, split, source, target) and `data` as in `report.analyze`."""
    steps = kept_steps(workdir)
    curves: dict[str, list[dict]] = {}
    batch = tokens = None
    for step in steps:
        run = rundir.load(workdir, step=step)
        kind = run.config.model_kind
        if batch is None:  # the same sentences at every step
            batch, data = report.open_sentences(workdir, run.config, data=data, **what)
            tokens = report.axis_tokens(batch, kind, data.tokenizer)
        maps = heads.attention_maps(run.model, batch, kind)
        _, table = report.head_table(run.model, batch, kind, maps, tokens)
        for module, rows in table.items():
            series = curves.setdefault(
                module, [{'head': r['head'], 'steps': []} | {m: [] for m in METRICS} for r in rows]
            )
            for head, row in zip(series, rows, strict=True):
                head['steps'].append(step)
                for metric in METRICS:
                    head[metric].append(row[metric])
    os.makedirs(out, exist_ok=True)
    report.write_json(os.path.join(out, 'heads_over_training.json'), curves)
    pictures = plot(curves, kind, out)
    return {'steps': steps, 'sentences': len(batch['targets']), 'pictures': pictures}


def plot(curves: dict[str, list[dict]], model_kind: str, out: str) -> list[str]:
    """One PNG per attention kind: rows = METRICS, columns = layers, a line per head."""
    by_kind = collections.defaultdict(list)
    for module, series in curves.items():
        by_kind[report.kind_of(module, model_kind)].append(series)
    paths = []
    for kind, layers in by_kind.items():
        rows, cols = len(METRICS), len(layers)
        fig, axes = plt.subplots(
            rows, cols, figsize=(3.2 * cols + 1, 2.4 * rows + 1), squeeze=False, sharex=True
        )
        for col, series in enumerate(layers):
            for row, (metric, label) in enumerate(METRICS.items()):
                ax = axes[row][col]
                for head in series:
                    ax.plot(head['steps'], head[metric], 'o-', ms=3, label=f'head {head["head"]}')
                ax.set_title(f'layer {col}', fontsize=8)
                ax.set_ylabel(label, fontsize=8)
                if row == rows - 1:
                    ax.set_xlabel('training step', fontsize=8)
        axes[0][-1].legend(fontsize=6)
        fig.suptitle(f'{kind}: heads through training')
        fig.tight_layout()
        path = os.path.join(out, f'heads_over_training-{kind}.png')
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
