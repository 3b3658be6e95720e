"""Prints the loss and gradient norm of each of 20 train steps of a tiny model (dropout on)
as JSON: Adam makes the same update of a gradient scaled by any factor, so the losses alone
would not show a gradient summed where it should be averaged.

Run in its own process: `XLA_FLAGS=--xla_force_host_platform_device_count=N python -m
tests.multidevice_losses [coordinator num_processes process_id]`; the tests compare 1
device with 4, and 2 processes of 2 devices with 1 process of 4. Each process feeds its
own rows of the batch. MODEL_SWITCHES (JSON, e.g. '{"ffn": "swiglu"}') changes the model.
"""

import json
import os
import sys

import jax
import numpy as np

from attn import configs
from attn.model.config import ModelConfig
from attn.training import distributed, sharding, step


def tiny_setup(num_layers: int, **switches):
    """(model config, Adam on the paper's schedule, mesh over every device) of a tiny
    Transformer (`switches`: more ModelConfig fields)."""
    cfg = ModelConfig(
        vocab_size=64, num_layers=num_layers, emb_dim=32, num_heads=4, mlp_dim=64, **switches
    )
    optimizer = configs.base_config('tiny').optimizer
    optimizer.warmup_steps = 10
    return cfg, step.make_optimizer(optimizer, cfg.emb_dim), sharding.make_mesh()


def losses(steps: int = 20) -> list[list[float]]:
    cfg, tx, mesh = tiny_setup(num_layers=2, **json.loads(os.environ.get('MODEL_SWITCHES', '{}')))
    graphdef, rest, state = step.create_state('transformer', cfg, 0, tx, mesh)
    step_fn, _ = step.compile_steps(graphdef, rest, tx, step.StepConfig('transformer', 0.1), mesh)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        batch = {
            'inputs': rng.integers(4, 64, (8, 12)).astype(np.int32),
            'targets': rng.integers(4, 64, (8, 10)).astype(np.int32),
        }
        rows = 8 // jax.process_count()
        local = {
            k: v[jax.process_index() * rows : (jax.process_index() + 1) * rows]
            for k, v in batch.items()
        }
        state, metrics = step_fn(state, sharding.global_batch(mesh, local), jax.random.key(0))
        out.append([float(metrics['loss']), float(metrics['grad_norm'])])
    return out


if __name__ == '__main__':
    if len(sys.argv) == 4:
        distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps({'devices': jax.device_count(), 'losses': losses()}))  # noqa: T201
