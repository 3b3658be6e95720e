"""Training loop: `train_and_evaluate(config, workdir)` feeds the compiled step
(`attn.step`) from the data pipeline, evaluates, logs and checkpoints, and resumes
from the workdir's latest checkpoint.

    python -m attn.train --config=configs/l10n.py --workdir=runs/l10n
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading

import jax
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from attn import checkpoint, cli, configuration, distributed, sharding
from attn import evaluate as evaluate_lib
from attn import metrics as metrics_lib
from attn import step as step_lib
from attn import workdir as workdir_lib
from attn.data import datasets

# ------------------------------------------------------------------------------- loop


class _Preemption:
    """Turns SIGTERM (preemption) and Ctrl-C into a request to save and stop at a step
    boundary; a second Ctrl-C stops at once.

    One process: a flag set by the signal handlers. Several: JAX's preemption service
    (started by jax.distributed) takes SIGTERM on any host and agrees on one step at
    which every host stops (`reached`, through Orbax); Ctrl-C is passed on to it as
    SIGTERM. No per-process flag, so hosts never save at different steps.
    """

    def __init__(self, ckpt: checkpoint.Checkpointer):
        self._ckpt = ckpt
        self._requested = False
        self._multi = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            if not self._multi:
                signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum, frame):
        del frame
        logging.warning('%s: saving a checkpoint and stopping.', signal.Signals(signum).name)
        self._requested = True

    def _interrupt(self, signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        if self._multi:
            logging.warning('SIGINT: asking every process to save and stop.')
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self._handle(signum, frame)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (called at every step, on every host)."""
        return self._ckpt.reached_preemption(step) or self._requested

    def close(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if not self._multi:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Reporter:
    """Keeps each step's metrics on device and fetches them only at report time.

    `flush` raises on a non-finite loss, so it runs before every checkpoint: a saved
    state never follows a non-finite loss.
    """

    def __init__(self, workdir: str, start: int, total: int, schedule: optax.Schedule):
        self.writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
        self.progress = metrics_lib.Progress(start, total)
        self.schedule = schedule
        self.pending: list[dict] = []

    def add(self, step: int, step_metrics: dict) -> None:
        self.pending.append(step_metrics)
        self.progress.update(step)

    def flush(self, step: int, write: bool) -> None:
        if not self.pending:
            return
        rows, self.pending = jax.device_get(self.pending), []
        losses = np.array([row['loss'] for row in rows])
        if not np.isfinite(losses).all():
            raise FloatingPointError(
                f'Non-finite training loss ({losses[~np.isfinite(losses)][0]}) within the '
                f'{len(rows)} steps up to {step}; stopping. The last checkpoint in the workdir '
                'predates it. Try a lower optimizer.lr_scale, optimizer.grad_clip_norm > 0, '
                'or model.dtype="float32".'
            )
        if write:
            scalars = {
                name: float(np.mean([row[name] for row in rows])) for name in ('loss', 'nll')
            }
            scalars['grad_norm'] = float(rows[-1]['grad_norm'])
            scalars['learning_rate'] = float(self.schedule(step - 1))
            tokens = float(sum(row['tokens'] for row in rows))
            scalars['tokens_per_s'] = self.progress.report(scalars, tokens)
            self.writer.write(step, scalars)

    def write_eval(self, step: int, split: str, result: dict[str, float]) -> None:
        self.writer.write(step, result, split=split)
        logging.info('step %d %s: %s', step, split, result)

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


def _sample_bleu(config, data: datasets.Data, model, mesh) -> dict[str, float]:
    """{'bleu': sacreBLEU of the first config.bleu_examples eval examples}."""
    if config.model_kind != 'transformer':
        return {}
    split = config.data.eval_split
    return {
        'bleu': evaluate_lib.sample_bleu(model, config, data, split, config.bleu_examples, mesh)
    }


@dataclasses.dataclass
class Outcome:
    """How a training run ended: the step reached, the last validation metrics, and
    whether it stopped early for a preemption or Ctrl-C (then it saved that step)."""

    step: int
    validation: dict[str, float]
    preempted: bool = False


def train_and_evaluate(config, workdir: str, data: datasets.Data | None = None) -> Outcome:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if any."""
    mesh = sharding.make_mesh()
    data = data or datasets.load(config)
    train_iter = data.train_iterator(config)

    cfg = configuration.model_config(config)
    graphdef, rest, state, train, evaluate, rng = step_lib.setup(config, cfg, mesh)
    ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints(workdir), keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, train_iter)
    workdir_lib.write_config(workdir, config)  # only once the checkpoint has accepted it

    schedule = step_lib.learning_rate_schedule(
        cfg.emb_dim, config.optimizer.warmup_steps, config.optimizer.lr_scale
    )
    preemption = _Preemption(ckpt)
    reporter = _Reporter(workdir, int(state.step), config.total_steps, schedule)
    outcome = Outcome(step=int(state.step), validation={})
    try:
        for step in range(int(state.step) + 1, config.total_steps + 1):
            state, step_metrics = train(state, sharding.global_batch(mesh, next(train_iter)), rng)
            reporter.add(step, step_metrics)
            outcome.step = step
            last = step == config.total_steps
            stop = preemption.reached(step)
            save = last or stop or step % config.checkpoint_every_steps == 0
            log = last or stop or step % config.log_every_steps == 0
            if log or save:
                reporter.flush(step, write=log)
            if stop:  # save at once and leave: a preemption grace period is short
                ckpt.save(step, state, train_iter, config.to_dict())
                outcome.preempted = True
                logging.warning('Stopped at step %d; run the same command to resume.', step)
                break
            if last or step % config.eval_every_steps == 0:
                outcome.validation = step_lib.evaluate_loss(
                    evaluate, state.params, data.eval_batches(config), mesh
                )
                reporter.write_eval(step, config.data.eval_split, outcome.validation)
            if config.bleu_every_steps and step % config.bleu_every_steps == 0:
                model = nnx.merge(graphdef, state.params, rest)
                scores = _sample_bleu(config, data, model, mesh)
                if scores:
                    reporter.write_eval(step, config.data.eval_split, scores)
            if save:
                ckpt.save(step, state, train_iter, config.to_dict())
    finally:
        preemption.close()
        ckpt.wait()
        reporter.close()
    return outcome


# -------------------------------------------------------------------------------- CLI


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.workdir is None:
        raise app.UsageError('--workdir is required.')
    config = cli.config()
    distributed.initialize_from_flags()
    outcome = train_and_evaluate(config, FLAGS.workdir)
    report = {'step': outcome.step, config.data.eval_split: outcome.validation}
    if outcome.preempted:
        report['preempted'] = True
    elif config.bleu_at_end and config.model_kind == 'transformer':
        report[config.data.test_split] = evaluate_lib.evaluate(
            FLAGS.workdir, split=config.data.test_split
        )
    if distributed.is_main():
        print(json.dumps(report, ensure_ascii=False))  # noqa: T201 - the command's report


def run():
    cli.define_config_flag()
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
    distributed.define_flags()
    cli.run(main)


if __name__ == '__main__':
    run()
