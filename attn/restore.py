"""A trained model back from a workdir, for use rather than for resuming: evaluation,
translation, analysis, averaging and export, on whatever devices and processes this run
has (any topology can have written it).

    run = restore.load('runs/l10n', average_last=5)
    run.model(inputs, targets)      # an nnx.Module: mask heads, capture attention...
    best = restore.load('runs/l10n', step=restore.BEST)  # lowest validation perplexity

Only parameters are read (never the Adam moments), placed on this run's mesh with the
shardings the train step uses. Averaging is a running sum: one checkpoint's parameters
are restored at a time, so memory is two parameter sets whatever the number averaged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from ml_collections import config_dict

from attn import checkpoint, configuration, sharding
from attn import workdir as workdir_lib
from attn.model import build_model


@dataclasses.dataclass
class Run:
    config: config_dict.ConfigDict  # the config the checkpoint was trained with
    model: nnx.Module
    steps: list[int]  # checkpoint steps whose parameters `model` holds (averaged if several)
    mesh: Mesh | None = None  # where the parameters live; decoding shards batches over it

    @property
    def step(self) -> int:
        return self.steps[-1]


def open_checkpoints(workdir: str) -> checkpoint.Checkpointer:
    """The workdir's checkpoints, read-only; names the fix when there are none."""
    directory = workdir_lib.checkpoints(workdir)
    train_first = f'train first (python -m attn.train --config=... --workdir={workdir}).'
    if not os.path.isdir(directory):
        what = 'does not exist' if not os.path.exists(workdir) else 'has no checkpoints/'
        raise checkpoint.CheckpointError(
            f'Workdir {workdir} {what}: check the path, or {train_first}'
        )
    ckpt = checkpoint.Checkpointer(directory, keep=None, async_save=False, create=False)
    if not ckpt.all_steps():
        ckpt.close()
        raise checkpoint.CheckpointError(f'No checkpoint in {directory}: {train_first}')
    return ckpt


BEST = 'best'  # a step argument: the kept checkpoint of lowest validation perplexity


def resolve_step(ckpt: checkpoint.Checkpointer, step: int | str | None) -> int | None:
    """`step`, with BEST replaced by the kept step of lowest validation perplexity (as
    saved with it by training); CheckpointError naming the fix when none has one."""
    if step != BEST:
        return step
    best = ckpt.best_step()
    if best is None:
        raise checkpoint.CheckpointError(
            f'--step={BEST}: no checkpoint in {ckpt.directory} has a validation perplexity '
            'recorded (written before training recorded it, or none saved at an evaluated '
            f'step). Give --step=N for one of {ckpt.all_steps()}, or leave --step out for '
            'the latest.'
        )
    return best


def select_steps(available: list[int], step: int | None, average_last: int) -> list[int]:
    """The last `average_last` checkpoint steps up to `step` (default: the latest)."""
    if average_last < 1:
        raise checkpoint.CheckpointError(
            f'average_last={average_last}: give the number of checkpoints to average, 1 or '
            f'more (1 = no averaging; there are {len(available)}: {available}).'
        )
    step = available[-1] if step is None else step
    if step not in available:
        raise checkpoint.CheckpointError(f'No checkpoint of step {step}; there are {available}.')
    steps = [s for s in available if s <= step][-average_last:]
    if len(steps) < average_last:
        logging.warning('Only %d checkpoints to average: %s', len(steps), steps)
    return steps


def running_mean(restore_one: Callable[[int], Any], steps: list[int]) -> Any:
    """Mean of the parameter trees `restore_one(step)` over `steps`, restoring one tree at
    a time and adding it to a running sum (at most the sum and one tree are held)."""
    total = None
    for step in steps:
        tree = restore_one(step)
        total = tree if total is None else jax.tree.map(lambda a, b: a + b, total, tree)
        del tree
    return total if len(steps) == 1 else jax.tree.map(lambda x: x / len(steps), total)


def load_params(
    workdir: str, *, step: int | str | None = None, average_last: int = 1, mesh: Mesh
) -> tuple[config_dict.ConfigDict, list[int], Any]:
    """(config, steps, parameters as saved: nested dicts of arrays on `mesh`) of checkpoint
    `step` (default: the latest; BEST: the best kept), or the mean over the last
    `average_last` kept checkpoints up to it."""
    ckpt = open_checkpoints(workdir)
    try:
        steps = select_steps(ckpt.all_steps(), resolve_step(ckpt, step), average_last)
        config = config_dict.ConfigDict(ckpt.restore_config(steps[-1]))
        mode = config.get('sharding', 'replicated')

        def shardings(tree):
            return sharding.state_shardings(tree, mesh, mode)

        params = running_mean(lambda s: ckpt.restore_params(s, shardings), steps)
    finally:
        ckpt.close()
    return config, steps, params


def load(
    workdir: str,
    *,
    step: int | str | None = None,
    average_last: int = 1,
    mesh: Mesh | None = None,
) -> Run:
    """The model of checkpoint `step` (default: latest; BEST: the kept one of lowest
    validation perplexity), or the mean of the parameters of the last `average_last`
    checkpoints up to it, on `mesh` (default: every device of every process)."""
    mesh = mesh or sharding.make_mesh()
    config, steps, params = load_params(workdir, step=step, average_last=average_last, mesh=mesh)
    return Run(config=config, model=build(config, mesh, params), steps=steps, mesh=mesh)


def build(config: config_dict.ConfigDict, mesh: Mesh, saved_params: Any) -> nnx.Module:
    """The model of `config` holding `saved_params` (checked against its shapes), its other
    state (head masks, ...) initialized and replicated on `mesh`. No second set of
    parameters is ever made: the initializer's are dropped by the compiler."""
    cfg = configuration.model_config(config)

    def fresh():
        return build_model(config.model_kind, cfg)

    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(fresh), nnx.Param, ...)
    rest = jax.jit(
        lambda: nnx.split(fresh(), nnx.Param, ...)[2], out_shardings=sharding.replicated(mesh)
    )()
    params = checkpoint.into_structure(abstract_params, saved_params)
    return nnx.merge(graphdef, params, rest)
