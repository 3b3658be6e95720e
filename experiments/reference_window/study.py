"""Trains the Transformer and the recurrent models on the reference-window task and
writes report.md, accuracy.png and results.json to --out.

    python -m experiments.reference_window.study --config=configs/reference_window.py \
        --out=runs/reference_window
"""

from __future__ import annotations

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

from attn import cli, configuration  # noqa: E402
from attn.model import LanguageModel  # noqa: E402
from attn.summary import module_params  # noqa: E402
from experiments.reference_window import recurrent, task  # noqa: E402

LOG_EVERY = 50
WHAT = {
    'offset': 'the query names k; nothing marks the answer before it',
    'marker': 'a marker precedes the answer; one query token',
}


def build(name: str, config) -> tuple[nnx.Module, dict]:
    """A model of the study and a description of it (parameters, widths)."""
    cfg = configuration.model_config(config)
    if name == 'transformer':
        transformer = LanguageModel(cfg, rngs=nnx.Rngs(config.seed))
        info = dict(layers=cfg.num_layers, d_model=cfg.emb_dim, heads=cfg.num_heads)
        return transformer, info | {'params': sum(module_params(transformer).values())}
    shapes = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    budget = sum(module_params(shapes).values())
    hidden = recurrent.matched_hidden(name, cfg.vocab_size, cfg.emb_dim, budget)
    model = recurrent.RecurrentModel(
        name, cfg.vocab_size, cfg.emb_dim, hidden, rngs=nnx.Rngs(config.seed)
    )
    return model, {'hidden': hidden, 'params': sum(module_params(model).values())}


def answer_logits(model, targets: jax.Array) -> jax.Array:
    """Logits [B, V] for the last token of each row, from the tokens before it."""
    if isinstance(model, LanguageModel):
        return model(targets)[:, -1]
    return model(targets[:, :-1])


def loss_fn(model, targets):
    logits = answer_logits(model, targets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets[:, -1]).mean()


@nnx.jit
def train_step(model, optimizer, targets):
    loss, grads = nnx.value_and_grad(loss_fn)(model, targets)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predictions(model, targets):
    return answer_logits(model, targets).argmax(-1)


def optimizer_for(model, config) -> nnx.Optimizer:
    schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optax.adam(schedule))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def train(model, config) -> dict:
    """Trains on the same stream of batches for every model; returns the cost and losses."""
    optimizer = optimizer_for(model, config)
    t = config.task
    losses, start = [], time.perf_counter()
    for step in range(1, config.steps + 1):
        batch = task.training_examples(config.batch_size, seed=config.seed + step, **t)
        loss = train_step(model, optimizer, batch['targets'])
        if step % LOG_EVERY == 0 or step == config.steps:
            losses.append((step, float(loss)))
    return {'train_seconds': time.perf_counter() - start, 'losses': losses}


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
        info |= train(model, config)
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
