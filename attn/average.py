"""The mean of a run's last K checkpoints, written as a checkpoint of its own (§6.1: base
models average the last 5 checkpoints, big models the last 20).

    python -m attn.average --workdir=W --last=K [--step=N|best] [--out=W2]

W2 (default W/average-last<K>) is a workdir like any other: `W2/checkpoints/<step>/` holds
the averaged parameters (no optimizer state) and the run's config, at the step of the last
checkpoint averaged, so `attn.evaluate`, `attn.translate`, `attn.analyze` and
`attn.export` read it as they read W (W's tokenizer/ is copied into it). W2/average.json
names the source and its steps.
The mean is a running sum: memory is two parameter sets whatever K.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from absl import flags

from attn import cli, rundir
from attn.training import checkpoint, sharding


def average(
    workdir: str, *, last: int, out: str | None = None, step: int | str | None = None
) -> dict:
    """Writes the mean of the last `last` checkpoints (up to `step`; rundir.BEST: the
    best kept) to `out`; returns what it wrote ({'out', 'steps', 'step'})."""
    out = out or os.path.join(workdir, f'average-last{last}')
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise checkpoint.CheckpointError(
            f'--out={out} is the workdir itself: write the average to a new directory.'
        )
    mesh = sharding.make_mesh()
    config, steps, params = rundir.load_params(workdir, step=step, average_last=last, mesh=mesh)
    ckpt = checkpoint.Checkpointer(rundir.checkpoints(out), keep=None, async_save=False)
    if steps[-1] in ckpt.all_steps():
        ckpt.close()
        raise checkpoint.CheckpointError(
            f'{rundir.checkpoints(out)} already holds step {steps[-1]}: remove it or '
            'choose another --out.'
        )
    state = {'step': jnp.asarray(steps[-1], jnp.int32), 'params': params}
    ckpt.save(steps[-1], state, config=config.to_dict())
    ckpt.close()
    rundir.write_config(out, config)
    rundir.copy_tokenizer(workdir, out)
    summary = {'out': os.path.abspath(out), 'source': os.path.abspath(workdir), 'steps': steps}
    with open(os.path.join(out, 'average.json'), 'w', encoding='utf-8') as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    workdir = cli.workdir()
    summary = average(workdir, last=FLAGS.last, out=FLAGS.out, step=FLAGS.step)
    print(json.dumps(summary))  # noqa: T201 - the command's report


def run():
    flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
    flags.DEFINE_integer('last', 5, 'Average the parameters of the last K checkpoints.')
    cli.at_least('last', 1, 'give 1 or more checkpoints to average.')
    cli.define_step_flag('Last checkpoint step to include (default: the latest)')
    flags.DEFINE_string('out', None, 'Workdir to write the average to (default: W/average-lastK).')
    cli.run(main)


if __name__ == '__main__':
    run()
