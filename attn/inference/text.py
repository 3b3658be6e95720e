"""Lines of text in and out of a trained model: reading input lines, encoding them into
batches, translating or continuing them, and n-best lists as JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import numpy as np
from absl import logging

from attn import decoding, rundir
from attn.data import tokenizer as tokenizer_lib
from attn.errors import UserError
from attn.inference import batching
from attn.model.tokens import EOS_ID, PAD_ID


def read_lines(stream: Iterable[bytes]) -> Iterator[str]:
    """Decoded lines without their newline; a UserError names a line that is not UTF-8."""
    for number, raw in enumerate(stream, start=1):
        try:
            yield raw.decode('utf-8').rstrip('\r\n')
        except UnicodeDecodeError as error:
            raise UserError(
                f'Input line {number} is not valid UTF-8 ({error.reason} at byte '
                f'{error.start}); convert the input, e.g. with iconv -t UTF-8.'
            ) from None


def encode_lines(
    lines: list[str], tokenizer: tokenizer_lib.Tokenizer, max_tokens: int, numbers: list[int]
) -> list[list[int]]:
    """Each line's ids ending in EOS; over-long lines cut with a warning naming their input
    line number (`numbers`, one per line)."""
    rows = []
    for number, line in zip(numbers, lines, strict=True):
        ids = tokenizer.encode(line)
        if len(ids) > max_tokens:
            logging.warning(
                'Line %d has %d tokens; translating its first %d (--max_input_tokens).',
                number,
                len(ids),
                max_tokens,
            )
            ids = ids[: max_tokens - 1] + [EOS_ID]
        rows.append(ids)
    return rows


def pad_rows(rows: list[list[int]]) -> np.ndarray:
    """[B, S] of the rows, right-padded with PAD_ID to the longest."""
    width = max(len(ids) for ids in rows)
    return np.array([ids + [PAD_ID] * (width - len(ids)) for ids in rows], np.int32)


# Batches of lines read together and sorted by length, so that the rows of a batch end
# their search together; the translations come out in input order, a window at a time.
SORT_WINDOW = 16


def translate_lines(
    run: rundir.Run,
    tokenizer: tokenizer_lib.Tokenizer,
    lines: Iterable[str],
    *,
    batch_size: int,
    beam_size: int,
    alpha: float,
    max_input_tokens: int,
    nbest: int = 0,
) -> Iterator[str]:
    """Translations in input order; empty lines stay empty. With `nbest` K, one JSON
    object per line instead: {"source", "nbest": [K x {"translation", "score",
    "logprob"}]} (an empty line lists none).

    Lines are read SORT_WINDOW batches at a time and batched by source length within
    them, as CTranslate2 does: a batch's search runs until its longest translation ends,
    so rows of like length waste little, and like widths compile few programs."""
    settings = {
        'beam_size': beam_size,
        'alpha': alpha,
        'max_input_tokens': max_input_tokens,
        'nbest': nbest,
    }
    window: list[str] = []
    first = 1
    for number, line in enumerate(lines, start=1):
        window.append(line)
        if len(window) == batch_size * SORT_WINDOW:
            yield from _translate_window(run, tokenizer, window, first, batch_size, settings)
            window, first = [], number + 1
    if window:
        yield from _translate_window(run, tokenizer, window, first, batch_size, settings)


def _translate_window(run, tokenizer, lines, first_line, batch_size, settings) -> list[str]:
    """The window's translations in its order, its lines batched by encoded length."""
    nbest = settings['nbest']
    out = [''] * len(lines) if not nbest else [_nbest_line(line, []) for line in lines]
    todo = [i for i, line in enumerate(lines) if line.strip()]
    ids = encode_lines(
        [lines[i] for i in todo],
        tokenizer,
        settings['max_input_tokens'],
        [first_line + i for i in todo],
    )
    order = sorted(range(len(todo)), key=lambda k: len(ids[k]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        found = batching.translate(
            run.model,
            pad_rows([ids[k] for k in batch]),
            beam_size=settings['beam_size'],
            alpha=settings['alpha'],
            max_extra_length=run.config.decode.max_extra_length,
            mesh=run.mesh,
            nbest=nbest,
        )
        for row, k in enumerate(batch):
            i = todo[k]
            if nbest:
                out[i] = _nbest_line(lines[i], nbest_list(tokenizer, found, row))
            else:
                out[i] = tokenizer.decode(found[row])
    return out


def nbest_list(tokenizer, hypotheses: decoding.Hypotheses, row: int) -> list[dict]:
    """Sentence `row`'s hypotheses, best first, as {"translation", "score", "logprob"};
    slots the search never filled (scores -inf) are left out."""
    return [
        {'translation': tokenizer.decode(tokens), 'score': float(score), 'logprob': float(lp)}
        for tokens, score, lp in zip(*(x[row] for x in hypotheses), strict=True)
        if np.isfinite(score)
    ]


def _nbest_line(source: str, hypotheses: list[dict]) -> str:
    return json.dumps({'source': source, 'nbest': hypotheses}, ensure_ascii=False)


def continue_prompts(run, tokenizer, prompts: list[str], *, max_new_tokens: int, **sampling):
    """Samples a continuation of each prompt from a language model."""
    encoded = [tokenizer.encode(p)[:-1] or [] for p in prompts]  # no EOS after a prompt
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    width = int(lengths.max()) + max_new_tokens
    prompt_array = np.array([ids + [PAD_ID] * (width - len(ids)) for ids in encoded], np.int32)
    tokens = np.asarray(
        decoding.sample(run.model, prompt_array, lengths, max_length=width, **sampling)
    )
    return [
        _joined(tokenizer, p, row, n) for p, row, n in zip(prompts, tokens, lengths, strict=True)
    ]


def _joined(tokenizer, prompt: str, row, prompt_length: int) -> str:
    """The prompt and its continuation, decoded together so that the word boundary after the
    prompt stays (SentencePiece drops a leading one); the prompt as the user gave it, where
    the tokenizer gives it back unchanged."""
    head, whole = tokenizer.decode(row[:prompt_length]), tokenizer.decode(row)
    return prompt + whole[len(head) :] if whole.startswith(head) else whole
