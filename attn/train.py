"""Training loop: `train_and_evaluate(config, workdir)` feeds the compiled step
(`attn.step`) from the data pipeline, evaluates, logs and checkpoints, and resumes
from the workdir's latest checkpoint.

    python -m attn.train --config=configs/l10n.py --workdir=runs/l10n
"""

from __future__ import annotations

import json
import signal
import threading

import jax
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from attn import checkpoint, cli, configuration, sharding
from attn import evaluate as evaluate_lib
from attn import metrics as metrics_lib
from attn import step as step_lib
from attn import workdir as workdir_lib
from attn.data import datasets

# ------------------------------------------------------------------------------- loop


class _Preemption:
    """Turns SIGTERM into a request to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning('SIGTERM: saving a checkpoint and stopping.')
        self.requested = True


class _Reporter:
    """Keeps each step's metrics on device and fetches them only at report time.

    `flush` raises on a non-finite loss, so it runs before every checkpoint: a saved
    state never follows a non-finite loss.
    """

    def __init__(self, workdir: str, start: int, total: int, schedule: optax.Schedule):
        self.writer = metrics_lib.MetricsWriter(workdir)
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


def _sample_bleu(config, data: datasets.Data, model) -> dict[str, float]:
    """{'bleu': sacreBLEU of the first config.bleu_examples eval examples} (one process)."""
    if config.model_kind != 'transformer' or jax.process_count() > 1:
        return {}
    split = config.data.eval_split
    return {'bleu': evaluate_lib.sample_bleu(model, config, data, split, config.bleu_examples)}


def train_and_evaluate(config, workdir: str, data: datasets.Data | None = None) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

    Returns the final validation metrics.
    """
    workdir_lib.write_config(workdir, config)
    mesh = sharding.make_mesh()
    data = data or datasets.load(config)
    train_iter = data.train_iterator(config)

    cfg = configuration.model_config(config)
    graphdef, rest, state, train, evaluate, rng = step_lib.setup(config, cfg, mesh)
    ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints(workdir), keep=config.keep_checkpoints)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, train_iter)

    schedule = step_lib.learning_rate_schedule(
        cfg.emb_dim, config.optimizer.warmup_steps, config.optimizer.lr_scale
    )
    preemption = _Preemption()
    reporter = _Reporter(workdir, int(state.step), config.total_steps, schedule)
    result = {}
    try:
        for step in range(int(state.step) + 1, config.total_steps + 1):
            state, step_metrics = train(state, sharding.global_batch(mesh, next(train_iter)), rng)
            reporter.add(step, step_metrics)
            last = step == config.total_steps
            stop = preemption.requested or ckpt.reached_preemption(step)
            save = last or stop or step % config.checkpoint_every_steps == 0
            log = last or stop or step % config.log_every_steps == 0
            if log or save:
                reporter.flush(step, write=log)
            if last or step % config.eval_every_steps == 0:
                result = step_lib.evaluate_loss(
                    evaluate, state.params, data.eval_batches(config), mesh
                )
                reporter.write_eval(step, config.data.eval_split, result)
            if config.bleu_every_steps and step % config.bleu_every_steps == 0:
                scores = _sample_bleu(config, data, nnx.merge(graphdef, state.params, rest))
                if scores:
                    reporter.write_eval(step, config.data.eval_split, scores)
            if save:
                ckpt.save(step, state, train_iter, config.to_dict())
            if stop:
                break
    finally:
        ckpt.wait()
        reporter.close()
    return result


# -------------------------------------------------------------------------------- CLI


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.workdir is None:
        raise app.UsageError('--workdir is required.')
    config = cli.config()
    sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    report = {
        'step': config.total_steps,
        config.data.eval_split: train_and_evaluate(config, FLAGS.workdir),
    }
    if config.bleu_at_end and config.model_kind == 'transformer':
        if jax.process_count() == 1:
            report[config.data.test_split] = evaluate_lib.evaluate(
                FLAGS.workdir, split=config.data.test_split
            )
        else:
            logging.info('bleu_at_end runs in one process: use python -m attn.evaluate.')
    if jax.process_index() == 0:
        print(json.dumps(report, ensure_ascii=False))  # noqa: T201 - the command's report


def run():
    cli.define_config_flag()
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
    flags.DEFINE_string(
        'coordinator_address', None, 'host:port of process 0, where no cluster is auto-detected.'
    )
    flags.DEFINE_integer(
        'num_processes', None, 'Processes in the run (with --coordinator_address).'
    )
    flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
    cli.run(main)


if __name__ == '__main__':
    run()
