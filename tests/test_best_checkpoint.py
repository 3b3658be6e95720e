"""The best checkpoint: kept beside the latest `keep_checkpoints`, ranked by the validation
perplexity saved with it, and read by `--step=best`."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from attn import rundir
from attn.training import checkpoint, loop
from attn.training import step as step_lib
from tests import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Validation NLLs of the evaluated steps, scripted: a toy run only gets better, and the best
# must be older than the latest kept for the test to mean anything.
NLLS = {2: 2.0, 4: 0.5, 6: 1.0, 8: 1.5}
RESUMED_NLLS = {10: 0.9, 12: 0.7}  # all worse than step 4's


def config(total_steps: int):
    """Saves every step, evaluates every other: most checkpoints carry no metrics."""
    return toy.config(
        total_steps=total_steps, checkpoint_every_steps=1, eval_every_steps=2, keep_checkpoints=2
    )


def train_scripted(config, workdir: str, data, nlls: dict[int, float]) -> None:
    """Trains with the validation NLLs of `nlls` reported at the evaluated steps, in order."""
    values = iter(nlls.values())

    def evaluate_loss(eval_step, params, batches, mesh):
        nll = next(values)
        return {'loss': nll, 'nll': nll, 'perplexity': math.exp(nll)}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_lib, 'evaluate_loss', evaluate_loss)
        loop.train_and_evaluate(config, workdir, data)
    assert next(values, None) is None  # every scripted evaluation ran


def logged_perplexities(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        rows = [json.loads(line) for line in f]
    return {row['step']: row['perplexity'] for row in rows if 'perplexity' in row}


def kept(workdir: str) -> tuple[list[int], int | None]:
    """(the steps on disk, the best of them) as a reading command sees them."""
    ckpt = rundir.open_checkpoints(workdir)
    try:
        return ckpt.all_steps(), ckpt.best_step()
    finally:
        ckpt.close()


@pytest.fixture(scope='module')
def best_run(tmp_path_factory):
    """(workdir, data) of an 8-step toy run whose best validation perplexity is at step 4."""
    directory = tmp_path_factory.mktemp('best_run')
    data = toy.data(directory / 'tokenizer')
    workdir = str(directory / 'workdir')
    train_scripted(config(8), workdir, data, NLLS)
    return workdir, data


def test_the_best_checkpoint_is_kept_beside_the_latest(best_run):
    workdir, _ = best_run
    logged = logged_perplexities(workdir)
    assert sorted(logged) == sorted(NLLS)
    best = min(logged, key=logged.get)
    steps, best_step = kept(workdir)
    assert best_step == best == 4
    # The latest 2 (7 was not evaluated: kept all the same, never ranked), and the best,
    # older than both; the other evaluated steps (2, 6) are gone like the unevaluated ones.
    assert steps == [4, 7, 8]
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))


def test_step_best_restores_the_best_checkpoint(best_run):
    workdir, _ = best_run
    run = rundir.load(workdir, step=rundir.BEST)
    assert run.steps == [4]
    saved = ocp.tree.to_flat_dict(toy.saved_params(workdir, 4)[1], sep='.')
    restored = ocp.tree.to_flat_dict(nnx.state(run.model, nnx.Param), sep='.')
    assert saved.keys() == restored.keys()
    for name, value in saved.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_averaging_uses_the_latest_checkpoints_not_the_best(best_run):
    workdir, _ = best_run
    assert rundir.load(workdir, average_last=2).steps == [7, 8]
    # Ending at the best: the kept checkpoints up to it, here the best alone, so 2 is refused.
    assert rundir.load(workdir, step=rundir.BEST).steps == [4]
    with pytest.raises(
        checkpoint.CheckpointError, match=r'kept ones up to it are \[4\]\. Average 1'
    ):
        rundir.load(workdir, step=rundir.BEST, average_last=2)


def test_a_resumed_run_keeps_the_best_from_before(best_run, tmp_path):
    source, data = best_run
    workdir = str(tmp_path / 'resumed')
    shutil.copytree(source, workdir)
    train_scripted(config(12), workdir, data, RESUMED_NLLS)
    assert kept(workdir) == ([4, 11, 12], 4)


def test_every_evaluated_step_is_saved_and_ranked(tmp_path):
    """Evaluated every 3 steps, saved every 4: steps 3 and 6 are saved all the same, with
    their metrics, so the best evaluation (step 3) is the one --step=best reads."""
    cadence = toy.config(total_steps=6, checkpoint_every_steps=4, eval_every_steps=3)
    workdir = str(tmp_path / 'workdir')
    train_scripted(cadence, workdir, toy.data(tmp_path / 'tokenizer'), {3: 0.5, 6: 1.0})
    assert kept(workdir) == ([3, 4, 6], 3)


def test_step_best_without_recorded_metrics_is_one_line_naming_the_fix(tmp_path):
    """A workdir whose checkpoints predate the metrics (saved without them, as before)."""
    ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints', keep=None, async_save=False)
    ckpt.save(3, {'step': jnp.asarray(3, jnp.int32)})
    ckpt.close()
    with pytest.raises(checkpoint.CheckpointError, match=r'has a validation perplexity'):
        rundir.load(str(tmp_path), step=rundir.BEST)
    result = subprocess.run(
        [sys.executable, '-m', 'attn.evaluate', f'--workdir={tmp_path}', '--step=best'],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: --step=best: no checkpoint in ')
    assert 'Give --step=N for one of [3], or leave --step out for the latest.' in last
