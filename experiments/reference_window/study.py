"""Trains the Transformer and the recurrent models on the reference-window task and
writes report.md, accuracy.png and results.json to --out.

    python -m experiments.reference_window.study --config=configs/reference_window.py \
        --out=runs/reference_window
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import matplotlib

matplotlib.use('Agg')
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from attn import (
    cli,  # noqa: E402
    configs,
)
from attn.model import LanguageModel, build_model  # noqa: E402
from attn.model.config import ModelConfig  # noqa: E402
from attn.summary import module_params  # noqa: E402
from attn.training import sharding
from attn.training import step as step_lib  # noqa: E402
from experiments.reference_window import recurrent, task  # noqa: E402

LOG_EVERY = 50
WHAT = {
    'offset': 'the query names k; nothing marks the answer before it',
    'marker': 'a marker precedes the answer; one query token',
}


def model_config(config) -> ModelConfig:
    """The Transformer's settings, with the vocabulary and row length of the task."""
    configs.check_choice('kind', config.task.kind, task.KINDS)
    t = config.task
    return dataclasses.replace(
        configs.model_config(config),
        vocab_size=task.vocab_size(t.kind, t.content_tokens, t.max_k),
        max_len=task.sequence_length(t.max_k),
    )


def build(name: str, config) -> tuple[nnx.Module, dict]:
    """A model of the study and a description of it (parameters, widths)."""
    cfg = model_config(config)
    if name == 'transformer':
        transformer = build_model('lm', cfg, config.seed)
        info = dict(layers=cfg.num_layers, d_model=cfg.emb_dim, heads=cfg.num_heads)
        return transformer, info | {'params': sum(module_params(transformer).values())}
    shapes = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    budget = sum(module_params(shapes).values())
    hidden = recurrent.matched_hidden(name, cfg.vocab_size, cfg.emb_dim, budget)
    model = recurrent.RecurrentModel(
        name, cfg.vocab_size, cfg.emb_dim, hidden, rngs=nnx.Rngs(params=config.seed)
    )
    return model, {'hidden': hidden, 'params': sum(module_params(model).values())}


@nnx.jit
def predictions(model, targets):
    """The predicted last token [B] of each row of `targets` [B, T]."""
    return model(targets)[:, -1].argmax(-1)


def optimizer(config) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optax.adam(schedule))


def answer_only(targets: np.ndarray) -> dict[str, np.ndarray]:
    """A batch of `attn.training.step` that scores the last token of each row alone: the answer
    (the tokens before it are random, nothing to learn)."""
    weights = np.zeros(targets.shape, np.float32)
    weights[:, -1] = 1.0
    return {'targets': targets, 'targets_weights': weights}


def train(model, config) -> tuple[nnx.Module, dict]:
    """Trains on the same stream of batches for every model, with `attn.training.step`'s train
    step; returns the trained model and the cost and losses."""
    tx = optimizer(config)
    mesh = sharding.make_mesh()
    graphdef, rest, state = step_lib.init_state(model, tx)
    state = jax.device_put(state, sharding.replicated(mesh))
    cfg = step_lib.StepConfig('lm', label_smoothing=0.0)
    train_step, _ = step_lib.compile_steps(graphdef, rest, tx, cfg, mesh)
    rng = jax.random.key(config.seed)  # dropout's; the study's models have none
    losses, start = [], time.perf_counter()
    for step in range(1, config.steps + 1):
        batch = task.training_examples(config.batch_size, seed=config.seed + step, **config.task)
        state, metrics = train_step(
            state, sharding.global_batch(mesh, answer_only(batch['targets'])), rng
        )
        jax.block_until_ready(metrics)  # queued steps can hang XLA:CPU (loop.Reporter.add)
        if step % LOG_EVERY == 0 or step == config.steps:
            losses.append((step, float(metrics['loss'])))
    info = {'train_seconds': time.perf_counter() - start, 'losses': losses}
    return nnx.merge(graphdef, state.params, rest), info


def accuracy_by_distance(model, config) -> dict[int, float]:
    t = config.task
    result = {}
    for k in task.evaluation_grid(t.max_k):
        examples = task.make_examples(
            np.full(config.eval_examples_per_k, k),
            seed=10**6 + k,  # held out: training seeds are seed + step
            **t,
        )
        predicted = np.asarray(predictions(model, examples['targets']))
        result[k] = float((predicted == examples['targets'][:, -1]).mean())
    return result


def run_study(config, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    results = {}
    for name in config.models:
        model, info = build(name, config)
        model, cost = train(model, config)
        info |= cost
        info['accuracy'] = accuracy_by_distance(model, config)
        results[name] = info
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump({'config': config.to_dict(), 'models': results}, f, indent=1)
    plot(results, config, os.path.join(out, 'accuracy.png'))
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write(report(results, config))
    return results


def plot(results: dict, config, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, info in results.items():
        ks = list(info['accuracy'])
        label = f'{name} ({info["params"] / 1e3:.0f}K params)'
        ax.plot(ks, [info['accuracy'][k] for k in ks], 'o-', label=label)
    chance = 1 / config.task.content_tokens
    ax.axhline(chance, color='gray', linestyle=':', label='chance')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('distance k back to the token to recall')
    ax.set_ylabel('accuracy')
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f'Reference window ({config.task.kind} task): '
        f'{config.steps} steps x {config.batch_size} examples each'
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, config) -> str:
    t = config.task
    ks = task.evaluation_grid(t.max_k)
    lines = [
        '# Reference window: attention against RNN, GRU and LSTM',
        '',
        f'Task `{t.kind}`: recall the token k positions before the query ({WHAT[t.kind]}; rows'
        f' of {task.sequence_length(t.max_k)} tokens, {t.content_tokens} content tokens, chance '
        f'{1 / t.content_tokens:.3f}). Every model: {config.steps} Adam steps'
        f' of {config.batch_size} examples (k uniform over the distances below), learning rate '
        f'{config.learning_rate}, gradient clipping {config.grad_clip_norm}; accuracy over '
        f'{config.eval_examples_per_k} held-out examples per k. '
        f'Device: {jax.devices()[0].device_kind}.',
        '',
        '| model | params | width | train s | final loss | '
        + ' | '.join(f'k={k}' for k in ks)
        + ' |',
        '|---|---|---|---|---|' + '---|' * len(ks),
    ]
    for name, info in results.items():
        width = info.get('hidden') or f'd_model {info["d_model"]}, {info["layers"]} layers'
        accuracy = ' | '.join(f'{info["accuracy"][k]:.3f}' for k in ks)
        lines.append(
            f'| {name} | {info["params"]:,} | {width} | {info["train_seconds"]:.0f} | '
            f'{info["losses"][-1][1]:.3f} | {accuracy} |'
        )
    return '\n'.join(lines) + '\n\n![accuracy against distance](accuracy.png)\n'


def main(argv):
    del argv
    if flags.FLAGS.out is None:
        raise app.UsageError('--out is required.')
    results = run_study(cli.config(validate=False), flags.FLAGS.out)
    summary = {name: info['accuracy'] for name, info in results.items()}
    print(json.dumps(summary))  # noqa: T201 - the study's report


if __name__ == '__main__':
    cli.define_config_flag()
    flags.DEFINE_string('out', None, 'Folder for report.md, accuracy.png and results.json.')
    cli.run(main)
