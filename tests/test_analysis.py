"""Attention analysis on a toy run: files, probabilities, head masking and importance."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from attn import rundir
from attn.analysis import heads, report
from attn.model.tokens import EOS_ID, PAD_ID


@pytest.fixture
def trained(toy_run):
    return toy_run


def test_analyze_writes_pictures_and_statistics(trained, tmp_path):
    workdir, data = trained
    summary = report.analyze(workdir, str(tmp_path), sentences=4, prune_steps=4, data=data)
    assert summary['heads'] == 2 * 4 * 3  # 2 layers x 4 heads x (enc self, dec self, cross)
    names = set(os.listdir(tmp_path))
    assert {'heads.json', 'pruning.json', 'pruning.png', 'bertviz.json'} <= names
    assert 'attention-0-cross_attention.png' in names
    heads = json.loads((tmp_path / 'heads.json').read_text())
    assert set(heads) == {
        f'{side}.{layer}.{kind}'
        for layer in (0, 1)
        for side, kind in (
            ('encoder', 'self_attention'),
            ('decoder', 'self_attention'),
            ('decoder', 'cross_attention'),
        )
    }
    assert all(len(rows) == 4 for rows in heads.values())
    curve = json.loads((tmp_path / 'pruning.json').read_text())
    assert curve[0]['masked'] == 0 and curve[-1]['masked'] == 24
    bertviz = json.loads((tmp_path / 'bertviz.json').read_text())
    layer0 = np.array(bertviz['attention']['cross_attention'][0])  # [1, heads, query, key]
    assert layer0.shape[:2] == (1, 4)
    assert layer0.shape[2:] == (
        len(bertviz['tokens']['cross_attention']['query']),
        len(bertviz['tokens']['cross_attention']['key']),
    )


def test_head_statistics_by_hand():
    """3 heads, keys [a, b, c, EOS], queries [a, b, PAD]: uniform (entropy ln 4); one-hot two
    keys ahead (the second query's is EOS, left out of confidence); one-hot on the first key.
    The PAD query's row would change every mean."""
    query, key = np.array([[5, 6, PAD_ID]]), np.array([[5, 6, 7, EOS_ID]])
    weights = np.zeros((1, 3, 3, 4))
    weights[0, 0] = 0.25
    weights[0, 1, [0, 1], [2, 3]] = 1.0
    weights[0, 2, :, 0] = 1.0
    weights[0, 1:, 2] = np.array([0.0, 0.0, 0.0, 1.0])  # the PAD query's
    stats = heads.head_statistics(weights, query, key)
    assert stats == [
        {'entropy': pytest.approx(np.log(4)), 'confidence': 0.25, 'mean_distance': 1.25},
        {'entropy': 0.0, 'confidence': 0.5, 'mean_distance': 2.0},
        {'entropy': 0.0, 'confidence': 1.0, 'mean_distance': 0.5},
    ]


def test_attention_rows_sum_to_one_and_masking_a_head_matters(trained):
    workdir, data = trained
    run = rundir.load(workdir)
    batch = report.sentence_batch(data, run.config, 'validation', 4)
    maps = heads.attention_maps(run.model, batch, 'transformer')
    valid = batch['targets_segmentation'] > 0
    for name, weights in maps.items():
        if name.startswith('decoder'):
            np.testing.assert_allclose(weights.sum(-1)[:, 0][valid], 1.0, atol=1e-5)
    before = float(heads.mean_loss(run.model, batch, 'transformer'))
    assert float(heads.mean_loss(run.model, batch, 'transformer')) == before  # reproducible
    mask = run.model.decoder.layers[1].cross_attention.head_mask
    mask[...] = jnp.array([0.0, 1.0, 1.0, 1.0])
    assert float(heads.mean_loss(run.model, batch, 'transformer')) != before
    mask[...] = jnp.ones(4)
    assert float(heads.mean_loss(run.model, batch, 'transformer')) == before


def test_pruning_restores_the_masks_and_starts_unmasked(trained):
    workdir, data = trained
    run = rundir.load(workdir)
    batch = report.sentence_batch(data, run.config, 'validation', 4)
    importance = heads.head_importance(run.model, batch, 'transformer')
    assert all(v.shape == (4,) and (v >= 0).all() for v in importance.values())
    curve = heads.pruning_curve(run.model, batch, 'transformer', importance, 3)
    plain = float(np.exp(heads.mean_loss(run.model, batch, 'transformer')))
    assert curve[0] == (0, pytest.approx(plain, rel=1e-5))
    assert all(float(v.min()) == 1.0 for v in heads._mask_variables(run.model).values())  # noqa: SLF001


def test_heads_over_training_follow_every_kept_checkpoint(tmp_path):
    """A 6-step toy run keeping checkpoints 2, 4 and 6: every head has a curve of 3 points,
    and the point at step 4 is what `attn.analyze` of checkpoint 4 writes in heads.json."""
    from attn.analysis import training
    from attn.training import loop
    from tests import toy

    data = toy.data(tmp_path / 'tokenizer')
    workdir = str(tmp_path / 'run')
    config = toy.config(checkpoint_every_steps=2, eval_every_steps=2, keep_checkpoints=None)
    loop.train_and_evaluate(config, workdir, data)
    out = tmp_path / 'over'
    summary = training.over_training(workdir, str(out), sentences=4, data=data)
    assert summary['steps'] == [2, 4, 6] and summary['sentences'] == 4
    assert sorted(os.listdir(out)) == [
        'heads_over_training-cross_attention.png',
        'heads_over_training-decoder_self_attention.png',
        'heads_over_training-encoder_self_attention.png',
        'heads_over_training.json',
    ]
    curves = json.loads((out / 'heads_over_training.json').read_text())
    at_4 = tmp_path / 'at4'
    report.analyze(workdir, str(at_4), sentences=4, prune_steps=1, data=data, step=4)
    table = json.loads((at_4 / 'heads.json').read_text())
    assert set(curves) == set(table) and len(curves) == 2 * 3
    for module, rows in table.items():
        for head, row in zip(curves[module], rows, strict=True):
            assert head['steps'] == [2, 4, 6]
            for metric in training.METRICS:
                assert head[metric][1] == pytest.approx(row[metric], rel=1e-6), (module, metric)
    # The heads change as training goes on (the curves are not one checkpoint thrice).
    importance = [h['importance'] for rows in curves.values() for h in rows]
    assert any(len(set(values)) == 3 for values in importance)
