"""attn.evaluate and attn.translate on a toy run: reports, files, and awkward input."""

import json
import os

import numpy as np
import pytest

from attn import rundir
from attn.data import datasets
from attn.errors import UserError
from attn.inference import evaluation, text
from tests import toy


@pytest.fixture
def trained(toy_run):
    return toy_run


def test_evaluate_scores_the_averaged_models_translations_against_the_target_side(trained):
    """References that are the averaged model's own beam-2 translations score BLEU 100
    (sacreBLEU and paper-style): so evaluate decodes with that model and beam, in order,
    against the target side; and its speed is those translations' tokens over its time."""
    workdir, data = trained
    run = rundir.load(workdir, average_last=2)
    alpha = run.config.decode.alpha
    test = data.splits['test']
    hypotheses, generated, _ = evaluation.translate_split(
        run.model, run.config, data, 'test', beam_size=2, alpha=alpha, mesh=run.mesh
    )
    # Each example's German side replaced by its translation.
    oracle = [{'en': x['en'], 'de': h.encode()} for x, h in zip(test, hypotheses, strict=True)]
    oracle_data = datasets.Data(data.tokenizer, data.features, {'test': oracle})
    report = evaluation.evaluate(
        workdir, split='test', average_last=2, beam_size=2, data=oracle_data
    )
    assert report['examples'] == 24 and report['checkpoint_steps'] == [3, 6]
    assert report['sacrebleu']['bleu'] == pytest.approx(100.0)
    assert 'tok:13a' in report['sacrebleu']['signature']
    assert report['paper_bleu']['bleu'] == pytest.approx(100.0)
    assert [s['translation'] for s in report['samples']] == hypotheses[:5]
    assert report['perplexity'] == pytest.approx(np.exp(report['nll']))
    speed = report['decode']
    assert speed['beam_size'] == 2 and speed['alpha'] == alpha
    assert 0 <= speed['compile_seconds'] <= report['compile_seconds'] <= report['seconds']
    # seconds is rounded to 0.01 s: the rates agree to that rounding
    rel = 0.006 / speed['seconds'] + 1e-3
    assert speed['target_tokens_per_s'] == pytest.approx(generated / speed['seconds'], rel=rel)
    assert speed['sentences_per_s'] == pytest.approx(24 / speed['seconds'], rel=rel)
    name = f'test-6-avg2-beam2-alpha{alpha:g}'
    with open(os.path.join(workdir, 'eval', f'{name}.json')) as f:
        assert json.load(f)['sacrebleu'] == report['sacrebleu']
    # Another search is another report: the beam-2 one stays as it was.
    greedy = evaluation.evaluate(
        workdir, split='test', average_last=2, beam_size=1, data=oracle_data
    )
    with open(os.path.join(workdir, 'eval', f'test-6-avg2-beam1-alpha{alpha:g}.json')) as f:
        assert json.load(f)['sacrebleu'] == greedy['sacrebleu']
    with open(os.path.join(workdir, 'eval', f'{name}.json')) as f:
        assert json.load(f)['sacrebleu'] == report['sacrebleu']


def test_every_example_is_translated_in_order(trained):
    """evaluate batches the split by source length, translate its lines within windows:
    each gives every sentence its own translation, in order, the same both ways (the lines
    fed in another order, in batches of 5 over windows of 80)."""
    workdir, data = trained
    run = rundir.load(workdir)
    hypotheses, generated, _ = evaluation.translate_split(
        run.model, run.config, data, 'test', beam_size=2, alpha=0.6, mesh=run.mesh
    )
    assert len(hypotheses) == len(data.splits['test']) and generated >= len(hypotheses)
    sources = [example['en'].decode() for example in data.splits['test']]
    shuffled = np.random.default_rng(0).permutation(len(sources))
    translations = text.translate_lines(
        run,
        data.tokenizer,
        [sources[i] for i in shuffled],
        batch_size=5,
        beam_size=2,
        alpha=0.6,
        max_input_tokens=64,
    )
    assert list(translations) == [hypotheses[i] for i in shuffled]


def test_translate_keeps_empty_lines_and_cuts_long_ones(trained, caplog):
    workdir, data = trained
    run = rundir.load(workdir)
    lines = ['the cat sees the dog', '', '   ', ' '.join(['the red house'] * 40)]
    out = list(
        text.translate_lines(
            run, data.tokenizer, lines, batch_size=4, beam_size=2, alpha=0.6, max_input_tokens=16
        )
    )
    assert len(out) == 4 and out[1] == '' and out[2] == ''
    # one batch of 4: the warning counts the empty lines before the long one
    assert 'Line 4 has' in caplog.text and '--max_input_tokens' in caplog.text
    assert 'Line 2 has' not in caplog.text
    cut = text.pad_rows(text.encode_lines([lines[3]], data.tokenizer, 16, [4]))
    assert cut.shape == (1, 16) and cut[0, -1] == 3  # EOS kept at the cut


def test_invalid_utf8_names_the_line():
    lines = text.read_lines([b'fine\n', b'also fine\r\n', b'bad \xff byte\n'])
    assert next(lines) == 'fine' and next(lines) == 'also fine'
    with pytest.raises(UserError, match='Input line 3 is not valid UTF-8'):
        next(lines)


def test_language_model_prompts_are_continued(tmp_path):
    from flax import nnx

    from attn import configs
    from attn.model import LanguageModel

    config = toy.config()
    config.model_kind = 'lm'
    data = toy.data(tmp_path)
    model = LanguageModel(configs.model_config(config), rngs=nnx.Rngs(0))
    run = rundir.Run(config=config, model=model, steps=[0])
    prompts = ['the cat', 'a big red dog sees']

    def sampled(seed):
        return text.continue_prompts(
            run,
            data.tokenizer,
            prompts,
            max_new_tokens=6,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            seed=seed,
        )

    first = sampled(0)
    assert [out.startswith(p) for out, p in zip(first, prompts, strict=True)] == [True, True]
    assert sampled(0) == first


def test_a_continuation_keeps_the_space_after_the_prompt(tmp_path, monkeypatch):
    """The sampler's tokens are scripted: the prompt's, then the pieces of ' sat down'
    (a word boundary first), which SentencePiece alone decodes without it."""
    from attn import decoding

    tokenizer = toy.data(tmp_path).tokenizer
    prompt, continuation = tokenizer.encode('the cat')[:-1], tokenizer.encode('sat down')
    assert tokenizer.decode(continuation) == 'sat down'  # the boundary is dropped alone
    row = np.array([prompt + continuation + [0] * 4], np.int32)
    monkeypatch.setattr(decoding, 'sample', lambda *args, **kwargs: row)
    config = toy.config()
    config.model_kind = 'lm'
    run = rundir.Run(config=config, model=None, steps=[0])
    out = text.continue_prompts(run, tokenizer, ['the cat'], max_new_tokens=6)
    assert out == ['the cat sat down']


def test_nbest_lists_start_with_the_one_best_and_fall(trained):
    """evaluate --nbest=3 writes every example's 3 best hypotheses, the first being the
    reported translation; translate --nbest=2 gives one JSON object per line, empty lines
    included; a list longer than the beam is refused before any work."""
    workdir, data = trained
    report = evaluation.evaluate(workdir, split='test', beam_size=3, nbest=3, data=data)
    with open(os.path.join(workdir, report['nbest']['file']), encoding='utf-8') as f:
        lists = [json.loads(line) for line in f]
    run = rundir.load(workdir)
    best, _, _ = evaluation.translate_split(
        run.model, run.config, data, 'test', beam_size=3, alpha=0.6, mesh=run.mesh
    )
    assert [x['index'] for x in lists] == list(range(len(data.splits['test'])))
    assert [x['nbest'][0]['translation'] for x in lists] == best
    for entry in lists:
        scores = [h['score'] for h in entry['nbest']]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(h['logprob'] <= h['score'] <= 0 for h in entry['nbest'])  # lp(Y) >= 1
    lines = [data.splits['test'][0]['en'].decode(), '']
    settings = {'batch_size': 4, 'beam_size': 3, 'alpha': 0.6, 'max_input_tokens': 64}
    out = [
        json.loads(x) for x in text.translate_lines(run, data.tokenizer, lines, nbest=2, **settings)
    ]
    assert [x['source'] for x in out] == lines and out[1]['nbest'] == []
    assert out[0]['nbest'][0]['translation'] == best[0] and len(out[0]['nbest']) == 2
    with pytest.raises(UserError, match='--beam_size >= 5'):
        evaluation.evaluate(workdir, split='test', beam_size=4, nbest=5, data=data)


def test_attention_statistics_go_beside_the_report(trained):
    """--attention_stats: per decoder layer and head, the mean entropy and peak weight over
    every translated position, in <name>.attention.json; the BLEU is the same as without."""
    workdir, data = trained
    plain = evaluation.evaluate(workdir, split='test', data=data, beam_size=2)
    report = evaluation.evaluate(
        workdir, split='test', data=data, beam_size=2, attention_stats=True
    )
    assert report['sacrebleu'] == plain['sacrebleu']
    with open(os.path.join(workdir, report['attention']['file'])) as f:
        stats = json.load(f)
    run = rundir.load(workdir)
    assert len(stats['layers']) == run.config.model.num_layers
    assert all(len(layer) == run.config.model.num_heads for layer in stats['layers'])
    assert stats['tokens'] >= len(data.splits['test'])
    for head in (h for layer in stats['layers'] for h in layer):
        assert 0 <= head['entropy'] <= np.log(64) and 0 < head['peak_weight'] <= 1
