"""One translation per line of standard input, from a trained checkpoint.

    echo "Choose Format - Cells." | python -m attn.translate --workdir=runs/l10n
    python -m attn.translate --workdir=runs/lm --prompt="The dialog"   # language model

    python -m attn.translate --workdir=runs/l10n --nbest=4 < lines.txt   # JSON lines

Lines are translated in batches. An empty line gives an empty line. A line longer than
--max_input_tokens (default: the config's training length, data.max_length) is cut to
that many tokens, with a warning on stderr naming the line. Input that is not UTF-8
stops with an error naming the line. With a language-model checkpoint each line (or
--prompt) is a prompt, continued by sampling. With --nbest=K each line gives one JSON
object: the source and its K best finished beam hypotheses, best first, each with its
translation, its ranking score (log-probability / length penalty) and its log-probability.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator

import numpy as np
from absl import flags, logging

from attn import cli, decode, restore
from attn.data import datasets
from attn.data import tokenizer as tokenizer_lib
from attn.errors import UserError
from attn.tokens import EOS_ID, PAD_ID


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


def encode_batch(
    lines: list[str], tokenizer: tokenizer_lib.Tokenizer, max_tokens: int, first_line: int
) -> np.ndarray:
    """[B, S] ids ending in EOS, right-padded; over-long lines cut with a warning."""
    rows = []
    for offset, line in enumerate(lines):
        ids = tokenizer.encode(line)
        if len(ids) > max_tokens:
            logging.warning(
                'Line %d has %d tokens; translating its first %d (--max_input_tokens).',
                first_line + offset,
                len(ids),
                max_tokens,
            )
            ids = ids[: max_tokens - 1] + [EOS_ID]
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    return np.array([ids + [PAD_ID] * (width - len(ids)) for ids in rows], np.int32)


def translate_lines(
    run: restore.Run,
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
    "logprob"}]} (an empty line lists none)."""
    settings = {
        'beam_size': beam_size,
        'alpha': alpha,
        'max_input_tokens': max_input_tokens,
        'nbest': nbest,
    }
    batch: list[str] = []
    first = 1
    for number, line in enumerate(lines, start=1):
        batch.append(line)
        if len(batch) == batch_size:
            yield from _translate_batch(run, tokenizer, batch, first, **settings)
            batch, first = [], number + 1
    if batch:
        yield from _translate_batch(run, tokenizer, batch, first, **settings)


def nbest_list(tokenizer, hypotheses: decode.Hypotheses, row: int) -> list[dict]:
    """Sentence `row`'s hypotheses, best first, as {"translation", "score", "logprob"};
    slots the search never filled (scores -inf) are left out."""
    return [
        {'translation': tokenizer.decode(tokens), 'score': float(score), 'logprob': float(lp)}
        for tokens, score, lp in zip(*(x[row] for x in hypotheses), strict=True)
        if np.isfinite(score)
    ]


def _translate_batch(
    run, tokenizer, lines, first_line, *, beam_size, alpha, max_input_tokens, nbest
):
    todo = [i for i, line in enumerate(lines) if line.strip()]
    out = [''] * len(lines) if not nbest else [_nbest_line(line, []) for line in lines]
    if todo:
        inputs = encode_batch([lines[i] for i in todo], tokenizer, max_input_tokens, first_line)
        found = decode.translate(
            run.model,
            inputs,
            beam_size=beam_size,
            alpha=alpha,
            max_extra_length=run.config.decode.max_extra_length,
            mesh=run.mesh,
            nbest=nbest,
        )
        for row, i in enumerate(todo):
            if nbest:
                out[i] = _nbest_line(lines[i], nbest_list(tokenizer, found, row))
            else:
                out[i] = tokenizer.decode(found[row])
    return out


def _nbest_line(source: str, hypotheses: list[dict]) -> str:
    return json.dumps({'source': source, 'nbest': hypotheses}, ensure_ascii=False)


def continue_prompts(run, tokenizer, prompts: list[str], *, max_new_tokens: int, **sampling):
    """Samples a continuation of each prompt from a language model."""
    encoded = [tokenizer.encode(p)[:-1] or [] for p in prompts]  # no EOS after a prompt
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    width = int(lengths.max()) + max_new_tokens
    prompt_array = np.array([ids + [PAD_ID] * (width - len(ids)) for ids in encoded], np.int32)
    tokens = np.asarray(
        decode.sample(run.model, prompt_array, lengths, max_length=width, **sampling)
    )
    return [
        p + tokenizer.decode(row[n:]) for p, row, n in zip(prompts, tokens, lengths, strict=True)
    ]


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    workdir = cli.workdir()
    run = restore.load(workdir, step=FLAGS.step, average_last=FLAGS.average_last)
    beam_size = FLAGS.beam_size or run.config.decode.beam_size
    if run.config.model_kind == 'lm' and FLAGS.nbest:
        raise UserError('--nbest lists translations; a language model samples (drop --nbest).')
    decode.check_nbest(FLAGS.nbest, beam_size)
    tokenizer = datasets.load(run.config, ['train']).tokenizer
    if run.config.model_kind == 'lm':
        prompts = [FLAGS.prompt] if FLAGS.prompt is not None else list(read_lines(sys.stdin.buffer))
        outputs = continue_prompts(
            run,
            tokenizer,
            prompts,
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
        )
    else:
        outputs = translate_lines(
            run,
            tokenizer,
            read_lines(sys.stdin.buffer),
            batch_size=FLAGS.batch_size,
            beam_size=beam_size,
            alpha=run.config.decode.alpha if FLAGS.alpha is None else FLAGS.alpha,
            max_input_tokens=FLAGS.max_input_tokens or run.config.data.max_length,
            nbest=FLAGS.nbest,
        )
    for line in outputs:
        sys.stdout.write(line + '\n')
        sys.stdout.flush()


def run():
    flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
    cli.define_checkpoint_flags()
    flags.DEFINE_integer('batch_size', 32, 'Lines translated together.')
    flags.DEFINE_integer('beam_size', None, "Beam size (default: the config's); 1 = greedy.")
    flags.DEFINE_float('alpha', None, "Length penalty (default: the config's).")
    flags.DEFINE_integer(
        'nbest', 0, 'Write the K best beam hypotheses per line as JSON (K <= --beam_size).'
    )
    flags.DEFINE_integer(
        'max_input_tokens', None, 'Longer lines are cut (default: data.max_length).'
    )
    flags.DEFINE_string(
        'prompt', None, 'Language models: continue this text instead of stdin lines.'
    )
    flags.DEFINE_integer('max_new_tokens', 50, 'Language models: tokens to sample.')
    flags.DEFINE_float('temperature', 1.0, 'Language models: sampling temperature.')
    flags.DEFINE_integer('top_k', 0, 'Language models: sample from the k likeliest (0 = all).')
    flags.DEFINE_float('top_p', 1.0, 'Language models: nucleus sampling mass.')
    flags.DEFINE_integer('seed', 0, 'Language models: sampling seed.')
    cli.run(main)


if __name__ == '__main__':
    run()
