"""Attention while generating: for each token a model produces, the weights its heads
put on the tokens it could see.

A language model continues a prompt (greedy) and shows its self-attention over the prompt
and the tokens generated so far; a translation model translates a sentence (its beam
search) and shows its encoder-decoder attention over the source. The weights come from
one teacher-forced pass over the finished output, which gives the same numbers as the
step-by-step decoder (its cache reproduces the full pass exactly; tests/test_decode.py).

    python -m attn.analyze --workdir=runs/lm --out=pics --prompt="To insert a table"
    python -m attn.analyze --workdir=runs/l10n --out=pics --prompt="Click the Save button."

Writes generation.png (one panel per layer, heads averaged: rows are the produced
tokens, columns the tokens they attend to), generation.gif (one frame per produced token:
every layer's heads over the visible tokens) and generation.json (tokens and weights).
"""

from __future__ import annotations

import dataclasses
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import animation  # noqa: E402

from attn import decoding
from attn.analysis import heads  # noqa: E402
from attn.errors import UserError  # noqa: E402
from attn.inference import batching
from attn.model.tokens import BOS_ID, PAD_ID  # noqa: E402


@dataclasses.dataclass
class GenerationAttention:
    """Weights [layers, heads, produced tokens, keys] and the ids on both axes."""

    kind: str  # 'self_attention' (language model) or 'cross_attention' (translation)
    produced: np.ndarray  # [T'] ids the model produced, in order
    keys: np.ndarray  # [S] ids of the attended tokens (decoder inputs, or the source)
    weights: np.ndarray  # [L, N, T', S]; for self-attention, zero right of each step

    def visible(self, step: int) -> int:
        """How many keys the produced token `step` could attend to."""
        if self.kind == 'cross_attention':
            return len(self.keys)
        return len(self.keys) - len(self.produced) + step + 1


def _until_eos(row: np.ndarray) -> np.ndarray:
    return row[: decoding.output_length(row)]


def _layers(maps: dict[str, np.ndarray], kind: str) -> np.ndarray:
    """[L, N, T, S] of sentence 0 from attention_maps' 'decoder.<i>.<kind>' entries."""
    names = sorted(
        (name for name in maps if name.startswith('decoder.') and name.endswith(kind)),
        key=lambda name: int(name.split('.')[1]),
    )
    return np.stack([maps[name][0] for name in names])


def language_model_attention(model, prompt: list[int], max_new_tokens: int) -> GenerationAttention:
    """Greedy continuation of `prompt` (ids, no EOS) and the self-attention of each step."""
    length = len(prompt) + max_new_tokens
    padded = np.array([prompt + [PAD_ID] * max_new_tokens], np.int32)
    out = decoding.sample(model, padded, [len(prompt)], max_length=length, temperature=0.0)
    sequence = _until_eos(np.asarray(out)[0])
    maps = heads.attention_maps(model, {'targets': sequence[None]}, 'lm')
    weights = _layers(maps, 'self_attention')  # [L, N, T, T]; query t produces sequence[t]
    produced = sequence[len(prompt) :]
    return GenerationAttention(
        kind='self_attention',
        produced=produced,
        keys=np.concatenate([[BOS_ID], sequence[:-1]]),  # decoder inputs: BOS, then tokens
        weights=weights[:, :, len(prompt) :, :],
    )


def translation_attention(model, source: list[int], config) -> GenerationAttention:
    """The translation of `source` (ids ending in EOS) and its encoder-decoder attention."""
    inputs = np.array([source], np.int32)
    out = batching.translate(
        model,
        inputs,
        beam_size=config.decode.beam_size,
        alpha=config.decode.alpha,
        max_extra_length=config.decode.max_extra_length,
    )
    produced = _until_eos(np.asarray(out)[0])
    maps = heads.attention_maps(model, {'inputs': inputs, 'targets': produced[None]}, 'transformer')
    return GenerationAttention(
        kind='cross_attention',
        produced=produced,
        keys=np.asarray(source),
        weights=_layers(maps, 'cross_attention'),
    )


def generate(run, tokenizer, text: str, *, max_new_tokens: int = 30) -> GenerationAttention:
    """Continues (language model) or translates (Transformer) `text` and records attention."""
    if not text.strip():
        raise UserError('--prompt is empty: give the text to continue or translate.')
    ids = tokenizer.encode(text)
    if run.config.model_kind == 'lm':
        return language_model_attention(run.model, ids[:-1], max_new_tokens)  # no EOS
    return translation_attention(run.model, ids, run.config)


def _labels(tokenizer, ids) -> list[str]:
    return [tokenizer.id_to_piece(int(i)) for i in ids]


def plot_strip(view: GenerationAttention, tokenizer, path: str) -> None:
    """One panel per layer: produced tokens (rows) against keys (columns), heads averaged."""
    L = view.weights.shape[0]
    rows, cols = _labels(tokenizer, view.produced), _labels(tokenizer, view.keys)
    width = 0.22 * len(cols) + 1.5
    fig, axes = plt.subplots(1, L, figsize=(width * L, 0.22 * len(rows) + 2), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        ax.imshow(view.weights[layer].mean(0), cmap='viridis', vmin=0, vmax=1, aspect='auto')
        ax.set_title(f'layer {layer} (mean of heads)', fontsize=8)
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
    what = 'earlier tokens' if view.kind == 'self_attention' else 'source tokens'
    fig.suptitle(f'Attention while generating: each produced token (row) over the {what}')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_gif(view: GenerationAttention, tokenizer, path: str, fps: float = 2.0) -> None:
    """One frame per produced token: every layer's heads over the keys it could see."""
    L, N, steps, S = view.weights.shape
    produced, keys = _labels(tokenizer, view.produced), _labels(tokenizer, view.keys)
    fig, ax = plt.subplots(figsize=(0.25 * S + 2.5, 0.22 * L * N + 1.8))
    image = ax.imshow(np.zeros((L * N, S)), cmap='viridis', vmin=0, vmax=1, aspect='auto')
    ax.set_xticks(range(S), keys, rotation=90, fontsize=6)
    ax.set_yticks(range(L * N), [f'L{layer} H{head}' for layer in range(L) for head in range(N)])
    ax.tick_params(axis='y', labelsize=6)
    title = ax.set_title('')
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the title set per frame

    def frame(step: int):
        weights = view.weights[:, :, step, :].reshape(L * N, S).copy()
        weights[:, view.visible(step) :] = np.nan  # not yet generated: left blank
        image.set_data(weights)
        title.set_text(f'producing {produced[step]!r} (token {step + 1} of {steps})')
        return (image, title)

    movie = animation.FuncAnimation(fig, frame, frames=steps, blit=False)
    movie.save(path, writer=animation.PillowWriter(fps=fps))
    plt.close(fig)


def write(view: GenerationAttention, tokenizer, out: str) -> dict:
    """generation.png, generation.gif and generation.json in `out`; returns a summary."""
    os.makedirs(out, exist_ok=True)
    plot_strip(view, tokenizer, os.path.join(out, 'generation.png'))
    write_gif(view, tokenizer, os.path.join(out, 'generation.gif'))
    record = {
        'kind': view.kind,
        'produced': _labels(tokenizer, view.produced),
        'keys': _labels(tokenizer, view.keys),
        'weights': np.round(view.weights, 4).tolist(),  # [layers, heads, produced, keys]
    }
    with open(os.path.join(out, 'generation.json'), 'w', encoding='utf-8') as f:
        json.dump(record, f, ensure_ascii=False)
    return {'kind': view.kind, 'produced': tokenizer.decode(view.produced)}
