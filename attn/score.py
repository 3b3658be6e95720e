"""Log-probabilities of given translations (or, for a language model, of given text) under
a trained checkpoint.

    python -m attn.score --workdir=W --source=en.txt --target=de.txt [--out=scores.jsonl]
    python -m attn.score --workdir=W --split=test         # the split's own target side
    python -m attn.score --workdir=runs/lm --target=text.txt      # a language model

Files hold one sentence per line. Writes one JSON object per sentence, in order: index,
source (translation only), target, tokens (SentencePiece pieces, EOS last),
token_logprobs, logprob (their sum) and num_tokens. The numbers are the training loss's
(`step.cross_entropy`) without label smoothing or dropout: the teacher-forced forward
pass, each target token predicted from BOS and the tokens before it (`model.shift_right`),
EOS scored last. Every sentence is scored whole, whatever its length. Multi-host like
attn.evaluate: each host scores its rows of every batch, process 0 writes. Given files need
W alone (the tokenizer is W/tokenizer/); --split reads the run's dataset.
"""

from __future__ import annotations

import json

from absl import flags

from attn import cli, rundir
from attn.inference import scoring
from attn.training import distributed


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    workdir = cli.workdir()
    distributed.initialize_from_flags()
    run = rundir.load(workdir, step=FLAGS.step, average_last=FLAGS.average_last)
    data, split = scoring.open_data(workdir, run.config, FLAGS.split, FLAGS.source, FLAGS.target)
    with scoring.output(FLAGS.out) as out:
        for line in scoring.score_split(run, data, split):
            out.write(json.dumps(line, ensure_ascii=False) + '\n')


def run():
    flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
    flags.DEFINE_string('source', None, 'Source sentences, one per line (translation models).')
    flags.DEFINE_string('target', None, 'Target sentences (or LM text) to score, one per line.')
    flags.DEFINE_string('split', None, "Score this split of the run's dataset instead.")
    flags.DEFINE_string('out', None, 'JSON lines output file (default: stdout).')
    cli.define_checkpoint_flags()
    distributed.define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
