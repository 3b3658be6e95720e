"""One training step: the paper's loss, schedule and optimizer (§5.3-§5.4), and the
jit-compiled `train_step` and `eval_step` over a device mesh.

`train_step(state, batch, rng) -> (state, metrics)` is pure; it is compiled once with
the batch split over the mesh's `data` axis and the state donated, replicated or (with
`config.sharding='fsdp'`) split over `data` too (`sharding.state_shardings`). The
loop that feeds it (data, checkpoints, logs) is `attn.train`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from attn import configs
from attn.model import build_model, logits_from
from attn.model.tokens import PAD_ID
from attn.training import sharding

# ------------------------------------------------------------------------------- loss


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float
) -> dict[str, jax.Array]:
    """Label-smoothed cross entropy (§5.4), summed over weighted tokens.

    With smoothing eps the target distribution is (1 - eps) one-hot + eps uniform, so
        loss = (1 - eps) * -log p(y) + eps * mean_v(-log p(v)),
    computed without a [B, T, V] one-hot.

    Args:
      logits: [B, T, V] (any float dtype; the loss is taken in float32).
      targets: [B, T] int.
      weights: [B, T] float, 1 at real tokens, 0 at padding.
      label_smoothing: eps_ls in [0, 1).
    Returns:
      sums over tokens: 'loss' (smoothed), 'nll' (plain negative log-likelihood),
      'weight' (number of tokens).
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    nll = log_z - target_logit  # [B, T]
    uniform = log_z - logits.mean(axis=-1)  # [B, T]: mean over v of -log p(v)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return {
        'loss': (loss * weights).sum(),
        'nll': (nll * weights).sum(),
        'weight': weights.sum(),
    }


def chunked_cross_entropy(
    hidden: jax.Array,
    matrix: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    label_smoothing: float,
    chunk: int,
) -> dict[str, jax.Array]:
    """`cross_entropy` of the logits `logits_from(hidden, matrix)`, `chunk` target
    positions at a time: each chunk's [B, chunk, V] logits are made in the forward pass
    and made again in the backward pass, so the [B, T, V] logits are never held whole.

    Args:
      hidden: [B, T, D] final decoder states; the logits are computed in their dtype.
      matrix: [V, D] pre-softmax projection (its gradient is summed over chunks in its
        own dtype: pass the float32 parameters).
      targets, weights, label_smoothing: as in `cross_entropy`.
      chunk: positions per chunk; T is padded (with weight 0) to a multiple of it.
    Returns:
      the sums of `cross_entropy`.
    """
    batch, length = targets.shape
    chunk = min(chunk, length)
    pad = -length % chunk
    count = (length + pad) // chunk

    def chunks(x):  # [B, T, ...] -> [count, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(batch, count, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def one(matrix, hidden, targets, weights):
        logits = logits_from(hidden, matrix, hidden.dtype)
        return cross_entropy(logits, targets, weights, label_smoothing)

    def add(sums, xs):
        return jax.tree.map(jnp.add, sums, one(matrix, *xs)), None

    xs = (chunks(hidden), chunks(targets), chunks(weights))
    sums, _ = jax.lax.scan(add, _empty_sums(), xs)
    return sums


def target_weights(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T] float32: 1 at real target tokens (segment > 0, or non-pad if unpacked), or
    the batch's own `targets_weights` where a task scores some tokens only."""
    if 'targets_weights' in batch:
        return batch['targets_weights'].astype(jnp.float32)
    if 'targets_segmentation' in batch:
        return (batch['targets_segmentation'] > 0).astype(jnp.float32)
    return (batch['targets'] != PAD_ID).astype(jnp.float32)


# --------------------------------------------------------------------------- optimizer


def learning_rate_schedule(emb_dim: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5) (§5.3, Eq. 3).

    Optax counts updates from 0; the paper's step is that count + 1.
    """

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * emb_dim**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def make_optimizer(optimizer_config, emb_dim: int) -> optax.GradientTransformation:
    """Adam(b1=0.9, b2=0.98, eps=1e-9) on the schedule, with optional global-norm clipping."""
    c = optimizer_config
    schedule = learning_rate_schedule(emb_dim, c.warmup_steps, c.lr_scale)
    adam = optax.adam(schedule, b1=c.b1, b2=c.b2, eps=c.eps)
    if c.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), adam)
    return adam


# ------------------------------------------------------------------------------ state


@struct.dataclass
class TrainState:
    """Everything a step changes: the update count, parameters and optimizer state."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step functions need to know besides the model."""

    kind: str  # 'transformer' or 'lm'
    label_smoothing: float
    grad_accum_steps: int = 1
    loss_chunk: int = 0  # > 0: logits and loss this many target positions at a time


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    """Splits a model into (graphdef, non-trained state, TrainState at step 0)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params))
    return graphdef, rest, state


def forward(model, batch, kind: str, *, deterministic: bool, rngs, project=True) -> jax.Array:
    """Teacher-forced logits [B, T, V] of a batch (project=False: hidden states [B, T, D])."""
    if kind == 'lm':
        return model(
            batch['targets'],
            batch.get('targets_segmentation'),
            batch.get('targets_position'),
            deterministic=deterministic,
            rngs=rngs,
            project=project,
        )
    return model(
        batch['inputs'],
        batch['targets'],
        batch.get('inputs_segmentation'),
        batch.get('targets_segmentation'),
        batch.get('inputs_position'),
        batch.get('targets_position'),
        deterministic=deterministic,
        rngs=rngs,
        project=project,
    )


def _loss_sums(params, rest, graphdef, batch, rng, cfg: StepConfig, deterministic: bool):
    model = nnx.merge(graphdef, params, rest)
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    targets, weights = batch['targets'], target_weights(batch)
    chunk = cfg.loss_chunk
    out = forward(model, batch, cfg.kind, deterministic=deterministic, rngs=rngs, project=not chunk)
    if chunk:  # `out` holds the hidden states; the loss projects them chunk by chunk
        matrix = model.decoder.output_matrix()
        return chunked_cross_entropy(out, matrix, targets, weights, cfg.label_smoothing, chunk)
    return cross_entropy(out, targets, weights, cfg.label_smoothing)


def _microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[k * R, L] -> [k, R, L], taking rows k apart so every device keeps its own rows."""

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _gradients(params, rest, graphdef, batch, rng, cfg: StepConfig):
    """Gradient of the token-mean loss over the whole batch, and the loss sums.

    With grad_accum_steps = k the batch is taken as k microbatches in sequence
    (lax.scan), summing token-weighted gradients: the update equals that of one
    batch k times larger, in the memory of one microbatch.
    """

    def loss_fn(params, batch, rng):
        sums = _loss_sums(params, rest, graphdef, batch, rng, cfg, deterministic=False)
        return sums['loss'], sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if cfg.grad_accum_steps == 1:
        grads, sums = grad_fn(params, batch, rng)
    else:

        def accumulate(carry, xs):
            index, microbatch = xs
            grads, sums = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zeros = jax.tree.map(jnp.zeros_like, (params, _empty_sums()))
        k = cfg.grad_accum_steps
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), _microbatches(batch, k)))
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums['weight'], 1.0), grads)
    return grads, sums


def _empty_sums() -> dict[str, jax.Array]:
    return {name: jnp.zeros((), jnp.float32) for name in ('loss', 'nll', 'weight')}


def _means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    weight = jnp.maximum(sums['weight'], 1.0)
    return {'loss': sums['loss'] / weight, 'nll': sums['nll'] / weight, 'tokens': sums['weight']}


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    graphdef,
    rest,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update. Dropout keys are fold_in(rng, step): the same on any device count."""
    step_rng = jax.random.fold_in(rng, state.step)
    grads, sums = _gradients(state.params, rest, graphdef, batch, step_rng, cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _means(sums) | {'grad_norm': optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, graphdef, rest, cfg: StepConfig) -> dict[str, jax.Array]:
    """Loss sums of a batch without dropout (to be added up over a split)."""
    return _loss_sums(params, rest, graphdef, batch, None, cfg, deterministic=True)


def compile_steps(
    graphdef, rest, tx, cfg: StepConfig, mesh, *, mode: str = 'replicated', state=None
) -> tuple[Any, Any]:
    """jit-compiled (train_step, eval_step): batch split over `data`, the state laid out
    by `sharding.state_shardings(state, mesh, mode)` and donated; metrics replicated.

    `state` (the TrainState, arrays or ShapeDtypeStructs) gives the shapes the layout is
    chosen by; without it the state is replicated.
    """
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    if state is None:
        if mode != 'replicated':
            raise ValueError(f'compile_steps(mode={mode!r}) needs the state to lay out.')
        layout = TrainState(step=replicated, params=replicated, opt_state=replicated)
    else:
        layout = sharding.state_shardings(state, mesh, mode)
    train = jax.jit(
        functools.partial(train_step, graphdef=graphdef, rest=rest, tx=tx, cfg=cfg),
        in_shardings=(layout, batch, replicated),
        out_shardings=(layout, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, rest=rest, cfg=cfg),
        in_shardings=(layout.params, batch),
        out_shardings=replicated,
    )
    return train, evaluate


def create_state(kind: str, cfg, seed: int, tx, mesh, *, mode: str = 'replicated'):
    """(graphdef, rest, TrainState) initialized on the mesh: the TrainState laid out by
    `sharding.state_shardings(..., mode)` (each device makes only its own slices), the
    non-trained state replicated."""
    abstract = nnx.eval_shape(lambda: build_model(kind, cfg, seed))
    graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)

    def init():
        _, rest, state = init_state(build_model(kind, cfg, seed), tx)
        return rest, state

    _, abstract_state = jax.eval_shape(init)
    layout = sharding.state_shardings(abstract_state, mesh, mode)
    rest, state = jax.jit(init, out_shardings=(sharding.replicated(mesh), layout))()
    return graphdef, rest, state


def evaluate_loss(eval_step, params, batches, mesh) -> dict[str, float]:
    """Token-mean loss, NLL and perplexity over eval batches (host-local rows, every host's
    of the same width: `Data.eval_batches` agrees on it)."""
    totals = None
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k != 'index'}
        sums = eval_step(params, sharding.global_batch(mesh, batch))
        # One batch in flight at a time behind the running one (see train._Reporter.add).
        totals = (
            sums if totals is None else jax.tree.map(jnp.add, jax.block_until_ready(totals), sums)
        )
    totals = jax.device_get(totals)
    weight = max(float(totals['weight']), 1.0)
    nll = float(totals['nll']) / weight
    return {'loss': float(totals['loss']) / weight, 'nll': nll, 'perplexity': float(np.exp(nll))}


class Setup(NamedTuple):
    """What a run steps with: the model split for `nnx.merge(graphdef, state.params,
    rest)`, the initial TrainState, the compiled steps and the dropout key."""

    graphdef: Any
    rest: nnx.State  # the non-trained state (e.g. the RNG counts), replicated
    state: TrainState
    train: Any  # compiled train_step(state, batch, rng) -> (state, metrics)
    evaluate: Any  # compiled eval_step(params, batch) -> loss sums
    rng: jax.Array  # typed key of config.prng_impl, seeded by the dropout seed


def setup(config, cfg, mesh) -> Setup:
    """What a run of `config` (model `cfg`) steps with on `mesh`."""
    tx = make_optimizer(config.optimizer, cfg.emb_dim)
    mode = config.sharding
    init_seed = configs.source_seed(config, 'init')
    graphdef, rest, state = create_state(config.model_kind, cfg, init_seed, tx, mesh, mode=mode)
    step_cfg = StepConfig(
        config.model_kind, config.label_smoothing, config.grad_accum_steps, config.loss_chunk
    )
    train, evaluate = compile_steps(graphdef, rest, tx, step_cfg, mesh, mode=mode, state=state)
    rng = jax.random.key(configs.source_seed(config, 'dropout'), impl=config.prng_impl)
    return Setup(graphdef, rest, state, train, evaluate, rng)
