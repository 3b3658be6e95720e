"""Attention analysis of a checkpoint: heatmaps, per-head statistics, head importance and
a pruning curve, from any workdir, on whatever devices this process has.

    python -m attn.analyze --workdir=runs/l10n --out=runs/l10n/analysis [--sentences=8]
    python -m attn.analyze --workdir=W --out=D --source=en.txt --target=de.txt

Analyses the first --sentences examples of --split (default: the config's eval split) of the
run's dataset, or, with --source and --target, of those files (one sentence per line, as
attn.score reads them; a language model takes --target only). Given files need the workdir
alone: a run copied without its dataset is analysed on sentences of one's choosing, rather
than on examples saved into W at training time, which would fix the sentences in advance
and copy dataset text into every run.

Writes to --out: attention-<i>-<module kind>.png (a layers x heads grid of heatmaps with the
tokens on the axes) for the first sentences; heads.json (entropy, confidence, mean
distance and importance of every head); pruning.png and pruning.json (perplexity of the
sentences as heads are masked, least important first); bertviz.json (per layer arrays
[1, heads, query, key] and the tokens of sentence 0, for bertviz's head_view/model_view).

    python -m attn.analyze --workdir=runs/lm --out=pics --prompt="To insert a table"

With --prompt it shows attention while generating instead (attn/analysis/generation.py): a
language model continues the prompt, a translation model translates it (from W alone too).

    python -m attn.analyze --workdir=runs/l10n --out=runs/l10n/heads --over_training

With --over_training it follows the heads through training instead
(attn/analysis/training.py): every kept checkpoint (train with --config.keep_checkpoints=None
to keep them all) on the same sentences; head importance, attention entropy and peak weight
per layer and head, as curves over steps: heads_over_training-<kind>.png per attention kind
and heads_over_training.json.
"""

from __future__ import annotations

import json

from absl import app, flags

from attn import cli, rundir
from attn.analysis import generation, report, training
from attn.data import datasets
from attn.errors import UserError


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.workdir is None or FLAGS.out is None:
        raise app.UsageError('--workdir and --out are required.')
    sentences = dict(
        sentences=FLAGS.sentences, split=FLAGS.split, source=FLAGS.source, target=FLAGS.target
    )  # what to analyse
    if FLAGS.over_training:
        if FLAGS.prompt is not None or FLAGS.step is not None or FLAGS.average_last != 1:
            raise UserError(
                '--over_training reads every kept checkpoint on the sentences of --split, '
                '--source or --target: drop --prompt, --step and --average_last.'
            )
        summary = _with_data_hint(
            lambda: training.over_training(FLAGS.workdir, FLAGS.out, **sentences)
        )
        print(json.dumps(summary))  # noqa: T201 - the command's report
        return
    if FLAGS.prompt is not None:
        run = rundir.load(FLAGS.workdir, step=FLAGS.step, average_last=FLAGS.average_last)
        tokenizer = rundir.tokenizer(FLAGS.workdir, run.config)
        view = generation.generate(
            run, tokenizer, FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens
        )
        print(json.dumps(generation.write(view, tokenizer, FLAGS.out), ensure_ascii=False))  # noqa: T201
        return
    summary = _with_data_hint(
        lambda: report.analyze(
            FLAGS.workdir,
            FLAGS.out,
            prune_steps=FLAGS.prune_steps,
            step=FLAGS.step,
            average_last=FLAGS.average_last,
            **sentences,
        )
    )
    print(json.dumps(summary))  # noqa: T201 - the command's report


def _with_data_hint(work):
    """work(); a missing dataset names the way round it: sentences of one's own."""
    try:
        return work()
    except datasets.DataError as error:
        if flags.FLAGS.source is not None or flags.FLAGS.target is not None:
            raise
        raise UserError(
            f'{error} Or analyse sentences of your own, which needs the workdir alone: '
            '--source=FILE --target=FILE (one sentence per line).'
        ) from None


def run():
    flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
    flags.DEFINE_string('out', None, 'Folder for the pictures and JSON files.')
    flags.DEFINE_integer('sentences', 8, 'Sentences of the split to analyse.')
    cli.at_least('sentences', 1, 'give 1 or more sentences.')
    flags.DEFINE_string('split', None, "Split to read (default: the config's eval split).")
    flags.DEFINE_string('source', None, 'Analyse these source sentences, one per line.')
    flags.DEFINE_string('target', None, 'Their translations (or LM text), one per line.')
    flags.DEFINE_integer('prune_steps', 8, 'Points on the pruning curve.')
    cli.at_least('prune_steps', 1, 'give 1 or more points.')
    cli.define_checkpoint_flags()
    flags.DEFINE_string(
        'prompt', None, 'Show attention while generating: text to continue or translate.'
    )
    flags.DEFINE_integer('max_new_tokens', 30, 'With --prompt, language models: tokens to add.')
    flags.DEFINE_bool(
        'over_training', False, 'Follow the heads through every kept checkpoint instead.'
    )
    cli.at_least('max_new_tokens', 1, 'give 1 or more tokens to add.')
    cli.run(main)


if __name__ == '__main__':
    run()
