"""Orbax checkpoints in `workdir/checkpoints/`: the train state, the data iterator's
position and the config, saved together so a resumed run continues exactly.

Items of each step: `state` (step, params, optimizer state; a PyTree), `data`
(each host's Grain iterator state) and `config` (JSON), and Orbax's own `metrics` (the
validation metrics, when the step was evaluated). Saves are asynchronous. Kept: the
latest `keep` checkpoints and the one of lowest validation perplexity.
Restores go onto whatever devices the restoring process has, so a checkpoint written
on 8 GPUs opens on a laptop CPU for analysis.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from attn.errors import UserError
from attn.training import distributed


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; names the fix."""


class _Unreadable(Exception):
    """A checkpoint step that cannot be read; `Checkpointer.restore` tries an older one."""


_STEP_METADATA = '_CHECKPOINT_METADATA'  # Orbax writes it as a save starts and ends


def _perplexity(metrics: dict) -> float:
    """What ranks checkpoints: the validation perplexity saved with one (lower is better)."""
    return metrics['perplexity']


def _preservation(keep: int | None) -> ocp.checkpoint_managers.PreservationPolicy:
    """The latest `keep` checkpoints (None: all), and the best by validation perplexity.
    Checkpoints saved without metrics (steps not evaluated) count for the latest only:
    never best, and never kept for it."""
    policies = ocp.checkpoint_managers
    best = policies.BestN(
        get_metric_fn=_perplexity,
        reverse=True,  # BestN keeps the end of the sorted list: descending, so the lowest
        n=1,
        keep_checkpoints_without_metrics=False,
    )
    return policies.AnyPreservationPolicy([policies.LatestN(n=keep), best])


def _short(error: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message', at most `limit` characters."""
    lines = str(error).strip().splitlines()
    first = lines[0].split(' See full TensorStore details')[0] if lines else ''
    text = f'{type(error).__name__}: {first}'.rstrip(': ')
    return text if len(text) <= limit else text[: limit - 3] + '...'


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins for restoring onto `tree`'s devices."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _path_name(path) -> str:
    """'encoder.layers.0.self_attention.query.value' for any pytree key path."""

    def key_name(key) -> str:
        for attribute in ('key', 'name', 'idx'):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return '.'.join(key_name(k) for k in path)


def leaves_by_name(tree: Any) -> dict[str, Any]:
    """{'params.encoder.layers.0....': leaf}, the same naming for arrays and metadata."""
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def into_structure(target: Any, saved: Any) -> Any:
    """`saved` (nested dicts, as `restore_arrays` gives) rebuilt in `target`'s pytree
    structure (e.g. an nnx.State), after checking every shape."""
    check_compatible(saved, target)
    by_name = leaves_by_name(saved)
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    return jax.tree_util.tree_unflatten(treedef, [by_name[_path_name(p)] for p, _ in flat])


def check_compatible(saved: Any, expected: Any) -> None:
    """Raises CheckpointError naming the first parameter whose shape differs."""
    saved_leaves = leaves_by_name(saved)
    for name, leaf in leaves_by_name(expected).items():
        if name not in saved_leaves:
            raise CheckpointError(
                f'The checkpoint has no {name}: it was written by a different model. '
                'Use a new --workdir, or the config the checkpoint was trained with '
                '(saved in its config.json).'
            )
        saved_shape = tuple(getattr(saved_leaves[name], 'shape', ()))
        if saved_shape != tuple(np.shape(leaf)):
            raise CheckpointError(
                f'{name} has shape {saved_shape} in the checkpoint but {tuple(np.shape(leaf))} '
                'in this config. Use a new --workdir, or the config the checkpoint was '
                'trained with (saved in its config.json).'
            )


class Checkpointer:
    """Saves and restores (state, data iterator, config) by step."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int | None,
        async_save: bool = True,
        create: bool = True,
    ):
        """`create=False` opens existing checkpoints for reading and creates nothing."""
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            best_fn=_perplexity,  # also makes Orbax write the metrics given to `save`
            best_mode='min',
            preservation_policy=_preservation(keep),
            create=create,
            enable_async_checkpointing=async_save,
            read_only=not create,
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
        self,
        step: int,
        state: Any,
        data_iterator=None,
        config: dict | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """`metrics`: the validation metrics of `step` (with 'perplexity'), only if it was
        evaluated; Orbax keeps them in the step's directory, where a resumed run reads them."""
        items = {'state': ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items['config'] = ocp.args.JsonSave(config)
        self._check_room(step, state)
        with self._saving(), _no_missing_metrics_warning():
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        logging.info('Saving checkpoint of step %d to %s', step, self.directory)

    def restore(self, target_state: Any, data_iterator=None, step: int | None = None) -> Any:
        """Restores the state onto `target_state`'s shapes and devices (and the iterator).

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
            problem = self._problem(candidate, data_iterator is not None)
            if problem is None:
                try:
                    restored = self._restore(candidate, target_state, data_iterator)
                except _Unreadable as error:
                    problem = str(error)
            if distributed.agreed_max([problem is not None])[0]:  # every host or none
                problem = problem or 'unreadable on another process'
                logging.warning(
                    'Checkpoint %s cannot be read (%s).', self.directory / str(candidate), problem
                )
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

    def _problem(self, step: int, with_data: bool) -> str | None:
        """Why checkpoint `step` is incomplete, from its files alone (None: it looks whole)."""
        path = self.directory / str(step)
        metadata = path / _STEP_METADATA
        if not metadata.exists():
            return f'{metadata.name} is missing (Orbax writes it with every checkpoint)'
        try:
            json.loads(metadata.read_text())
        except (OSError, ValueError) as error:
            return f'{metadata.name} cannot be parsed ({_short(error)})'
        items = ('state', 'data') if with_data else ('state',)
        for item in items:
            if not (path / item).is_dir():
                return f'its {item}/ is missing'
        return None

    def _restore(self, step: int, target_state: Any, data_iterator) -> Any:
        """The items of `step` restored onto `target_state` (and the iterator); _Unreadable
        when they cannot be read, CheckpointError when they belong to another model."""
        try:
            saved = self.manager.metadata(step).item_metadata['state']
        except Exception as error:  # noqa: BLE001 - any unreadable metadata
            raise _Unreadable(f'its state metadata cannot be read ({_short(error)})') from error
        if saved is None:
            raise _Unreadable('its state has no metadata (state/_METADATA)')
        check_compatible(saved, target_state)
        items = {'state': _pytree_restore(_abstract(target_state))}
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:  # Orbax reads the arrays only now: a damaged file fails here
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 - any unreadable array or iterator state
            raise _Unreadable(_short(error)) from error

    def _set_aside(self, steps: list[int], restored: int) -> None:
        """Renames the unreadable step directories to `<step>.unreadable` (process 0), so
        that this run can save those steps again; Orbax lists only numbered directories."""
        if distributed.is_main():
            for step in steps:
                source = self.directory / str(step)
                target = self.directory / f'{step}.unreadable'
                suffix = 1
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
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            'config'
        ]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        with self._saving():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with contextlib.suppress(CheckpointError), self._saving():
            self.manager.close()  # a failed save has been reported already

    def _check_room(self, step: int, state: Any) -> None:
        """Refuses, before anything is written, a save the disk has no room for (every
        process agrees, so none waits on the others at a save that never comes)."""
        local = str(self.directory)
        if '://' in local or not os.path.isdir(local):
            return  # object stores: no free-space figure
        needed = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, 'nbytes'))
        steps = self.all_steps()
        if steps:  # metadata and per-file overhead included
            latest = os.path.join(local, str(steps[-1]))
            files = [os.path.join(d, f) for d, _, names in os.walk(latest) for f in names]
            needed = max(needed, sum(map(os.path.getsize, files)))
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
        saved = sorted(int(p.name) for p in self.directory.glob('*') if p.name.isdigit())
        steps = ' and '.join(map(str, saved))
        return (
            f'Checkpoints {steps} are intact' if steps else 'There is no earlier checkpoint'
        ) + ': free space or fix the disk, then run the same command to resume.'

    @contextlib.contextmanager
    def _saving(self):
        """A save that fails (a full disk, a lost mount) as one CheckpointError naming the
        cause and the checkpoints that are intact; what it left half-written is removed,
        so the disk holds nothing but complete checkpoints."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - Orbax raises whatever its writers raised
            partial = self._remove_partial()
            failed = ', '.join(p.name.split('.')[0] for p in partial) or 'a checkpoint'
            raise CheckpointError(
                f'{_save_failure(error)}: saving checkpoint {failed} in {self.directory} '
                f'failed (its partial files are removed). {self._intact()}'
            ) from error

    def _remove_partial(self) -> list[epath.Path]:
        """Removes what a failed save left half-written (its `*tmp*` directories). A save's
        writer thread still running when another failed can write into a directory again
        after it is removed (the freed space lets it), so removal repeats until none is seen
        for half a second (at most 10 s; no wait on the writers, which a lost mount or
        another process could hold forever). Returns the first ones found."""
        first = sorted(p for p in self.directory.glob('*') if 'tmp' in p.name)
        quiet_since = None
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            partial = [p for p in self.directory.glob('*') if 'tmp' in p.name]
            for path in partial:
                shutil.rmtree(path, ignore_errors=True)
            if partial:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.5:
                break
            time.sleep(0.05)
        return first


@contextlib.contextmanager
def _no_missing_metrics_warning():
    """Drops Orbax's warning that a save has no metrics: a step that was not evaluated is
    saved without them on purpose."""

    def keep(record) -> bool:
        return 'did not provide metrics' not in record.getMessage()

    logger = logging.get_absl_logger()
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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
    items = {
        'state': (ocp.PyTreeCheckpointHandler(), ocp.args.PyTreeSave, ocp.args.PyTreeRestore),
        'data': (
            grain.checkpoint.CheckpointHandler(),
            grain.checkpoint.CheckpointSave,
            grain.checkpoint.CheckpointRestore,
        ),
        'config': (ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore),
    }
    for item, (handler, save, restore) in items.items():
        registry.add(item, save, handler)
        registry.add(item, restore, handler)
    return registry


def _pytree_restore(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restores the leaves of `target` (ShapeDtypeStructs with shardings) as jax.Arrays
    placed so; `partial`: only those leaves, the rest of the checkpoint is not read."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)
