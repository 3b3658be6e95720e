"""The step by hand: label-smoothed loss, schedule, the first Adam update, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attn import configs
from attn.errors import ConfigError
from attn.model import build_model
from attn.model.config import ModelConfig
from attn.training import step
from tests import toy


def test_label_smoothed_loss_by_hand():
    """Vocabulary of 3, logits (1, 2, 3), target 2 (logit 3), eps 0.1."""
    log_z = math.log(math.e + math.e**2 + math.e**3)
    sums = step.cross_entropy(
        jnp.array([[[1.0, 2.0, 3.0]]]), jnp.array([[2]]), jnp.array([[1.0]]), 0.1
    )
    assert float(sums['nll']) == pytest.approx(log_z - 3, rel=1e-6)
    # 0.9 * -log p(target) + 0.1 * mean_v -log p(v) = log_z - 0.9 * 3 - 0.1 * 2
    assert float(sums['loss']) == pytest.approx(log_z - 2.9, rel=1e-6)
    assert float(sums['weight']) == 1.0
    padded = step.cross_entropy(
        jnp.zeros((1, 2, 3)), jnp.array([[1, 0]]), jnp.array([[1.0, 0.0]]), 0.0
    )
    assert float(padded['nll']) == pytest.approx(math.log(3), rel=1e-6)  # pad excluded


def test_schedule_at_known_steps():
    schedule = step.learning_rate_schedule(512, 4000)
    # Optax count c is the paper's step c + 1.
    assert float(schedule(0)) == pytest.approx(512**-0.5 * 4000**-1.5, rel=1e-5)
    assert float(schedule(3999)) == pytest.approx(512**-0.5 * 4000**-0.5, rel=1e-5)  # peak
    assert float(schedule(15999)) == pytest.approx(512**-0.5 * 16000**-0.5, rel=1e-5)
    assert float(step.learning_rate_schedule(512, 4000, 2.0)(15999)) == pytest.approx(
        2 * 512**-0.5 / 126.4911, rel=1e-4
    )


def _tiny_state(tx=None, **model_overrides):
    """(cfg, tx, graphdef, rest, state) of a one-layer model; the paper's Adam unless `tx`."""
    fields = dict(vocab_size=32, num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)
    cfg = ModelConfig(**(fields | dict(dropout_rate=0.0) | model_overrides))
    tx = tx or step.make_optimizer(configs.base_config('tiny').optimizer, cfg.emb_dim)
    return cfg, tx, *step.init_state(build_model('transformer', cfg), tx)


def _batch(rows, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(4, 32, (rows, 6)).astype(np.int32)
    targets[:, -2:] = 0  # padding
    return {'inputs': rng.integers(4, 32, (rows, 7)).astype(np.int32), 'targets': targets}


def test_first_update_is_adam_on_the_token_mean_gradient():
    cfg, tx, graphdef, rest, state = _tiny_state()
    batch = _batch(4)
    step_cfg = step.StepConfig('transformer', 0.1)

    def mean_loss(params):
        model = nnx.merge(graphdef, params, rest)
        logits = model(batch['inputs'], batch['targets'])
        sums = step.cross_entropy(logits, batch['targets'], step.target_weights(batch), 0.1)
        return sums['loss'] / sums['weight']

    grads = jax.grad(mean_loss)(state.params)
    # Central finite difference on one weight agrees with the analytic gradient.
    leaf = state.params['encoder']['layers'][0]['feed_forward']['wi']['kernel']
    eps, original = 1e-2, leaf[...]
    leaf[...] = original.at[0, 0].add(eps)
    up = float(mean_loss(state.params))
    leaf[...] = original.at[0, 0].add(-eps)
    down = float(mean_loss(state.params))
    leaf[...] = original
    analytic = float(grads['encoder']['layers'][0]['feed_forward']['wi']['kernel'][...][0, 0])
    assert (up - down) / (2 * eps) == pytest.approx(analytic, rel=2e-2, abs=1e-5)

    new_state, metrics = step.train_step(
        state, batch, jax.random.key(0), graphdef=graphdef, rest=rest, tx=tx, cfg=step_cfg
    )
    lr = float(step.learning_rate_schedule(16, 4000)(0))
    # Adam's first step: m_hat = g, v_hat = g^2, so the update is -lr * g / (|g| + eps).
    expected = jax.tree.map(lambda p, g: p - lr * g / (jnp.abs(g) + 1e-9), state.params, grads)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-7)
    assert int(new_state.step) == 1
    assert float(metrics['loss']) == pytest.approx(float(mean_loss(state.params)), rel=1e-5)


def _update(state, batch, graphdef, rest, tx, **settings):
    """One train_step of the tiny model, dropout key 0, with StepConfig `settings`."""
    cfg = step.StepConfig('transformer', 0.1, **settings)
    return step.train_step(
        state, batch, jax.random.key(0), graphdef=graphdef, rest=rest, tx=tx, cfg=cfg
    )


def _assert_same_gradient(state, a, b):
    """With SGD at learning rate 1 each update is minus the gradient: compare those (and
    check that there is one)."""
    leaves = [jax.tree.leaves(s.params) for s in (state, a, b)]
    for before, x, y in zip(*leaves, strict=True):
        np.testing.assert_allclose(x - before, y - before, rtol=1e-4, atol=1e-7)
    moved = [float(jnp.abs(x - before).max()) for before, x, _ in zip(*leaves, strict=True)]
    assert max(moved) > 1e-3


def test_gradient_accumulation_equals_larger_batch():
    cfg, tx, graphdef, rest, state = _tiny_state(optax.sgd(1.0))
    batch = _batch(8, seed=3)
    batch['targets'][0, 2:] = 0  # unequal token counts across microbatches
    one, m1 = _update(state, batch, graphdef, rest, tx, grad_accum_steps=1)
    four, m4 = _update(state, batch, graphdef, rest, tx, grad_accum_steps=4)
    assert float(m1['loss']) == pytest.approx(float(m4['loss']), rel=1e-6)
    _assert_same_gradient(state, one, four)


@pytest.mark.parametrize('chunk', [1, 2, 4, 7])
def test_chunked_loss_equals_the_whole_loss(chunk):
    """Same sums and gradients as the loss of the whole [B, T, V] logits, with T=6 not
    a multiple of every chunk (padding) and padded target tokens."""
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.standard_normal((3, 6, 8)), jnp.float32)
    matrix = jnp.asarray(rng.standard_normal((11, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 6)))
    weights = jnp.asarray(rng.random((3, 6)) > 0.2, jnp.float32)

    def whole(hidden, matrix):
        return step.cross_entropy(hidden @ matrix.T, targets, weights, 0.1)

    def chunked(hidden, matrix):
        return step.chunked_cross_entropy(hidden, matrix, targets, weights, 0.1, chunk)

    for name in ('loss', 'nll', 'weight'):
        assert float(chunked(hidden, matrix)[name]) == pytest.approx(
            float(whole(hidden, matrix)[name]), rel=1e-6
        )
    grads = [
        jax.grad(lambda h, m, f=f: f(h, m)['loss'], argnums=(0, 1))(hidden, matrix)
        for f in (whole, chunked)
    ]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_in_the_train_step():
    """loss_chunk changes memory, not the gradient (dropout on; tied and untied output
    matrices)."""
    for tied in (True, False):
        cfg, tx, graphdef, rest, state = _tiny_state(
            optax.sgd(1.0), dropout_rate=0.1, share_embeddings=tied, tie_output=tied
        )
        batch = _batch(4, seed=2)
        results = [_update(state, batch, graphdef, rest, tx, loss_chunk=c) for c in (0, 4)]
        (whole, m0), (chunked, m4) = results
        assert float(m0['loss']) == pytest.approx(float(m4['loss']), rel=1e-6)
        _assert_same_gradient(state, whole, chunked)


@pytest.mark.parametrize(
    'field, value',
    [('grad_accum_steps', 0), ('loss_chunk', -1), ('label_smoothing', 1.0), ('model_kind', 'rnn')],
)
def test_bad_step_settings_are_refused(field, value):
    config = toy.config()
    config[field] = value
    with pytest.raises(ConfigError, match=f'config.{field}'):
        configs.validate(config, devices=1)


def test_chunked_loss_in_bfloat16_sums_the_matrix_gradient_in_float32():
    """128 chunks of one position: summing the projection's gradient in bfloat16 would be
    ~1% off; in float32 it is as close to the float32 gradient as the whole loss is."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 128, 16)), jnp.bfloat16)
    matrix = jnp.asarray(0.3 * rng.standard_normal((50, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 128)))
    weights = jnp.ones((2, 128), jnp.float32)

    def grad(loss):
        return jax.grad(lambda m: loss(m)['loss'])(matrix)

    exact = grad(
        lambda m: step.cross_entropy(hidden.astype(jnp.float32) @ m.T, targets, weights, 0.1)
    )
    chunked = grad(lambda m: step.chunked_cross_entropy(hidden, m, targets, weights, 0.1, 1))
    assert chunked.dtype == jnp.float32
    error = float(jnp.linalg.norm(chunked - exact) / jnp.linalg.norm(exact))
    assert error < 5e-3


def test_adam_uses_the_papers_beta2_and_epsilon_over_several_steps():
    """Three updates against Adam written out in float64 with b2=0.98 and eps=1e-9 (§5.3).
    The first update alone cannot tell: m/sqrt(v) is sign(g) whatever b2 and eps. Gradients
    that change in size from step to step expose b2, and one of size ~eps exposes eps."""
    config = configs.base_config().optimizer
    tx = step.make_optimizer(config, emb_dim=512)
    params = jnp.zeros(3, jnp.float32)
    opt_state = tx.init(params)
    grads = np.array([[1e-9, 1.0, -2.0], [2e-9, -3.0, 0.5], [-1e-9, 0.1, 4.0]])
    m = v = np.zeros(3)
    for t, g in enumerate(grads, start=1):
        updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state, params)
        m, v = 0.9 * m + 0.1 * g, 0.98 * v + 0.02 * g**2
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.98**t)
        lr = 512**-0.5 * min(t**-0.5, t * config.warmup_steps**-1.5)
        expected = -lr * m_hat / (np.sqrt(v_hat) + 1e-9)
        np.testing.assert_allclose(np.asarray(updates), expected, rtol=2e-5)
