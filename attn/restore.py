"""A trained model back from a workdir, on whatever devices this process has: for
evaluation, translation and analysis (any topology can have written it).

    run = restore.load('runs/l10n', average_last=5)
    run.model(inputs, targets)      # an nnx.Module: mask heads, capture attention...
"""

from __future__ import annotations

import dataclasses

from absl import logging
from flax import nnx
from ml_collections import config_dict

from attn import checkpoint, configuration
from attn import workdir as workdir_lib
from attn.model import build_model


@dataclasses.dataclass
class Run:
    config: config_dict.ConfigDict  # the config the checkpoint was trained with
    model: nnx.Module
    steps: list[int]  # checkpoint steps whose parameters `model` holds (averaged if several)

    @property
    def step(self) -> int:
        return self.steps[-1]


def load(workdir: str, *, step: int | None = None, average_last: int = 1) -> Run:
    """The model of checkpoint `step` (default: latest), or the mean of the parameters
    of the last `average_last` checkpoints up to it."""
    ckpt = checkpoint.Checkpointer(workdir_lib.checkpoints(workdir), keep=None, async_save=False)
    available = ckpt.all_steps()
    if not available:
        raise checkpoint.CheckpointError(
            f'No checkpoint in {workdir_lib.checkpoints(workdir)}: train first '
            f'(python -m attn.train --config=... --workdir={workdir}).'
        )
    step = available[-1] if step is None else step
    if step not in available:
        raise checkpoint.CheckpointError(f'No checkpoint of step {step}; there are {available}.')
    steps = [s for s in available if s <= step][-average_last:]
    if len(steps) < average_last:
        logging.warning('Only %d checkpoints to average: %s', len(steps), steps)
    config = config_dict.ConfigDict(ckpt.restore_config(step))
    model = nnx.jit(lambda: build_model(config.model_kind, configuration.model_config(config)))()
    params = nnx.state(model, nnx.Param)
    saved = [ckpt.restore_arrays(s)['params'] for s in steps]
    nnx.update(model, checkpoint.into_structure(params, checkpoint.average(saved)))
    ckpt.close()
    return Run(config=config, model=model, steps=steps)
