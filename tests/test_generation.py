"""Attention while generating: rows are distributions over visible tokens only, the view
matches the generated tokens, and the pictures are written."""

import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from attn import rundir
from attn.analysis import generation
from attn.configs import ModelConfig
from attn.errors import UserError
from attn.model import LanguageModel
from attn.model.tokens import EOS_ID
from tests import toy

CFG = ModelConfig(
    vocab_size=toy.VOCAB_SIZE, num_layers=2, emb_dim=32, num_heads=4, mlp_dim=64, dropout_rate=0.0
)


def test_language_model_view_covers_only_earlier_tokens():
    model = LanguageModel(CFG, rngs=nnx.Rngs(0))
    prompt = [10, 11, 12, 13]
    view = generation.language_model_attention(model, prompt, max_new_tokens=6)
    L, N, steps, S = view.weights.shape
    assert (L, N) == (2, 4) and 1 <= steps <= 6 and S == len(prompt) + steps
    np.testing.assert_allclose(view.weights.sum(-1), 1.0, atol=1e-5)
    for step in range(steps):
        visible = view.visible(step)
        assert visible == len(prompt) + step + 1
        assert np.all(view.weights[:, :, step, visible:] == 0.0)
    # The view's tokens are what the model generates: each is the argmax of its logits.
    sequence = np.concatenate([prompt, view.produced])
    logits = np.asarray(model(sequence[None]))[0]
    np.testing.assert_array_equal(logits[len(prompt) :].argmax(-1), view.produced)


def test_translation_view_is_over_the_source(toy_run, tmp_path):
    workdir, data = toy_run
    run = rundir.load(workdir)
    view = generation.generate(run, data.tokenizer, 'the cat sees the dog')
    source = data.tokenizer.encode('the cat sees the dog')
    assert view.kind == 'cross_attention' and list(view.keys) == source
    assert view.weights.shape[2:] == (len(view.produced), len(source))
    np.testing.assert_allclose(view.weights.sum(-1), 1.0, atol=1e-5)
    assert view.produced[-1] == EOS_ID or len(view.produced) == len(source) + 50

    summary = generation.write(view, data.tokenizer, str(tmp_path))
    assert summary['kind'] == 'cross_attention'
    assert {'generation.png', 'generation.gif', 'generation.json'} <= set(os.listdir(tmp_path))
    with Image.open(tmp_path / 'generation.gif') as gif:
        assert gif.n_frames == len(view.produced)


def test_an_empty_prompt_is_refused(toy_run):
    workdir, data = toy_run
    with pytest.raises(UserError, match='--prompt is empty'):
        generation.generate(rundir.load(workdir), data.tokenizer, '  ')
