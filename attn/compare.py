"""Is a difference between runs real? Several runs on one test set, each against the first.

    python -m attn.compare --workdirs=runs/base,runs/a1 [--split=test] [--out=compare.json]

Each run is scored on the same split, at its latest checkpoint (or --step, --average_last),
with its config's beam search unless --beam_size/--alpha say otherwise. Translations that
attn.evaluate already wrote with those settings (W/eval/<name>.txt) are reused; the others
are decoded now, and written there. Reports each run's sacreBLEU and perplexity and each
one's difference from the first: for BLEU sacreBLEU's paired bootstrap (1,000 resamples,
with the 95% interval of the difference) and approximate randomization (10,000 trials); for
perplexity a paired bootstrap over sentences; a verdict per run: better, worse, or within
noise (p >= 0.05, bootstrap). Runs on different test sets or tokenizers are refused.
Prints a table and writes the JSON report (default: W/eval/compare-<split>.json of the
first run). Multi-host like attn.evaluate; process 0 writes.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from attn import cli, rundir
from attn.inference import comparison
from attn.training import distributed


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.workdirs:
        raise app.UsageError('--workdirs is required: two or more runs, comma-separated.')
    distributed.initialize_from_flags()
    runs = [
        comparison.run_outputs(
            workdir,
            split=FLAGS.split,
            step=FLAGS.step,
            average_last=FLAGS.average_last,
            beam_size=FLAGS.beam_size,
            alpha=FLAGS.alpha,
        )
        for workdir in FLAGS.workdirs
    ]
    report = comparison.compare(runs, FLAGS.split)
    if not distributed.is_main():
        return
    out = FLAGS.out or os.path.join(
        FLAGS.workdirs[0], rundir.EVAL_DIR, f'compare-{FLAGS.split}.json'
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    print(comparison.table(report) + f'\n\nWrote {out}')  # noqa: T201 - the command's report


def run():
    flags.DEFINE_list('workdirs', None, 'Trained runs, comma-separated; the first is the baseline.')
    flags.DEFINE_string('split', 'test', 'Dataset split to score every run on.')
    flags.DEFINE_string('out', None, 'The JSON report (default: W/eval/compare-<split>.json).')
    cli.check_flag(
        'workdirs',
        lambda value: len(value) >= 2,
        'give two or more runs, comma-separated: --workdirs=runs/base,runs/a1.',
    )
    cli.define_checkpoint_flags()
    cli.define_search_flags(nbest=False)
    distributed.define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
