"""The reference-window study: its task generator, matched models and a tiny full run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attn import configs
from experiments.reference_window import study, task
from tests.toy import CONFIGS

TASK = dict(max_k=30, content_tokens=18)


@pytest.mark.parametrize('kind', task.KINDS)
@pytest.mark.parametrize('k', [1, 2, 7, 30])
def test_the_answer_is_exactly_k_back(kind, k):
    rows = task.make_examples(np.full(5, k), kind=kind, seed=k, **TASK)['targets']
    L = task.sequence_length(30)
    assert rows.shape == (5, L)
    np.testing.assert_array_equal(rows[:, -1], rows[:, L - 2 - k])
    content = rows[:, -1]
    assert content.min() >= task.FIRST_CONTENT and content.max() < task.FIRST_CONTENT + 18
    assert rows.max() < task.vocab_size(kind, 18, 30)
    if kind == 'marker':
        np.testing.assert_array_equal(rows[:, L - 2], task.QUERY)
        np.testing.assert_array_equal(rows[:, L - 2 - k - 1], task.MARKER)
        assert np.all((rows == task.MARKER).sum(1) == 1)
    else:  # the query names k, and is the only token outside the content range
        np.testing.assert_array_equal(rows[:, L - 2], task.FIRST_CONTENT + 18 + k - 1)
        assert np.all((rows >= task.FIRST_CONTENT + 18).sum(1) == 1)


def test_examples_are_reproducible_for_a_seed():
    first = task.training_examples(16, kind='offset', **TASK, seed=3)
    again = task.training_examples(16, kind='offset', **TASK, seed=3)
    other = task.training_examples(16, kind='offset', **TASK, seed=4)
    np.testing.assert_array_equal(first['targets'], again['targets'])
    np.testing.assert_array_equal(first['k'], again['k'])
    assert not np.array_equal(first['targets'], other['targets'])
    assert set(first['k']) <= set(task.evaluation_grid(30)) == {1, 2, 4, 8, 16, 30}


def test_distances_outside_the_row_are_refused():
    with pytest.raises(ValueError, match=r'distances must lie in \[1, 8\]'):
        task.make_examples([9], kind='offset', max_k=8, content_tokens=18, seed=0)


@pytest.mark.parametrize('arg', ['size=tiny', 'size=small', 'kind=marker'])
def test_recurrent_models_match_the_transformers_parameters(arg):
    config = configs.load(CONFIGS / 'reference_window.py', arg)
    counts = {name: study.build(name, config)[1]['params'] for name in config.models}
    for name in ('rnn', 'gru', 'lstm'):
        assert abs(counts[name] - counts['transformer']) <= 0.1 * counts['transformer'], counts


def test_a_tiny_study_writes_its_report_and_plot(tmp_path):
    config = configs.load(CONFIGS / 'reference_window.py', 'size=tiny')
    results = study.run_study(config, str(tmp_path))
    assert set(results) == {'transformer', 'rnn', 'gru', 'lstm'}
    assert {'report.md', 'accuracy.png', 'results.json'} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / 'results.json').read_text())
    for info in saved['models'].values():
        assert list(info['accuracy']) == ['1', '2', '4', '8']
        assert [step for step, _ in info['losses']] == [4]
    report = (tmp_path / 'report.md').read_text()
    assert all(f'| {name} |' in report for name in results)


class _Peek(nnx.Module):
    """Logits [B, T, V] on each row's token `shift` places after the one to predict: 0 reads
    every answer, 1 ... 1 repeats the token before it (the last row's query)."""

    def __init__(self, vocab_size: int, shift: int):
        self.vocab_size, self.shift = vocab_size, shift

    def __call__(self, tokens):
        return jax.nn.one_hot(jnp.roll(tokens, self.shift, axis=1), self.vocab_size)


@pytest.mark.parametrize('kind', task.KINDS)
def test_accuracy_is_the_share_of_answers_predicted(kind):
    config = configs.load(CONFIGS / 'reference_window.py', f'size=tiny,kind={kind}')
    vocab = study.model_config(config).vocab_size
    grid = task.evaluation_grid(config.task.max_k)
    assert study.accuracy_by_distance(_Peek(vocab, 0), config) == {k: 1.0 for k in grid}
    assert study.accuracy_by_distance(_Peek(vocab, 1), config) == {k: 0.0 for k in grid}


def test_the_study_trains_on_the_answers_loss_alone():
    """`attn.training.step` trains the study's models on the answer alone: the loss it reports for
    the first batch is the initial model's cross entropy of each row's last token (the
    GRU's: the batch's weights, not the model, make it so)."""
    config = configs.load(CONFIGS / 'reference_window.py', 'size=tiny')
    config.steps = 1
    model, _ = study.build('gru', config)
    rows = task.training_examples(config.batch_size, seed=config.seed + 1, **config.task)
    targets = rows['targets']
    logits = model(targets)[:, -1]  # [B, V]
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets[:, -1]).mean()
    _, info = study.train(model, config)
    assert info['losses'] == [(1, pytest.approx(float(expected), rel=1e-5))]
