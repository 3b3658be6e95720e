"""The layout of a run's directory.

W/config.json        the resolved config
W/checkpoints/       Orbax checkpoints (state, data iterator, config) by step
W/tensorboard/       TensorBoard event files
W/metrics.jsonl      one JSON object per logged step / evaluation
W/eval/              evaluation reports, <split>-<step>.json
"""

from __future__ import annotations

import os

import jax


def checkpoints(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints')


def write_config(workdir: str, config) -> None:
    """Creates the workdir and writes config.json (process 0)."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
            f.write(config.to_json_best_effort(indent=2) + '\n')
