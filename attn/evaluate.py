"""BLEU and perplexity of a trained model on a whole split.

    python -m attn.evaluate --workdir=W [--split=test] [--average_last=5] [--beam_size=4]

Restores the parameters onto every device of every process and runs data-parallel there
(start it on every host of a multi-host run, as attn.train is started). Decodes every
example of the split (none dropped for length) and reports sacreBLEU (detokenized, with its
signature), the paper's tokenized BLEU with compound splitting, teacher-forced perplexity,
the decode settings, the checkpoint steps used, wall time and target tokens/s. Process 0
writes W/eval/<split>-<step>[-avgK]-beamB-alphaA.json (named by what produced it,
`rundir.report_name`) and the translations beside it (.txt, one per line: what attn.compare
tests), and prints the same JSON. --attention_stats adds <name>.attention.json: the mean
entropy and peak weight of every encoder-decoder head along the chosen translations,
gathered inside the compiled beam search (no second pass).
"""

from __future__ import annotations

import json

from absl import flags

from attn import cli
from attn.inference import evaluation
from attn.training import distributed


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    workdir = cli.workdir()
    distributed.initialize_from_flags()
    report = evaluation.evaluate(
        workdir,
        split=FLAGS.split,
        average_last=FLAGS.average_last,
        step=FLAGS.step,
        beam_size=FLAGS.beam_size,
        alpha=FLAGS.alpha,
        nbest=FLAGS.nbest,
        attention_stats=FLAGS.attention_stats,
    )
    if distributed.is_main():
        print(json.dumps(report, ensure_ascii=False))  # noqa: T201 - the command's report


def run():
    flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
    flags.DEFINE_string('split', 'test', 'Dataset split to score.')
    cli.define_checkpoint_flags()
    cli.define_search_flags()
    flags.DEFINE_bool(
        'attention_stats',
        False,
        'Also write the mean entropy and peak weight of every encoder-decoder head along the '
        'translations, gathered inside the beam search (<report>.attention.json).',
    )
    distributed.define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
