"""attn.score on the toy run: forced decoding agrees with greedy search's own step
log-probabilities and with the evaluation loss, whatever the batch; the command's output
and its refusals."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from attn import decoding, rundir
from attn.data import datasets
from attn.errors import UserError
from attn.inference import evaluation, scoring, text
from attn.model import shift_right
from attn.model.tokens import BOS_ID, PAD_ID
from tests import toy

# Per-token log-probs are float32 values of magnitude <~ 10 computed in a different order
# (incremental cache vs full forward, other padded widths): eps_32 * 10 * a few dozen
# accumulated ops is ~1e-5. Sums over a sentence add up to ~60 such errors. (Measured on
# the toy run: 1.7e-6 per token, 1.5e-5 per sum.)
TOKEN_TOL = 2e-5
SUM_TOL = 1e-3


@pytest.fixture(scope='module')
def trained(toy_run):
    workdir, data = toy_run
    return rundir.load(workdir), data


def _given(data, examples) -> datasets.Data:
    return datasets.Data(data.tokenizer, data.features, {scoring.GIVEN: examples})


def test_the_score_of_greedy_output_is_the_sum_of_its_step_logprobs(trained):
    """Greedy search's step log-probs (its own cached step function, fed its own output:
    `decoding.forced_decode`, whose argmax over the tokens it may produce is checked to be
    the greedy choice) sum to the score of that output."""
    run, data = trained
    lines = [datasets.text(x['en']) for x in data.splits['test'][:4]]
    inputs = text.pad_rows(text.encode_lines(lines, data.tokenizer, 64, [1, 2, 3, 4]))  # [4, S]
    greedy = np.asarray(decoding.greedy_search(run.model, inputs, max_extra_length=5))  # [4, L]
    steps = np.asarray(decoding.forced_decode(run.model, inputs, shift_right(greedy)))  # [4, L, V]
    real = greedy != PAD_ID  # [4, L]
    choosable = steps.copy()
    choosable[..., [PAD_ID, BOS_ID]] = -np.inf  # greedy search never produces these
    np.testing.assert_array_equal(np.where(real, choosable.argmax(-1), PAD_ID), greedy)
    step_logprobs = np.take_along_axis(jax.nn.log_softmax(steps), greedy[..., None], -1)[..., 0]
    want = (np.asarray(step_logprobs) * real).sum(axis=1)  # [4]
    got = scoring.batch_logprobs(run, {'inputs': inputs, 'targets': greedy})  # [4, L]
    np.testing.assert_allclose(got.sum(axis=1), want, atol=SUM_TOL)
    np.testing.assert_allclose(got, np.asarray(step_logprobs) * real, atol=TOKEN_TOL)
    assert (got[~real] == 0).all() and (got[real] < 0).all()


def test_scores_do_not_depend_on_the_batch_or_its_padding(trained):
    """Each sentence scored alone equals it scored among longer ones (wider padding, other
    rows), token by token."""
    run, data = trained
    test = sorted(data.splits['test'], key=lambda x: len(x['de']))
    short, long = test[:3], test[-5:]
    together = {
        r['target']: r for r in scoring.score_split(run, _given(data, long + short), 'given')
    }
    for example in short:
        [alone] = scoring.score_split(run, _given(data, [example]), scoring.GIVEN)
        other = together[alone['target']]
        assert alone['tokens'] == other['tokens'] and alone['tokens'][-1] == '</s>'
        np.testing.assert_allclose(alone['token_logprobs'], other['token_logprobs'], atol=TOKEN_TOL)
        assert alone['logprob'] == pytest.approx(sum(alone['token_logprobs']))
        assert alone['num_tokens'] == len(alone['tokens']) == len(alone['token_logprobs'])


def test_the_mean_token_logprob_of_a_split_is_minus_the_evaluation_nll(trained):
    run, data = trained
    records = list(scoring.score_split(run, data, 'test'))
    assert [r['index'] for r in records] == list(range(len(data.splits['test'])))
    assert records[0]['source'] == datasets.text(data.splits['test'][0]['en'])
    tokens = sum(r['num_tokens'] for r in records)
    mean_nll = -sum(r['logprob'] for r in records) / tokens
    assert mean_nll == pytest.approx(evaluation.perplexity(run, data, 'test')['nll'], rel=1e-5)


def _cli(workdir: str, *flags: str) -> subprocess.CompletedProcess:
    """`python -m attn.score --workdir=W FLAGS` with the toy data in place of TFDS."""
    tokenizer_dir = pathlib.Path(workdir).parent / 'tokenizer'
    program = (
        'import sys; from attn import score; from attn.data import datasets; '
        'from tests import toy; '
        f'datasets.load = lambda config, splits=None: toy.data({str(tokenizer_dir)!r}); '
        f'sys.argv = ["attn score", "--workdir={workdir}", *{list(flags)!r}]; score.run()'
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    return subprocess.run(
        [sys.executable, '-c', program], cwd=root, capture_output=True, text=True, timeout=300
    )


def test_the_command_writes_json_lines_and_refuses_mismatched_files(toy_run, trained, tmp_path):
    workdir, data = toy_run
    test = data.splits['test'][:3]
    source, target, out = tmp_path / 'en.txt', tmp_path / 'de.txt', tmp_path / 'scores.jsonl'
    source.write_text(''.join(datasets.text(x['en']) + '\n' for x in test))
    target.write_text(''.join(datasets.text(x['de']) + '\n' for x in test))
    done = _cli(workdir, f'--source={source}', f'--target={target}', f'--out={out}')
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    want = list(scoring.score_split(trained[0], data, 'test'))[:3]
    assert [line['index'] for line in lines] == [0, 1, 2]
    for line, expected in zip(lines, want, strict=True):
        assert set(line) == {'index', 'source', 'target', 'tokens', 'token_logprobs', 'logprob',
                             'num_tokens'}  # fmt: skip
        assert (line['source'], line['target']) == (expected['source'], expected['target'])
        assert line['logprob'] == pytest.approx(expected['logprob'], abs=SUM_TOL)

    target.write_text(target.read_text() + 'ein hund\n')
    refused = _cli(workdir, f'--source={source}', f'--target={target}')
    assert refused.returncode == 2 and refused.stdout == ''
    [error] = [line for line in refused.stderr.splitlines() if line.startswith('error:')]
    assert 'Traceback' not in refused.stderr
    assert f'--source={source} has 3 lines but --target={target} has 4' in error


def test_bad_file_arguments_are_one_line_user_errors(tmp_path):
    pair, lm = ('en', 'de'), ('de',)
    text = tmp_path / 'text.txt'
    text.write_text('ein hund\n')
    with pytest.raises(UserError, match='needs --source'):
        scoring.given_examples(pair, None, str(text))
    with pytest.raises(UserError, match='language model'):
        scoring.given_examples(lm, str(text), str(text))
    with pytest.raises(UserError, match=f'Cannot read {tmp_path}/missing.txt'):
        scoring.given_examples(pair, str(tmp_path / 'missing.txt'), str(text))
    with pytest.raises(UserError, match='not both'):
        scoring.open_data(str(tmp_path), None, 'test', None, str(text))
    assert scoring.given_examples(lm, None, str(text)) == [{'de': 'ein hund'}]


def test_a_language_model_scores_text_by_its_evaluation_loss(trained):
    """An (untrained) language model's scores of text: token by token those of its cached
    step function, and on average the evaluation nll."""
    from flax import nnx

    from attn import configs
    from attn.model import LanguageModel
    from attn.training import sharding

    _, data = trained
    config = toy.config(model_kind='lm')
    model = LanguageModel(configs.model_config(config), rngs=nnx.Rngs(0))
    run = rundir.Run(config=config, model=model, steps=[0], mesh=sharding.make_mesh())
    examples = [{'de': datasets.text(x['de'])} for x in data.splits['test'][:4]]
    lm_data = datasets.Data(data.tokenizer, ('de',), {scoring.GIVEN: examples})
    records = list(scoring.score_split(run, lm_data, scoring.GIVEN))
    assert 'source' not in records[0] and records[0]['target'] == examples[0]['de']
    ids = [data.tokenizer.encode(x['de']) for x in examples]
    width = max(len(row) for row in ids)
    targets = np.array([row + [PAD_ID] * (width - len(row)) for row in ids])  # [4, T]
    steps = np.asarray(decoding.forced_decode(model, None, shift_right(targets)))  # [4, T, V]
    want = np.take_along_axis(jax.nn.log_softmax(steps), targets[..., None], -1)[..., 0]
    for row, record in zip(want, records, strict=True):  # causal: padding after changes nothing
        np.testing.assert_allclose(
            record['token_logprobs'], row[: record['num_tokens']], atol=TOKEN_TOL
        )
    mean_nll = -sum(r['logprob'] for r in records) / sum(r['num_tokens'] for r in records)
    nll = evaluation.perplexity(run, lm_data, scoring.GIVEN)['nll']
    assert mean_nll == pytest.approx(nll, rel=1e-5)
