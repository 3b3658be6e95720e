"""Training loop: `train_and_evaluate(config, workdir)` feeds the compiled step
(`attn.training.step`) from the data pipeline, evaluates, logs and checkpoints, and resumes
from the workdir's latest checkpoint.

    python -m attn.train --config=configs/l10n.py --workdir=runs/l10n

Exit status: 0 finished (or already finished), 2 a bad setting or input (one line on
stderr), 75 (`errors.PREEMPTED`) stopped early at a SIGTERM or Ctrl-C with its checkpoint
saved: run the same command to resume.
"""

from __future__ import annotations

import json

from absl import flags

from attn import cli, errors
from attn.inference import evaluation
from attn.training import distributed, loop


def main(argv):
    del argv
    workdir = cli.workdir()
    config = cli.config()
    distributed.initialize_from_flags()
    outcome = loop.train_and_evaluate(config, workdir)
    report = {'step': outcome.step, config.data.eval_split: outcome.validation}
    if outcome.preempted:
        report['preempted'] = True
    elif outcome.already_finished:
        report['already_finished'] = True
    elif config.bleu_at_end and config.model_kind == 'transformer':
        report[config.data.test_split] = evaluation.evaluate(workdir, split=config.data.test_split)
    if distributed.is_main():
        print(json.dumps(report, ensure_ascii=False))  # noqa: T201 - the command's report
    if outcome.preempted:  # saved, not finished: a retry loop or scheduler runs it again
        raise SystemExit(errors.PREEMPTED)


def run():
    cli.define_config_flag()
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
    distributed.define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
