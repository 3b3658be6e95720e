"""attn.export: the MarianMT and CTranslate2 exports compute and search as attn does."""

import functools
import os

import numpy as np
import pytest

os.environ['HF_HUB_OFFLINE'] = '1'  # read when huggingface_hub is imported: never the hub
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
ctranslate2 = pytest.importorskip('ctranslate2')
pytest.importorskip('safetensors')
torch.set_num_threads(1)  # a tiny model: threads only contend with the session's JAX

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from attn import configs, export, rundir  # noqa: E402
from attn.inference import batching  # noqa: E402
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID  # noqa: E402

SENTENCES = 16  # of the toy test split
EXTRA = 8  # decode.max_extra_length here: the toy model's outputs often run to the limit


@pytest.fixture(scope='module')
def exported(toy_run, tmp_path_factory):
    """(run, data, hf directory, ct2 directory) of the toy run exported as both."""
    workdir, data = toy_run
    run = rundir.load(workdir)
    out = str(tmp_path_factory.mktemp('export') / 'toy')
    hf, ct2 = export.export(run, data.tokenizer, out, workdir=workdir, format='both')
    return run, data, hf, ct2


@pytest.fixture(scope='module')
def marian(exported):
    """transformers' MarianMTModel loaded from the export, offline."""
    return transformers.MarianMTModel.from_pretrained(exported[2], local_files_only=True).eval()


def _sources(data, split='test') -> list[list[int]]:
    source = data.features[0]
    return [data.tokenizer.encode(example[source]) for example in data.splits[split]]


def _padded(rows: list[list[int]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + [PAD_ID] * (width - len(r)) for r in rows], np.int64)


def _until_eos(row) -> list[int]:
    row = [int(t) for t in row]
    return row[: row.index(EOS_ID) + 1] if EOS_ID in row else [t for t in row if t != PAD_ID]


def _attn_search(run, rows, beam_size, alpha):
    out = batching.translate(
        run.model, _padded(rows), beam_size=beam_size, alpha=alpha, max_extra_length=EXTRA
    )
    return [_until_eos(r) for r in out]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs, targets):
    return nnx.merge(graphdef, state)(inputs, targets)


def _attn_logits(run, inputs, targets, width=48):
    """attn's teacher-forced logits [B, T, V] (padded to `width`: one compile)."""
    B, S = inputs.shape
    T = targets.shape[1]
    inputs = np.pad(inputs, ((0, 0), (0, width - S))).astype(np.int32)
    targets = np.pad(targets, ((0, 0), (0, width - T))).astype(np.int32)
    return np.asarray(_forward(*nnx.split(run.model), inputs, targets))[:, :T]


def _attn_scores(run, rows, hypotheses):
    """Sum of attn's log-probs of each hypothesis (alpha=0: the beam search's score)."""
    targets = _padded(hypotheses)
    logits = _attn_logits(run, _padded(rows), targets)
    logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    picked = np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return (picked * (targets != PAD_ID)).sum(axis=1)


def _check_search(run, rows, found, beam_size):
    """Greedy: `found` is attn's. Beam: each sentence is attn's, or attn's hypothesis
    scores higher: Marian's generate and CTranslate2 only finish an EOS candidate ranked in
    the top K of the 2K, attn every one (README: Export), so their beams lost it."""
    expected = _attn_search(run, rows, beam_size, 0.0)
    if beam_size == 1:
        assert found == expected
        return
    differ = [i for i, (a, b) in enumerate(zip(expected, found, strict=True)) if a != b]
    assert len(differ) <= len(rows) * 3 // 4, differ  # the toy model's EOS at step 0
    if not differ:
        return
    better = _attn_scores(run, [rows[i] for i in differ], [expected[i] for i in differ])
    theirs = _attn_scores(run, [rows[i] for i in differ], [found[i] for i in differ])
    assert (better > theirs + 1e-4).all(), (differ, better, theirs)


def _by_length(rows):
    """Indices of `rows` grouped by length: one length limit per group, as attn's."""
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault(len(row), []).append(i)
    return groups.items()


def _hf_search(model, rows, beam_size, alpha):
    out = [None] * len(rows)
    for length, indices in _by_length(rows):
        inputs = torch.tensor([rows[i] for i in indices])
        tokens = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            num_beams=beam_size,
            length_penalty=alpha,
            max_new_tokens=length + EXTRA,
            do_sample=False,
        )
        for i, row in zip(indices, tokens.numpy(), strict=True):
            assert row[0] == BOS_ID
            out[i] = _until_eos(row[1:])
    return out


def _ct2_search(translator, pieces, rows, beam_size, alpha):
    out = [None] * len(rows)
    index = {p: i for i, p in enumerate(pieces)}
    for length, indices in _by_length(rows):
        results = translator.translate_batch(
            [[pieces[t] for t in rows[i]] for i in indices],
            beam_size=beam_size,
            length_penalty=alpha,
            max_decoding_length=length + EXTRA,
            min_decoding_length=0,
            return_end_token=True,
            suppress_sequences=[['<pad>'], ['<s>']],
        )
        for i, result in zip(indices, results, strict=True):
            out[i] = [index[p] for p in result.hypotheses[0]]
    return out


def test_hf_logits_equal_attn_on_a_padded_batch(exported, marian):
    run, data, _, _ = exported
    target = data.features[1]
    rows = _sources(data)[:8]
    targets = _padded([data.tokenizer.encode(e[target]) for e in data.splits['test'][:8]])
    inputs = _padded(rows)
    expected = _attn_logits(run, inputs, targets)
    decoder_inputs = np.concatenate([np.full((len(rows), 1), BOS_ID), targets[:, :-1]], axis=1)
    with torch.no_grad():
        logits = marian(
            input_ids=torch.tensor(inputs),
            attention_mask=torch.tensor(inputs != PAD_ID),
            decoder_input_ids=torch.tensor(decoder_inputs),
        ).logits.numpy()
    real = targets != PAD_ID  # padded target positions are nobody's prediction
    assert (inputs == PAD_ID).any() and not real.all()  # the batch is padded on both sides
    np.testing.assert_allclose(logits[real], expected[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize('beam_size', [1, 4])
def test_hf_generate_searches_as_attn(exported, marian, beam_size):
    """Greedy and beam 4 on the test sentences, alpha=0: there Marian's length penalty
    |Y|^alpha and attn's ((5+|Y|)/6)^alpha are both 1."""
    run, data, _, _ = exported
    rows = _sources(data)[:SENTENCES]
    assert marian.generation_config.num_beams == run.config.decode.beam_size
    _check_search(run, rows, _hf_search(marian, rows, beam_size, 0.0), beam_size)


def test_ct2_scores_and_searches_as_attn(exported):
    """CTranslate2's log-probs of the references are attn's; greedy and beam 4 (alpha=0)
    search as attn's."""
    run, data, _, ct2 = exported
    rows = _sources(data)[:SENTENCES]
    pieces = [data.tokenizer.id_to_piece(i) for i in range(data.tokenizer.vocab_size)]
    translator = ctranslate2.Translator(ct2, device='cpu', intra_threads=1)
    target = data.features[1]
    references = [data.tokenizer.encode(e[target]) for e in data.splits['test'][:8]]
    scored = translator.score_batch(
        [[pieces[t] for t in r] for r in rows[:8]],
        [[pieces[t] for t in r[:-1]] for r in references],  # CTranslate2 appends EOS
    )
    logits = _attn_logits(run, _padded(rows[:8]), _padded(references))
    logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    for result, row, reference in zip(scored, logprobs, references, strict=True):
        expected = row[np.arange(len(reference)), reference]
        np.testing.assert_allclose(result.log_probs, expected, rtol=0, atol=1e-4)
    for beam_size in (1, 4):
        found = _ct2_search(translator, pieces, rows, beam_size, 0.0)
        _check_search(run, rows, found, beam_size)


def test_ct2_quantization_is_passed_through(exported, tmp_path):
    run, data, _, ct2 = exported
    out = str(tmp_path / 'int8')
    export.export(run, data.tokenizer, out, workdir='.', format='ct2', quantization='int8')
    size = os.path.getsize(f'{out}/model.bin')
    assert size < 0.6 * os.path.getsize(f'{ct2}/model.bin')  # int8 matrices, float32 rest
    rows = _sources(data)[:4]
    pieces = [data.tokenizer.id_to_piece(i) for i in range(data.tokenizer.vocab_size)]
    translator = ctranslate2.Translator(out, device='cpu', intra_threads=1)
    assert all(_ct2_search(translator, pieces, rows, 1, 0.0))


def test_exported_tokenizer_gives_attn_ids(exported):
    _, data, hf, _ = exported
    tokenizer = transformers.MarianTokenizer.from_pretrained(hf, local_files_only=True)
    for example in data.splits['validation']:
        for text in example.values():
            text = text.decode()
            ids = data.tokenizer.encode(text)
            assert tokenizer(text)['input_ids'] == ids
            assert tokenizer.decode(ids, skip_special_tokens=True) == data.tokenizer.decode(ids)


@pytest.mark.parametrize(
    'fields, named',
    [
        ({'model_kind': 'lm'}, 'config.model_kind'),
        ({'model.qk_dim': 4}, 'model.qk_dim'),
        ({'model.num_heads': 2, 'model.qk_dim': 8, 'model.v_dim': 8}, 'model.num_heads'),
        ({'model.positions': 'learned'}, 'model.positions'),
        ({'model.pre_ln': True}, 'model.pre_ln'),
        ({'model.share_embeddings': False}, 'model.share_embeddings'),
        ({'model.tie_output': False}, 'model.tie_output'),
        ({'model.norm': 'rmsnorm'}, 'model.norm'),
        ({'model.ffn': 'swiglu'}, 'model.ffn'),
        ({'model.qk_norm': True}, 'model.qk_norm'),
        ({'model.num_kv_heads': 1}, 'model.num_kv_heads'),
    ],
)
def test_unexportable_configs_are_refused_before_writing(toy_run, tmp_path, fields, named):
    workdir, data = toy_run
    config = configs.set_fields(config_dict.ConfigDict(toy_config(workdir)), fields)
    run = rundir.Run(config=config, model=None, steps=[6])
    out = tmp_path / 'out'
    with pytest.raises(export.ExportError) as refused:
        export.export(run, data.tokenizer, str(out), workdir=workdir, format='both')
    assert named in str(refused.value) and '\n' not in str(refused.value)
    assert not out.exists()


def test_a_non_empty_out_is_refused(exported, tmp_path):
    run, data, _, _ = exported
    (tmp_path / 'keep.txt').write_text('mine')
    with pytest.raises(export.ExportError, match='not empty'):
        export.export(run, data.tokenizer, str(tmp_path), workdir='.')
    assert os.listdir(tmp_path) == ['keep.txt']


def toy_config(workdir) -> dict:
    ckpt = rundir.open_checkpoints(workdir)
    try:
        return ckpt.restore_config()
    finally:
        ckpt.close()
