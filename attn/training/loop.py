"""The training loop: `train_and_evaluate(config, workdir)` feeds the compiled step
(`attn.training.step`) from the data pipeline, evaluates, logs and checkpoints, and resumes
from the workdir's latest checkpoint (`attn.train` is its command)."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading

import jax
import numpy as np
import optax
from absl import logging
from flax import nnx

from attn import configs, rundir
from attn.data import datasets
from attn.errors import UserError
from attn.inference import evaluation
from attn.training import checkpoint, sharding
from attn.training import metrics as metrics_lib
from attn.training import step as step_lib


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


class Reporter:
    """Keeps each step's metrics on device and fetches them only at report time.

    `flush` raises on a non-finite loss, so it runs before every checkpoint: a saved
    state never follows a non-finite loss.
    """

    def __init__(
        self,
        workdir: str,
        start: int,
        total: int,
        schedule: optax.Schedule,
        *,
        dtype: str | None = None,
        grad_clip_norm: float | None = None,
    ):
        """`dtype` (model.dtype) and `grad_clip_norm` (optimizer.grad_clip_norm) choose
        the fixes a non-finite loss suggests; None: unknown, so suggest them."""
        self.writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
        self.progress = metrics_lib.Progress(start, total)
        self.schedule = schedule
        self.dtype = dtype
        self.grad_clip_norm = grad_clip_norm
        self.pending: list[dict] = []

    def add(self, step: int, step_metrics: dict) -> None:
        """Waits for the step before this one: one step queued behind the running one
        keeps the devices busy, and XLA:CPU can deadlock in a collective when several
        executions of a program loaded from the persistent compilation cache are queued."""
        if self.pending:
            jax.block_until_ready(self.pending[-1]['loss'])
        self.pending.append(step_metrics)
        self.progress.update(step)

    def flush(self, step: int, write: bool) -> None:
        if not self.pending:
            return
        rows, self.pending = jax.device_get(self.pending), []
        losses = np.array([row['loss'] for row in rows])
        if not np.isfinite(losses).all():
            fixes = ['a lower optimizer.lr_scale', 'a longer optimizer.warmup_steps']
            if not self.grad_clip_norm:  # 0 = no clipping
                fixes.append('optimizer.grad_clip_norm > 0 (e.g. 1.0)')
            else:
                fixes.append(f'a lower optimizer.grad_clip_norm (now {self.grad_clip_norm})')
            if self.dtype != 'float32':
                fixes.append('model.dtype="float32"')
            raise FloatingPointError(
                f'Non-finite training loss ({losses[~np.isfinite(losses)][0]}) within the '
                f'{len(rows)} steps up to {step}; stopping. The last checkpoint in the workdir '
                f'predates it. Try {", ".join(fixes[:-1])} or {fixes[-1]}.'
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
    return {'bleu': evaluation.sample_bleu(model, config, data, split, config.bleu_examples, mesh)}


@dataclasses.dataclass
class Outcome:
    """How a training run ended: the step reached, the last validation metrics, and
    whether it stopped early for a preemption or Ctrl-C (then it saved that step), or
    found the run already finished (then it did nothing)."""

    step: int
    validation: dict[str, float]
    preempted: bool = False
    already_finished: bool = False


# What a checkpoint's data and tokenizer are made of: resuming with any other value would
# read the saved embeddings with another vocabulary.
DATA_FIELDS = ('name', 'config', 'vocab_size', 'source_lang', 'target_lang')


# What the saved iterator state is laid out by: it restores only into a pipeline with the
# same value.
ITERATOR_FIELDS = ('worker_count',)


# A resume whose data iterator state cannot continue here: what holds, in one line.
_NEW_DATA_ORDER = (
    'The data iterator was saved with another global batch layout (other rows, or several '
    'processes before states were shared): parameters, optimizer state, step and dropout '
    'resume exactly, but the data order restarts at step %d with a new shuffle (examples of '
    'the interrupted epoch may repeat or be missed).'
)


# The noise sources whose seed a resume continues with (exactly, batch for batch).
RESUMED_SEEDS = ('data', 'dropout')


def train_and_evaluate(config, workdir: str, data: datasets.Data | None = None) -> Outcome:
    """Trains `config` in `workdir`, resuming from its newest readable checkpoint if any."""
    configs.validate(config)  # every setting, against this run's devices
    with rundir.locked(workdir):  # one trainer per workdir; released however it ends
        ckpt = checkpoint.Checkpointer(rundir.checkpoints(workdir), keep=config.keep_checkpoints)
        train_iter = None
        try:
            _check_resumable(config, workdir, ckpt)  # before any tokenizer or data is built
            mesh = sharding.make_mesh()
            data = data or datasets.load(config)
            train_iter = data.train_iterator(config)
            layout = data.train_layout(config)
            cfg = configs.model_config(config)
            steps = step_lib.setup(config, cfg, mesh)
            state = steps.state
            if ckpt.latest_step() is not None:
                rundir.check_tokenizer(workdir, data.tokenizer)
                state = ckpt.restore(state, train_iter, layout=layout)
                if not ckpt.iterator_restored:  # laid out by another global batch
                    train_iter.close()
                    train_iter = data.train_iterator(config, restart_at=int(state.step))
                    logging.warning(_NEW_DATA_ORDER, int(state.step))
            if int(state.step) == config.total_steps:
                logging.warning(
                    'already finished at step %d; nothing to do (python -m attn.evaluate '
                    '--workdir=%s scores it).',
                    int(state.step),
                    workdir,
                )
                return Outcome(step=int(state.step), validation={}, already_finished=True)
            # Only once the checkpoint has accepted them:
            rundir.write_config(workdir, config)
            rundir.write_tokenizer(workdir, data.tokenizer)
            reporter = _reporter(config, cfg, workdir, int(state.step))
            return _loop(config, data, train_iter, mesh, ckpt, steps, state, reporter)
        finally:
            if train_iter is not None:
                train_iter.close()  # stops the pipeline's worker processes and thread
            ckpt.close()


def _check_resumable(config, workdir: str, ckpt: checkpoint.Checkpointer) -> None:
    """Refuses (UserError) to resume a checkpoint past config.total_steps, one trained on
    other data or seeds, or one whose iterator state another pipeline wrote
    (`resumed_fields` of the config saved with the newest checkpoint, else of
    W/config.json, through `configs.upgrade`), naming the field and both values."""
    latest = ckpt.latest_step()
    if latest is None:
        return
    if latest > config.total_steps:
        raise UserError(
            f'{ckpt.directory} holds a checkpoint of step {latest}, past total_steps='
            f'{config.total_steps}. Raise --config.total_steps above {latest} to continue '
            'training it, or use a new --workdir.'
        )
    saved = _saved_config(ckpt) or rundir.saved_config(workdir)
    if saved is None:
        return
    saved = configs.upgrade(saved)
    for field, value, saved_value in resumed_fields(config, saved):
        if value != saved_value:
            raise UserError(
                f'{field} is {value!r}, but the checkpoints in {ckpt.directory} were trained '
                f'with {saved_value!r}. Pass --config.{field}={saved_value!r} to resume them, '
                'or use a new --workdir.'
            )


def resumed_fields(config, saved):
    """(field, value in `config`, value in `saved`) of each field a resume must keep: the
    data and iterator fields, and the seeds of the data order and dropout masks (the
    parameters are restored, so the init seed may differ). `saved`: a saved config through
    `configs.upgrade`."""
    for field in (*DATA_FIELDS, *ITERATOR_FIELDS):
        if field == 'source_lang' and config.model_kind == 'lm':
            continue  # a language model reads the target side only
        yield f'data.{field}', config.data[field], saved.data[field]
    for source in RESUMED_SEEDS:
        value, saved_value = (configs.source_seed(c, source) for c in (config, saved))
        yield f'seeds.{source}', value, saved_value


def _saved_config(ckpt: checkpoint.Checkpointer) -> dict | None:
    """The config saved with the newest checkpoint whose config can be read."""
    for step in reversed(ckpt.all_steps()):
        try:
            return ckpt.restore_config(step)
        except Exception:  # noqa: BLE001, S112 - a damaged one: try the one before
            continue
    return None


def _reporter(config, cfg, workdir: str, start: int) -> Reporter:
    schedule = step_lib.learning_rate_schedule(
        cfg.emb_dim, config.optimizer.warmup_steps, config.optimizer.lr_scale
    )
    return Reporter(
        workdir,
        start,
        config.total_steps,
        schedule,
        dtype=cfg.dtype,
        grad_clip_norm=config.optimizer.grad_clip_norm,
    )


def _loop(config, data, train_iter, mesh, ckpt, steps: step_lib.Setup, state, reporter) -> Outcome:
    """Steps from state.step to config.total_steps: logs, evaluates and checkpoints on the
    config's schedule (a checkpoint of an evaluated step carries its validation metrics),
    and saves and stops at a preemption or Ctrl-C."""
    preemption = _Preemption(ckpt)
    outcome = Outcome(step=int(state.step), validation={})
    layout = data.train_layout(config)
    try:
        for step in range(int(state.step) + 1, config.total_steps + 1):
            batch = sharding.global_batch(mesh, next(train_iter))
            state, step_metrics = steps.train(state, batch, steps.rng)
            reporter.add(step, step_metrics)
            outcome.step = step
            last = step == config.total_steps
            stop = preemption.reached(step)
            evaluated = last or step % config.eval_every_steps == 0
            # Every evaluated step is saved, so that its metrics rank it (--step=best).
            save = last or stop or evaluated or step % config.checkpoint_every_steps == 0
            log = last or stop or step % config.log_every_steps == 0
            if log or save:
                reporter.flush(step, write=log)
            if stop:  # save at once and leave: a preemption grace period is short
                ckpt.save(step, state, train_iter, config.to_dict(), layout=layout)
                outcome.preempted = True
                logging.warning('Stopped at step %d; run the same command to resume.', step)
                break
            if evaluated:
                outcome.validation = step_lib.evaluate_loss(
                    steps.evaluate, state.params, data.eval_batches(config), mesh
                )
                reporter.write_eval(step, config.data.eval_split, outcome.validation)
            if config.bleu_every_steps and step % config.bleu_every_steps == 0:
                model = nnx.merge(steps.graphdef, state.params, steps.rest)
                scores = _sample_bleu(config, data, model, mesh)
                if scores:
                    reporter.write_eval(step, config.data.eval_split, scores)
            if save:  # the metrics rank it for the best checkpoint kept
                metrics = outcome.validation if evaluated else None
                ckpt.save(step, state, train_iter, config.to_dict(), metrics, layout)
    finally:  # each closed however the one before it ends
        try:
            preemption.close()
            ckpt.wait()  # raises when the last save failed
        finally:
            reporter.close()
    return outcome
