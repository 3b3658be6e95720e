"""Restoring a trained model from its workdir, averaging checkpoints, clear errors."""

import grain
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from attn import rundir
from attn.model import build_model
from attn.model.config import ModelConfig
from attn.training import checkpoint, step
from tests import toy


@pytest.fixture
def trained(toy_run):
    return toy_run[0]


def by_name(tree) -> dict[str, np.ndarray]:
    """{'encoder.layers.0.....value': leaf}, the names Orbax saves leaves under."""
    return ocp.tree.to_flat_dict(tree, sep='.')


def saved_params(workdir, step) -> dict[str, np.ndarray]:
    return by_name(toy.saved_params(workdir, step)[1])


def model_params(model) -> dict[str, np.ndarray]:
    return by_name(nnx.state(model, nnx.Param))


def test_restore_gives_the_saved_parameters(trained):
    run = rundir.load(trained)
    assert run.steps == [6] and run.config.model.emb_dim == 32
    saved, restored = saved_params(trained, 6), model_params(run.model)
    assert saved.keys() == restored.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_averaging_two_checkpoints_gives_their_mean(trained):
    run = rundir.load(trained, average_last=2)
    assert run.steps == [3, 6]
    first, last, averaged = (
        saved_params(trained, 3),
        saved_params(trained, 6),
        model_params(run.model),
    )
    for name in first:
        np.testing.assert_allclose(
            averaged[name], (first[name] + last[name]) / 2, rtol=1e-6, atol=1e-7
        )
    assert any(not np.array_equal(first[n], last[n]) for n in first)  # the mean is not trivial


def test_restore_errors_name_the_fix(tmp_path, trained):
    with pytest.raises(checkpoint.CheckpointError, match='train first'):
        rundir.load(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match=r'there are \[3, 6\]'):
        rundir.load(trained, step=4)


def test_averaging_holds_the_running_sum_and_one_checkpoint_at_a_time():
    """Each restored parameter set is dropped before the next is read: never more than the
    sum and one set alive, whatever the number averaged."""
    import weakref

    alive = []

    def restore_one(step):  # the trees hold no cycles: refcounting frees them at once
        held = [ref for ref in alive if ref() is not None]
        assert len(held) <= 1, f'{len(held)} earlier parameter sets still held at step {step}'
        tree = {'w': np.full((4, 4), float(step)), 'b': np.full((4,), 2.0 * step)}
        alive.append(weakref.ref(tree['w']))
        return tree

    mean = rundir.running_mean(restore_one, [1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(mean['w'], np.full((4, 4), 4.5))
    np.testing.assert_array_equal(mean['b'], np.full((4,), 9.0))


def test_reading_a_mistyped_workdir_creates_nothing(tmp_path):
    missing = tmp_path / 'no-such-run'
    with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
        rundir.load(str(missing))
    assert not missing.exists()
    with pytest.raises(checkpoint.CheckpointError, match='average_last=0'):
        rundir.select_steps([3, 6], None, 0)


def _save_as_before(directory, state, data_iterator, config: dict) -> None:
    """Step 3 saved with the Orbax arguments checkpoints were written with before
    `preservation_policy` and `handler_registry` (`max_to_keep`, `item_handlers`)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=5, enable_async_checkpointing=False)
    handlers = {
        'state': ocp.PyTreeCheckpointHandler(),
        'data': grain.checkpoint.CheckpointHandler(),
        'config': ocp.JsonCheckpointHandler(),
    }
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    items = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config),
    )
    manager.save(3, args=items, force=True)
    manager.close()


def test_checkpoints_written_before_the_handler_registry_restore(tmp_path):
    cfg = ModelConfig(vocab_size=32, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)
    _, _, state = step.init_state(build_model('transformer', cfg), optax.adam(1e-3))
    state = state.replace(step=state.step + 3)
    examples = grain.MapDataset.range(10).to_iter_dataset()
    data = iter(examples)
    assert [next(data) for _ in range(3)] == [0, 1, 2]
    _save_as_before(tmp_path, state, data, {'seed': 7})

    ckpt = checkpoint.Checkpointer(tmp_path, keep=5)
    fresh = iter(examples)
    zeros = jax.tree.map(jax.numpy.zeros_like, state)
    restored = ckpt.restore(zeros, fresh)
    assert next(fresh) == 3  # the iterator continues where it was saved
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(got, want)
    assert ckpt.restore_config(3) == {'seed': 7}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = ckpt.restore_params(3, lambda tree: jax.tree.map(lambda _: device, tree))
    saved, got = by_name(state.params), by_name(params)
    assert got.keys() == saved.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    ckpt.close()
