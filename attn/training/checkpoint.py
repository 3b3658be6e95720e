"""Orbax checkpoints in `workdir/checkpoints/`: the train state, the data iterator's
position and the config, saved together so a resumed run continues exactly.

Items of each step: `state` (step, params, optimizer state; a PyTree), `data` (each host's
Grain iterator state), `config` (JSON) and Orbax's own `metrics` (the validation metrics,
when the step was evaluated). Saves are asynchronous. Kept: the latest `keep` checkpoints
and the one of lowest validation perplexity. Restores go onto whatever devices the
restoring process has: a checkpoint written on 8 GPUs opens on a laptop CPU.

Nothing saved is lost. Orbax writes a step to a temporary directory and renames it when
complete. A save the disk has no room for is refused before it starts; one that fails
anyway removes the temporary directory it created, and nothing else. What a process killed
mid-save left, Orbax removes when the next writer opens the directory (a trainer holds the
workdir's lock, attn/rundir.py: no other process saves there). A damaged latest checkpoint
is set aside and the newest readable one restored.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from attn.errors import UserError
from attn.training import distributed

_PROCESS_FILE = re.compile(r'process_\d+-of-(\d+)\.json')  # Grain's name for a host's state


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; names the fix."""


class _Unreadable(Exception):
    """A checkpoint step that cannot be read; `Checkpointer.restore` tries an older one."""


def check_compatible(saved: Any, expected: Any) -> None:
    """Raises CheckpointError naming the first leaf of `expected` that `saved` lacks or
    has in another shape (leaves matched by Orbax's names, 'params.encoder.....value')."""
    saved_leaves = ocp.tree.to_flat_dict(saved, sep='.')
    fix = (
        'Use a new --workdir, or the config the checkpoint was trained with (saved in its '
        'config.json).'
    )
    for name, leaf in ocp.tree.to_flat_dict(expected, sep='.').items():
        if name not in saved_leaves:
            raise CheckpointError(
                f'The checkpoint has no {name}: it was written by a different model. {fix}'
            )
        shape, expected_shape = (tuple(getattr(x, 'shape', ())) for x in (saved_leaves[name], leaf))
        if shape != expected_shape:
            raise CheckpointError(
                f'{name} has shape {shape} in the checkpoint but {expected_shape} in this '
                f'config. {fix}'
            )


def into_structure(target: Any, saved: Any) -> Any:
    """`saved` (nested dicts, as `restore_params` gives) in `target`'s pytree structure
    (e.g. an nnx.State), after checking every shape."""
    check_compatible(saved, target)
    return ocp.tree.deserialize_tree(saved, target)


class Checkpointer:
    """Saves and restores (state, data iterator, config) by step."""

    def __init__(self, directory, *, keep: int | None, async_save=True, create=True):
        """`create=False` opens existing checkpoints for reading: creates and removes nothing."""
        self.directory = epath.Path(directory)
        self._in_flight: tuple[int, set[str]] | None = None  # step, temporaries before it
        self.iterator_restored = False  # by the last `restore`
        logging.get_absl_logger().addFilter(_not_missing_metrics)  # once: the same filter
        policies = ocp.checkpoint_managers
        best = policies.BestN(  # never a checkpoint saved without metrics (not evaluated)
            get_metric_fn=_perplexity,
            reverse=True,  # BestN keeps the end of the sorted list: descending, so the lowest
            n=1,
            keep_checkpoints_without_metrics=False,
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_perplexity,  # also makes Orbax write the metrics given to `save`
            best_mode='min',
            preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(keep), best]),
            create=create,
            read_only=not create,
            cleanup_tmp_directories=create,  # what a process killed mid-save left
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handler_registry()
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step of lowest validation perplexity; None when no kept checkpoint was
        saved with metrics (older runs, or no save at an evaluated step)."""
        return self.manager.best_step()

    def save(
        self, step: int, state, data_iterator=None, config=None, metrics=None, layout=None
    ) -> None:
        """`metrics`: the validation metrics of `step` (with 'perplexity'), only if it was
        evaluated; Orbax keeps them in the step's directory, where a resumed run reads them.
        `layout`: what the iterator's state is laid out by (`Data.train_layout`)."""
        items = {'state': ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
        if layout is not None:
            items['layout'] = ocp.args.JsonSave(layout)
        if config is not None:
            items['config'] = ocp.args.JsonSave(config)
        self.wait()  # the save before, finished: a failure of it is reported as its own
        self._check_room(step, state)
        self._in_flight = (step, self._temporaries(step))
        with self._saving():
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        logging.info('Saving checkpoint of step %d to %s', step, self.directory)

    def restore(
        self, target_state: Any, data_iterator=None, step: int | None = None, layout=None
    ) -> Any:
        """Restores the state onto `target_state`'s shapes and devices (and the iterator).

        The iterator's state is restored when it was saved with `layout` (None: whatever it
        was saved with), from any process's file: every process saves the same state, so it
        restores on any number of processes. Saved with another layout, it is not restored
        and `iterator_restored` is False.

        Without `step`: the newest checkpoint that can be read. One that cannot (a damaged
        array file, lost metadata, no iterator state) is named in a warning, moved aside to
        `<step>.unreadable` (kept, never deleted) once an older one has been restored, and
        the next older one is tried. CheckpointError when none can be read, or when one
        was written by a different model (that is refused, never skipped).
        """
        steps = self.all_steps() if step is None else [step]
        if not steps:
            raise CheckpointError(f'No checkpoint in {self.directory}.')
        unreadable: list[tuple[int, str]] = []
        for candidate in reversed(steps):
            problem = None
            try:
                restored = self._restore(candidate, target_state, data_iterator, layout)
            except _Unreadable as error:
                problem = str(error)
            if distributed.agreed_max([problem is not None])[0]:  # every host or none
                problem = problem or 'unreadable on another process'
                path = self.directory / str(candidate)
                logging.warning('Checkpoint %s cannot be read (%s).', path, problem)
                unreadable.append((candidate, problem))
                continue
            if unreadable and step is None:
                self._set_aside([s for s, _ in unreadable], candidate)
            logging.info('Restored checkpoint of step %d from %s', candidate, self.directory)
            return restored['state']
        reasons = '; '.join(f'{self.directory / str(s)}: {why}' for s, why in unreadable)
        raise CheckpointError(
            f'No checkpoint in {self.directory} can be read ({reasons}). Start a new --workdir '
            '(the unreadable step directories are left as they are).'
        )

    def _restore(self, step: int, target_state: Any, data_iterator, layout) -> Any:
        """The items of `step` restored onto `target_state` (and the iterator, if saved with
        `layout`); _Unreadable when they cannot be read, CheckpointError when they belong to
        another model."""
        try:
            metadata = self.manager.metadata(step)
            saved = metadata.item_metadata['state']
        except Exception as error:  # noqa: BLE001 - any unreadable metadata
            reason = f'its state metadata cannot be read ({short_error(error)})'
            raise _Unreadable(reason) from error
        if metadata.commit_timestamp_nsecs is None:  # Orbax records it as a save completes
            raise _Unreadable('its _CHECKPOINT_METADATA is missing or records no commit')
        if saved is None:
            raise _Unreadable('its state has no metadata (state/_METADATA)')
        check_compatible(saved, target_state)
        if data_iterator is not None and not self._same_layout(step, layout):
            data_iterator = None
        try:  # Orbax reads the arrays only now: a damaged file fails here
            args = ocp.args.Composite(state=_pytree_restore(target_state))
            restored = self.manager.restore(step, args=args)
            if data_iterator is not None:
                self._restore_iterator(step, data_iterator)
        except Exception as error:  # noqa: BLE001 - any unreadable array or iterator state
            raise _Unreadable(short_error(error)) from error
        self.iterator_restored = data_iterator is not None
        return restored

    def _same_layout(self, step: int, layout) -> bool:
        """Whether the iterator state of `step` was saved with `layout` (None: any). One
        saved before layouts were, by one process, was; by several, it was not (each process
        then read its own shard of the examples)."""
        if layout is None:
            return True
        try:
            saved = self.manager.restore(
                step, args=ocp.args.Composite(layout=ocp.args.JsonRestore())
            )
        except KeyError:  # saved before layouts were
            return jax.process_count() == 1 and self._saved_process_count(step) in (None, 1)
        return saved['layout'] == layout

    def _restore_iterator(self, step: int, data_iterator) -> None:
        """Sets the iterator to the state saved with `step`: this process's file, or, saved by
        another number of processes, process 0's (every process saves the same state)."""
        folder = self.directory / str(step) / 'data'
        own = folder / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
        files = [own] if own.exists() else sorted(folder.glob('process_0-of-*.json'))
        if not files:
            raise ValueError(f'{folder} holds no iterator state for this process.')
        data_iterator.set_state(json.loads(files[0].read_text()))
        data_iterator.start_prefetch()  # as Grain's own checkpoint handler does

    def _set_aside(self, steps: list[int], restored: int) -> None:
        """Renames the unreadable step directories to `<step>.unreadable` (process 0), so
        that this run can save those steps again; Orbax lists only numbered directories."""
        if distributed.is_main():
            for step in steps:
                source = self.directory / str(step)
                target, suffix = self.directory / f'{step}.unreadable', 1
                while target.exists():
                    suffix += 1
                    target = self.directory / f'{step}.unreadable.{suffix}'
                source.rename(target)
                logging.warning(
                    'Moved unreadable checkpoint %s to %s (kept for inspection); resuming from '
                    'step %d.',
                    source,
                    target,
                    restored,
                )
        distributed.barrier('attn-checkpoints-set-aside')
        self.manager.reload()

    def _saved_process_count(self, step: int) -> int | None:
        """How many processes saved the data iterator of `step`: n of Grain's
        data/process_<i>-of-<n>.json files; None when there are none."""
        names = (self.directory / str(step) / 'data').glob('process_*-of-*.json')
        counts = {int(match[1]) for p in names if (match := _PROCESS_FILE.fullmatch(p.name))}
        return counts.pop() if len(counts) == 1 else None

    def restore_params(self, step: int, shardings) -> Any:
        """The saved parameters of `step` (nested dicts of arrays), and nothing else: the
        optimizer state is never read. `shardings(abstract_params)` places them (a tree of
        shardings for the tree of jax.ShapeDtypeStruct it is given), so they land on this
        process's mesh however many devices and hosts wrote them."""
        metadata = self.manager.metadata(step).item_metadata['state']
        params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata['params'])
        placed = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            params,
            shardings(params),
        )
        args = ocp.args.Composite(state=_pytree_restore({'params': placed}, partial=True))
        return self.manager.restore(step, args=args)['state']['params']

    def restore_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: the latest); CheckpointError when the step
        has no config item: a checkpoint that attn.train did not write."""
        step = self.latest_step() if step is None else step
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        try:
            return self.manager.restore(step, args=args)['config']
        except KeyError as error:
            if 'config' not in str(error):
                raise
            items = sorted(p.name for p in (self.directory / str(step)).iterdir() if p.is_dir())
            raise CheckpointError(
                f'{self.directory / str(step)} is not a checkpoint attn.train wrote: it has no '
                f'config item (its items: {items}). Point --workdir at an attn run directory.'
            ) from None

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        with self._saving():
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        with contextlib.suppress(Exception), self._saving():  # a failure is reported by then
            self.manager.close()

    def _check_room(self, step: int, state: Any) -> None:
        """Refuses, before anything is written, a save the disk has no room for (every
        process agrees, so none waits on the others at a save that never comes)."""
        local = str(self.directory)
        if '://' in local or not os.path.isdir(local):
            return  # object stores: no free-space figure
        needed = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, 'nbytes'))
        if steps := self.all_steps():  # the latest's size: metadata and files' overhead too
            files = os.walk(os.path.join(local, str(steps[-1])))
            needed = max(needed, sum(os.path.getsize(f'{d}/{f}') for d, _, fs in files for f in fs))
        free = shutil.disk_usage(local).free
        if distributed.agreed_max([free < needed])[0]:
            raise CheckpointError(
                f'{os.strerror(errno.ENOSPC)}: saving checkpoint {step} in {self.directory} '
                f'needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; '
                f'nothing was written. {self._intact()}'
            )

    def _intact(self) -> str:
        """Which checkpoints are on disk, complete (read from the directory: the manager
        may count a save that failed)."""
        saved = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        steps = ' and '.join(map(str, saved))
        return (
            f'Checkpoints {steps} are intact' if steps else 'There is no earlier checkpoint'
        ) + ': free space or fix the disk, then run the same command to resume.'

    def _temporaries(self, step: int) -> set[str]:
        """The temporary directories of `step`: `<step>.orbax-checkpoint-tmp` (older Orbax
        versions append `-<n>`)."""
        return {p.name for p in self.directory.glob(f'{step}{ocp.utils.TMP_DIR_SUFFIX}*')}

    @contextlib.contextmanager
    def _saving(self):
        """A save that fails (a full disk, a lost mount) as one CheckpointError naming the
        cause and the checkpoints that are intact. Removed: the temporary directories of
        its step that appeared after it began, which it created; nothing else (the save of
        another process beside it is left alone)."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - Orbax raises whatever its writers raised
            if self._in_flight is None:
                raise
            (step, before), self._in_flight = self._in_flight, None
            # A writer of the failed save still running can create its directory again once
            # the removal frees space: removed again until none is seen for 0.5 s (at most
            # 10 s; no wait on the writers, which a lost mount could hold forever).
            deadline = time.monotonic() + 10.0
            while (created := self._temporaries(step) - before) and time.monotonic() < deadline:
                for name in created:
                    shutil.rmtree(self.directory / name, ignore_errors=True)
                time.sleep(0.5)
            raise CheckpointError(
                f'{_save_failure(error)}: saving checkpoint {step} in {self.directory} failed '
                f'(its partial files are removed). {self._intact()}'
            ) from error


def _perplexity(metrics: dict) -> float:
    """What ranks checkpoints: the validation perplexity saved with one (lower is better)."""
    return metrics['perplexity']


def _not_missing_metrics(record) -> bool:
    """Drops Orbax's warning that a save has no metrics: a step that was not evaluated is
    saved without them on purpose."""
    return 'did not provide metrics' not in record.getMessage()


def short_error(error: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message', at most `limit` characters."""
    lines = str(error).strip().splitlines()
    first = lines[0].split(' See full TensorStore details')[0] if lines else ''
    text = f'{type(error).__name__}: {first}'.rstrip(': ')
    return text if len(text) <= limit else text[: limit - 3] + '...'


def _save_failure(error: BaseException) -> str:
    """The operating system's reason for a failed write, from anywhere in the chain."""
    while error is not None:
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        if 'No space left on device' in str(error):
            return os.strerror(errno.ENOSPC)
        error = error.__cause__ or error.__context__
    return 'Writing failed'


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The handler of each item, for saving and restoring it: the same handlers, and so
    the same files, as checkpoints have always had."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    grain_args = (grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore)
    for item, handler, args in (
        ('state', ocp.PyTreeCheckpointHandler(), (ocp.args.PyTreeSave, ocp.args.PyTreeRestore)),
        ('config', ocp.JsonCheckpointHandler(), (ocp.args.JsonSave, ocp.args.JsonRestore)),
        ('layout', ocp.JsonCheckpointHandler(), (ocp.args.JsonSave, ocp.args.JsonRestore)),
        ('data', grain.checkpoint.CheckpointHandler(), grain_args),
    ):
        for arg in args:
            registry.add(item, arg, handler)
    return registry


def _pytree_restore(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restores the leaves of `target` (arrays, or ShapeDtypeStructs with shardings) as
    jax.Arrays placed alike; `partial`: only those leaves, the rest is not read."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)
