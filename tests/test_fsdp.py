"""FSDP (`config.sharding='fsdp'`): which dimension each array is split along, the same
losses as the replicated state on 4 devices, less memory per device, and checkpoints that
move between the two layouts.

The 4-device checks run in one subprocess, `python -m tests.test_fsdp DIR`, which prints
what it measured as JSON.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attn import configs
from attn.errors import ConfigError
from attn.model import build_model
from attn.model.config import ModelConfig
from attn.training import checkpoint, sharding, step
from tests import multidevice_losses, toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4
STEPS, SAVE_AT = 4, 2


def _two_devices() -> Mesh:
    if jax.device_count() < 2:
        pytest.skip('needs 2 devices (tests/conftest.py: ATTN_TEST_DEVICES)')
    return Mesh(np.array(jax.devices()[:2]), (sharding.DATA_AXIS,))


def _specs(shapes: dict[str, tuple[int, ...]], mode: str) -> dict[str, P]:
    tree = {name: jax.ShapeDtypeStruct(shape, np.float32) for name, shape in shapes.items()}
    shardings = sharding.state_shardings(tree, _two_devices(), mode)
    return {name: s.spec for name, s in shardings.items()}


def test_fsdp_splits_the_largest_divisible_dimension():
    shapes = {
        'wide': (6, 8),  # the larger dimension
        'square': (8, 8),  # equals: the first
        'odd_rows': (7, 4),  # the largest that 2 divides, not the largest
        'heads': (3, 5, 4),
        'vector': (10,),
        'indivisible': (3, 5),
        'scalar': (),
    }
    assert _specs(shapes, 'fsdp') == {
        'wide': P(None, 'data'),
        'square': P('data', None),
        'odd_rows': P(None, 'data'),
        'heads': P(None, None, 'data'),
        'vector': P('data'),
        'indivisible': P(),
        'scalar': P(),
    }
    assert set(_specs(shapes, 'replicated').values()) == {P()}


def test_state_shardings_keep_the_train_state_structure():
    """A TrainState (nnx.State of params, Adam moments, step count) as ShapeDtypeStructs:
    each moment is split like its parameter, the counts are replicated."""
    cfg = ModelConfig(vocab_size=32, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)
    tx = step.make_optimizer(configs.base_config('tiny').optimizer, cfg.emb_dim)
    abstract = jax.eval_shape(lambda: step.init_state(build_model('transformer', cfg), tx)[2])
    shardings = sharding.state_shardings(abstract, _two_devices(), 'fsdp')
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    assert shardings.step.spec == P()
    adam = shardings.opt_state[0]
    assert adam.count.spec == P()
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(shardings.params)
    assert any(s.spec != P() for s in jax.tree.leaves(shardings.params))


def test_unknown_sharding_mode_is_refused():
    tree = {'w': jax.ShapeDtypeStruct((4, 4), np.float32)}
    with pytest.raises(ConfigError, match=r"config.sharding='zero2'.*'replicated', 'fsdp'"):
        sharding.state_shardings(tree, sharding.make_mesh(), 'zero2')


def test_setup_reads_config_sharding_and_old_configs_stay_replicated():
    """setup lays the state out by config.sharding (replicated where a saved config has
    no such field: `configs.upgrade`), and its eval step takes the parameters so laid out."""
    mesh = sharding.make_mesh()
    config = toy.config(sharding='fsdp')
    cfg = ModelConfig(vocab_size=64, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)
    batches = [{k: v[:4] for k, v in _batches(1)[0].items()}]
    fsdp = step.setup(config, cfg, mesh)
    fsdp_loss = step.evaluate_loss(fsdp.evaluate, fsdp.state.params, batches, mesh)['loss']
    with config.unlocked():
        del config['sharding']  # a config saved before the field existed
    replicated = step.setup(configs.upgrade(config), cfg, mesh)
    assert len({x.sharding.spec for x in jax.tree.leaves(fsdp.state)}) > 1
    assert {x.sharding.spec for x in jax.tree.leaves(replicated.state)} == {P()}
    loss = step.evaluate_loss(replicated.evaluate, replicated.state.params, batches, mesh)['loss']
    assert fsdp_loss == pytest.approx(loss, rel=1e-6)


# ------------------------------------------------------------------------ 4 devices


@pytest.fixture(scope='module')
def four_devices(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}')
    result = subprocess.run(
        [sys.executable, '-m', 'tests.test_fsdp', str(tmp_path_factory.mktemp('fsdp'))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fsdp_losses_equal_replicated_with_dropout(four_devices):
    replicated, fsdp = four_devices['replicated'], four_devices['fsdp']
    assert four_devices['devices'] == DEVICES
    assert len(replicated['losses']) == STEPS
    np.testing.assert_allclose(fsdp['losses'], replicated['losses'], rtol=1e-5)
    assert replicated['split_params'] == 0
    assert fsdp['split_params'] > 0.9 * fsdp['params']  # all but few (none of 4 divides)


def test_fsdp_needs_less_memory_per_device(four_devices):
    """XLA's per-device estimate (arguments + outputs + temporaries - donated), as
    experiments/benchmark/speed.py reports it: the state, most of it, is a quarter."""
    replicated, fsdp = four_devices['replicated']['memory'], four_devices['fsdp']['memory']
    assert fsdp['argument'] < 0.3 * replicated['argument']
    assert fsdp['total'] < 0.8 * replicated['total']


def test_checkpoints_resume_in_the_other_layout(four_devices):
    """Saved at step 2 in one layout, restored onto the other's state (its shardings) and
    trained on: the losses of steps 3 and 4 of the uninterrupted run."""
    for mode in ('replicated', 'fsdp'):
        resumed = four_devices[mode]['resumed_from_other']
        np.testing.assert_allclose(
            resumed, four_devices[mode]['losses'][SAVE_AT:], rtol=1e-5, err_msg=mode
        )


def _batches(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {
            'inputs': rng.integers(4, 64, (8, 12)).astype(np.int32),
            'targets': rng.integers(4, 64, (8, 10)).astype(np.int32),
        }
        for _ in range(count)
    ]


def _memory(compiled) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    argument = analysis.argument_size_in_bytes
    total = (
        argument
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return {'argument': int(argument), 'total': int(total)}


def _measure(directory: str) -> dict:
    """Per layout: losses of STEPS steps (dropout on), compiled memory, how many parameter
    arrays are split, and the losses after resuming the other layout's step-2 checkpoint."""
    cfg, tx, mesh = multidevice_losses.tiny_setup(num_layers=1)
    batches = [sharding.global_batch(mesh, b) for b in _batches(STEPS)]
    rng = jax.random.key(0)
    out, runs = {'devices': jax.device_count()}, {}
    for mode in ('replicated', 'fsdp'):
        graphdef, rest, state = step.create_state('transformer', cfg, 0, tx, mesh, mode=mode)
        step_cfg = step.StepConfig('transformer', 0.1)
        train, _ = step.compile_steps(graphdef, rest, tx, step_cfg, mesh, mode=mode, state=state)
        compiled = train.lower(state, batches[0], rng).compile()
        ckpt = checkpoint.Checkpointer(os.path.join(directory, mode), keep=1, async_save=False)
        losses = []
        for i, batch in enumerate(batches):
            if i == SAVE_AT:
                ckpt.save(SAVE_AT, state)
            state, metrics = compiled(state, batch, rng)
            losses.append(float(metrics['loss']))
        ckpt.close()
        specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
        out[mode] = {
            'losses': losses,
            'memory': _memory(compiled),
            'params': len(specs),
            'split_params': sum(spec != P() for spec in specs),
        }
        runs[mode] = (compiled, state)
    for mode, other in (('replicated', 'fsdp'), ('fsdp', 'replicated')):
        compiled, state = runs[mode]
        ckpt = checkpoint.Checkpointer(os.path.join(directory, other), keep=1, async_save=False)
        state = ckpt.restore(state)  # onto this layout's shardings
        ckpt.close()
        losses = []
        for batch in batches[SAVE_AT:]:
            state, metrics = compiled(state, batch, rng)  # refuses other shardings
            losses.append(float(metrics['loss']))
        out[mode]['resumed_from_other'] = losses
    return out


if __name__ == '__main__':
    print(json.dumps(_measure(sys.argv[1])))  # noqa: T201 - read by the fixture
