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
Needs W alone (the tokenizer is W/tokenizer/), not the run's dataset.
"""

from __future__ import annotations

import sys

from absl import flags

from attn import cli, rundir
from attn.errors import UserError
from attn.inference import batching, text


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    workdir = cli.workdir()
    run = rundir.load(workdir, step=FLAGS.step, average_last=FLAGS.average_last)
    beam_size = run.config.decode.beam_size if FLAGS.beam_size is None else FLAGS.beam_size
    if run.config.model_kind == 'lm' and FLAGS.nbest:
        raise UserError('--nbest lists translations; a language model samples (drop --nbest).')
    batching.check_nbest(FLAGS.nbest, beam_size)
    tokenizer = rundir.tokenizer(workdir, run.config)
    if run.config.model_kind == 'lm':
        prompts = (
            [FLAGS.prompt] if FLAGS.prompt is not None else list(text.read_lines(sys.stdin.buffer))
        )
        outputs = text.continue_prompts(
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
        outputs = text.translate_lines(
            run,
            tokenizer,
            text.read_lines(sys.stdin.buffer),
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
    cli.define_search_flags(batch_size=32)
    flags.DEFINE_integer(
        'max_input_tokens', None, 'Longer lines are cut (default: data.max_length).'
    )
    cli.at_least('max_input_tokens', 1, 'give 1 or more tokens per line.')
    flags.DEFINE_string(
        'prompt', None, 'Language models: continue this text instead of stdin lines.'
    )
    cli.define_sampling_flags(max_new_tokens=50)
    cli.run(main)


if __name__ == '__main__':
    run()
