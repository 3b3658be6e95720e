"""Restoring a trained model from its workdir, averaging checkpoints, clear errors."""

import numpy as np
import pytest
from flax import nnx

from attn import checkpoint, restore


@pytest.fixture
def trained(toy_run):
    return toy_run[0]


def saved_params(workdir, step) -> dict[str, np.ndarray]:
    ckpt = checkpoint.Checkpointer(f'{workdir}/checkpoints', keep=None)
    return checkpoint.leaves_by_name(ckpt.restore_arrays(step)['params'])


def model_params(model) -> dict[str, np.ndarray]:
    return checkpoint.leaves_by_name(nnx.state(model, nnx.Param))


def test_restore_gives_the_saved_parameters(trained):
    run = restore.load(trained)
    assert run.steps == [6] and run.config.model.emb_dim == 32
    saved, restored = saved_params(trained, 6), model_params(run.model)
    assert saved.keys() == restored.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_averaging_two_checkpoints_gives_their_mean(trained):
    run = restore.load(trained, average_last=2)
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
        restore.load(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match=r'there are \[3, 6\]'):
        restore.load(trained, step=4)
