"""Prompt prefill: the prompt's keys/values written in one parallel pass == fed one step at a
time, against the token-by-token path and the full (uncached) forward pass."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn import decoding
from attn.decoding import common, sampling
from attn.model import LanguageModel, shift_right
from attn.model.tokens import BOS_ID, PAD_ID
from tests import test_decode

# test_decode's tiny model (untied output, strong learned positions) with 32 tokens: its
# greedy outputs change from token to token, so that a wrong cache would show in the tokens.
TINY = dataclasses.replace(test_decode.TINY, vocab_size=32)
TOL = 1e-5  # float32 logits: a prefill and single steps sum the same terms in other orders

# Teacher-forced targets; each row's prompt is its first prompt_lengths[b] tokens.
TARGETS = np.array(
    [
        [5, 6, 7, 8, 9, 20, 21, 22, 23, 24],
        [10, 11, 25, 26, 27, 28, 29, 30, 31, 4],
        [12, 13, 14, 21, 23, 25, 27, 29, 31, 6],
        [15, 16, 17, 18, 19, 30, 28, 26, 24, 22],
    ],
    np.int32,
)
P = 5
# Rows of different lengths, with an empty prompt and prompts that fill P, for
# min(prompt_lengths) = 0, 2, 3 and P (the positions the prefill keeps).
LENGTHS = [[5, 0, 2, 5], [5, 2, 3, 5], [4, 2, 3, 5], [5, 5, 5, 5]]


def prompts(lengths):
    """[B, P] the first lengths[b] tokens of each target row, right-padded with PAD."""
    return np.where(np.arange(P) < np.array(lengths)[:, None], TARGETS[:, :P], PAD_ID)


@pytest.fixture(scope='module')
def lm():
    model = LanguageModel(TINY, rngs=nnx.Rngs(0))
    model.decoder.embedder.learned.embedding[...] *= 3.0
    return model


@nnx.jit
def forward(model, tokens):
    """The full (uncached, teacher-forced) forward pass: logits [B, T, V]."""
    return model(tokens)


def test_prefill_logits_equal_step_by_step_and_full_forward(lm):
    """`extend` over the P prompt positions at once, then single steps: the logits at
    every prompt position and at the positions after it equal the token-by-token path
    (`forced_decode`) and the full forward pass."""
    inputs = shift_right(jnp.asarray(TARGETS))  # [B, T]
    B, T = inputs.shape
    cache = lm.init_cache(B, T)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits, cache = lm.extend(inputs[:, :P], positions=positions[:, :P], cache=cache)
    prefilled = [logits]  # [B, P, V]
    for t in range(P, T):
        logits, cache = lm.extend(
            inputs[:, t : t + 1], positions=positions[:, t : t + 1], cache=cache
        )
        prefilled.append(logits)
    prefilled = np.concatenate([np.asarray(x) for x in prefilled], 1)  # [B, T, V]
    stepwise = np.asarray(decoding.forced_decode(lm, None, inputs))
    np.testing.assert_allclose(prefilled, stepwise, atol=TOL, rtol=0)
    np.testing.assert_allclose(prefilled, np.asarray(forward(lm, TARGETS)), atol=TOL, rtol=0)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefilled_steps(graphdef, state, prompts, lengths, targets, start):
    """`sampling.prefill_prompts`, then teacher-forced single steps from position `start` on:
    (m, the input at m, logits [B, T - start, V])."""
    B, T = targets.shape
    step, cache = common.start(graphdef, state, None, batch_size=B, length=T)
    m, last, cache = sampling.prefill_prompts(step, cache, prompts, lengths)
    inputs = shift_right(targets)
    logits = []
    for t in range(start, T):
        out, cache = step(cache, inputs[:, t : t + 1], common.at_position(t, B))  # [B, 1, V]
        logits.append(out[:, 0])
    return m, last, jnp.stack(logits, 1)


@pytest.mark.parametrize('lengths', LENGTHS)
def test_rewound_prefill_continues_like_the_full_forward(lm, lengths):
    """After the prefill the caches stand at m = min(prompt_lengths): steps from m on,
    over the positions where the prefill wrote the shorter rows' PAD, give the full
    forward pass's logits of the targets at every position from m."""
    m = min(lengths)
    graphdef, state = nnx.split(lm)
    targets = jnp.asarray(TARGETS)
    start, last, logits = _prefilled_steps(
        graphdef, state, jnp.asarray(prompts(lengths)), jnp.asarray(lengths, jnp.int32), targets, m
    )
    assert int(start) == m
    np.testing.assert_array_equal(np.asarray(last), np.asarray(shift_right(targets))[:, m])
    full = np.asarray(forward(lm, TARGETS))[:, m:]
    np.testing.assert_allclose(np.asarray(logits), full, atol=TOL, rtol=0)


@pytest.mark.parametrize('lengths', LENGTHS)
@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_prefilled_sampling_equals_token_by_token(lm, lengths, temperature):
    """The same tokens with and without prefill, greedy and sampled (the step keys do not
    depend on where the prompt was fed)."""

    def run(prefill):
        tokens = decoding.sample(
            lm,
            prompts(lengths),
            lengths,
            max_length=14,
            temperature=temperature,
            seed=1,
            prefill=prefill,
        )
        return np.asarray(tokens)

    tokens = run(True)
    np.testing.assert_array_equal(tokens, run(False))
    for row, p in enumerate(lengths):
        np.testing.assert_array_equal(tokens[row, :p], TARGETS[row, :p])
    if temperature == 0.0:  # greedy: each generated token is the full pass's argmax
        logits = np.array(forward(lm, tokens))
        logits[..., [PAD_ID, BOS_ID]] = -np.inf  # never generated
        for row, p in enumerate(lengths):
            n = decoding.output_length(tokens[row])
            np.testing.assert_array_equal(logits[row, p:n].argmax(-1), tokens[row, p:n])


def test_prompts_that_fill_the_output_come_back_unchanged(lm):
    """max_length = P with every prompt full: nothing left to generate."""
    full = prompts([P] * 4)
    tokens = decoding.sample(lm, full, [P] * 4, max_length=P, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(tokens), full)
