"""What `attn.analyze` writes of a checkpoint's attention: heatmaps per layer and head, head
statistics and importance, the pruning curve, and bertviz's arrays."""

from __future__ import annotations

import collections
import itertools
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attn import rundir  # noqa: E402
from attn.analysis import heads  # noqa: E402
from attn.data import datasets  # noqa: E402
from attn.inference import scoring  # noqa: E402
from attn.model import shift_right  # noqa: E402
from attn.model.tokens import PAD_ID  # noqa: E402

HEATMAP_SENTENCES = 3


def sentence_batch(data: datasets.Data, config, split: str, count: int) -> dict[str, np.ndarray]:
    """The first `count` examples of `split`, one per row, without filler rows."""
    rows = []
    for batch in data.eval_batches(config, split):
        rows += [{k: v[i] for k, v in batch.items()} for i in range(len(batch['index']))]
        if len(rows) >= count:
            break
    rows = [r for r in rows if r['index'] >= 0][:count]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != 'index'}
    return _trim(batch)


def _trim(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops all-padding columns at the right of each side."""
    out = {}
    for side in ('inputs', 'targets'):
        if side not in batch:
            continue
        width = int((batch[side] != PAD_ID).sum(1).max())
        out |= {k: v[:, :width] for k, v in batch.items() if k.startswith(side)}
    return out


def axis_tokens(batch, kind: str, tokenizer) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(query ids, key ids) [B, T] / [B, S] of each attention kind."""
    decoder = np.asarray(
        shift_right(batch['targets'], batch['targets_segmentation'], batch['targets_position'])
    )  # PAD where the target is padding
    if kind == 'lm':
        return {'self_attention': (decoder, decoder)}
    return {
        'encoder_self_attention': (batch['inputs'], batch['inputs']),
        'decoder_self_attention': (decoder, decoder),
        'cross_attention': (decoder, batch['inputs']),
    }


def kind_of(module: str, model_kind: str) -> str:
    """'encoder.0.self_attention' -> 'encoder_self_attention' (LM: 'self_attention')."""
    if model_kind == 'lm':
        return 'self_attention'
    side, _, attention = module.split('.')
    return attention if attention == 'cross_attention' else f'{side}_{attention}'


def plot_heatmaps(maps, model_kind, tokens, tokenizer, sentence: int, out: str) -> list[str]:
    """One PNG per attention kind: rows = layers, columns = heads."""
    by_kind = collections.defaultdict(list)
    for module, weights in maps.items():
        by_kind[kind_of(module, model_kind)].append(weights[sentence])  # [N, T, S]
    paths = []
    for kind, per_layer in by_kind.items():
        query_ids, key_ids = (t[sentence] for t in tokens[kind])
        T, S = int((query_ids != PAD_ID).sum()), int((key_ids != PAD_ID).sum())
        q_labels = [tokenizer.id_to_piece(int(i)) for i in query_ids[:T]]
        k_labels = [tokenizer.id_to_piece(int(i)) for i in key_ids[:S]]
        L, N = len(per_layer), per_layer[0].shape[0]
        fig, axes = plt.subplots(L, N, figsize=(2.2 * N + 1, 2.2 * L + 1), squeeze=False)
        for (layer, head), ax in zip(itertools.product(range(L), range(N)), axes.flat, strict=True):
            ax.imshow(per_layer[layer][head, :T, :S], cmap='viridis', vmin=0, vmax=1)
            ax.set_title(f'layer {layer} head {head}', fontsize=7)
            ax.set_xticks(range(S), k_labels, rotation=90, fontsize=5)
            ax.set_yticks(range(T), q_labels, fontsize=5)
        fig.suptitle(f'{kind}, sentence {sentence} (rows: queries, columns: keys)')
        fig.tight_layout()
        path = os.path.join(out, f'attention-{sentence}-{kind}.png')
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_pruning(curve, total_heads: int, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([n for n, _ in curve], [p for _, p in curve], 'o-')
    ax.set_xlabel(f'heads masked, least important first (of {total_heads})')
    ax.set_ylabel('perplexity of the analysed sentences')
    ax.set_yscale('log')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bertviz_export(maps, model_kind, tokens, tokenizer) -> dict:
    """Sentence 0 as bertviz takes it: per kind, per layer [1, heads, query, key]."""
    export = {'tokens': {}, 'attention': collections.defaultdict(list)}
    for module, weights in maps.items():
        kind = kind_of(module, model_kind)
        query_ids, key_ids = (t[0] for t in tokens[kind])
        T, S = int((query_ids != PAD_ID).sum()), int((key_ids != PAD_ID).sum())
        export['attention'][kind].append(weights[0:1, :, :T, :S].tolist())
        export['tokens'][kind] = {
            'query': [tokenizer.id_to_piece(int(i)) for i in query_ids[:T]],
            'key': [tokenizer.id_to_piece(int(i)) for i in key_ids[:S]],
        }
    return export


def head_table(model, batch, kind: str, maps, tokens) -> tuple[dict, dict]:
    """(importance [N] per module, heads.json's rows per module: entropy, confidence, mean
    distance and importance of every head) of `model` on `batch`."""
    importance = heads.head_importance(model, batch, kind)
    table = {}
    for module, weights in maps.items():
        query_ids, key_ids = tokens[kind_of(module, kind)]
        stats = heads.head_statistics(weights, query_ids, key_ids)
        for head, row in enumerate(stats):
            row |= {'head': head, 'importance': float(importance[module][head])}
        table[module] = stats
    return importance, table


def open_sentences(workdir, config, *, sentences, split=None, data=None, source=None, target=None):
    """(batch, data) of the sentences to analyse: the first `sentences` of `split` (default
    the eval split) of `data` (default the run's dataset), or of the files `source` and
    `target` (as `attn.score` reads them; these need the workdir alone)."""
    if source is not None or target is not None:
        data, split = scoring.open_data(workdir, config, split, source, target)
    else:
        split = split or config.data.eval_split
        data = data or datasets.load(config, [split])
    return sentence_batch(data, config, split, sentences), data


def analyze(
    workdir: str,
    out: str,
    *,
    sentences: int,
    split: str | None = None,
    prune_steps: int = 8,
    data: datasets.Data | None = None,
    step: int | str | None = None,
    average_last: int = 1,
    source: str | None = None,
    target: str | None = None,
) -> dict:
    """Writes the pictures and JSON files of a checkpoint's attention to `out` (`step`
    and `average_last` as in `rundir.load`): of the first `sentences` of `split` (default
    the eval split) of `data` (default the run's dataset), or of the files `source` and
    `target` (as `attn.score` reads them; these need the workdir alone)."""
    run = rundir.load(workdir, step=step, average_last=average_last)
    kind = run.config.model_kind
    batch, data = open_sentences(
        workdir,
        run.config,
        sentences=sentences,
        split=split,
        data=data,
        source=source,
        target=target,
    )
    os.makedirs(out, exist_ok=True)
    maps = heads.attention_maps(run.model, batch, kind)
    tokens = axis_tokens(batch, kind, data.tokenizer)
    pictures = []
    for sentence in range(min(HEATMAP_SENTENCES, len(batch['targets']))):
        pictures += plot_heatmaps(maps, kind, tokens, data.tokenizer, sentence, out)
    importance, head_stats = head_table(run.model, batch, kind, maps, tokens)
    curve = heads.pruning_curve(run.model, batch, kind, importance, prune_steps)
    total = sum(len(v) for v in importance.values())
    plot_pruning(curve, total, os.path.join(out, 'pruning.png'))
    write_json(os.path.join(out, 'heads.json'), head_stats)
    write_json(
        os.path.join(out, 'pruning.json'), [{'masked': n, 'perplexity': p} for n, p in curve]
    )
    write_json(
        os.path.join(out, 'bertviz.json'), bertviz_export(maps, kind, tokens, data.tokenizer)
    )
    return {
        'checkpoint_step': run.step,
        'sentences': len(batch['targets']),
        'heads': total,
        'pictures': pictures,
        'pruning': curve,
    }


def write_json(path: str, value) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(value, f, ensure_ascii=False)
