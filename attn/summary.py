"""Parameters per module and FLOPs per token of a config.

    python -m attn.summary --config=configs/table3.py:row=B1 [--json] [--length=256]

FLOPs count the matrix multiplications of a forward pass (dense attention, the
pre-softmax projection included), 2 per multiply-add; a training step is taken as
3x the forward pass.
"""

from __future__ import annotations

import collections
import json

import jax
from absl import flags
from flax import nnx

from attn import cli, configs
from attn.model import build_model
from attn.model.config import ModelConfig


def module_params(model: nnx.Module) -> dict[str, int]:
    """Parameter counts grouped by module path (down to one layer); shared weights once."""
    counts: dict[str, int] = collections.OrderedDict()
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path[:-1]]
        if 'layers' in names:
            names = names[: names.index('layers') + 2]  # e.g. encoder.layers.3
        key = '.'.join(names[:3])
        counts[key] = counts.get(key, 0) + variable.get_value().size
    return counts


def forward_flops(cfg: ModelConfig, kind: str, source_length: int, target_length: int) -> int:
    """Matmul FLOPs of one forward pass over one example of the given lengths."""
    D, N, K, H = cfg.emb_dim, cfg.num_heads, cfg.head_qk_dim, cfg.head_v_dim
    S, T = source_length, target_length

    G = cfg.num_kv_heads or N  # key/value heads

    def attention(tq: int, tk: int) -> int:
        projections = 2 * tq * D * N * K + 2 * tk * D * G * (K + H) + 2 * tq * N * H * D
        return projections + 2 * tq * tk * N * (K + H)  # Q K^T and probs @ V

    def feed_forward(t: int) -> int:  # a gated FFN has two input matrices
        return (2 if cfg.ffn == 'relu' else 3) * 2 * t * D * cfg.ffn_dim

    decoder_layer = attention(T, T) + feed_forward(T)
    encoder = 0
    if kind == 'transformer':
        decoder_layer += attention(T, S)
        encoder = cfg.num_layers * (attention(S, S) + feed_forward(S))
    logits = 2 * T * D * cfg.vocab_size
    return encoder + cfg.num_layers * decoder_layer + logits


def summarize(config, length: int | None = None) -> dict:
    """Parameter and FLOP summary of an experiment config (no weights are allocated)."""
    cfg = configs.model_config(config)
    model = nnx.eval_shape(lambda: build_model(config.model_kind, cfg))
    modules = module_params(model)
    length = length or config.data.max_length
    forward = forward_flops(cfg, config.model_kind, length, length)
    return {
        'params': sum(modules.values()),
        'modules': modules,
        'length': length,
        'forward_flops_per_example': forward,
        'forward_flops_per_token': forward / length,
        'train_flops_per_token': 3 * forward / length,
    }


def format_table(summary: dict) -> str:
    width = max(len(name) for name in summary['modules']) + 2
    lines = [f'{"module":{width}s}{"params":>14s}']
    lines += [f'{name:{width}s}{count:>14,d}' for name, count in summary['modules'].items()]
    lines.append(f'{"total":{width}s}{summary["params"]:>14,d}')
    lines.append(
        f'\nFLOPs per target token at length {summary["length"]}: '
        f'forward {summary["forward_flops_per_token"]:.4g}, '
        f'train (3x) {summary["train_flops_per_token"]:.4g}'
    )
    return '\n'.join(lines)


def main(argv):
    del argv
    jax.config.update('jax_platforms', 'cpu')  # shapes only; never touch an accelerator
    summary = summarize(cli.config(), flags.FLAGS.length)
    if flags.FLAGS.json:
        print(json.dumps(summary))  # noqa: T201 - the command's output
    else:
        print(format_table(summary))  # noqa: T201


def run():
    cli.define_config_flag()
    flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
    flags.DEFINE_integer(
        'length', None, 'Source and target length for FLOPs (default: config.data.max_length).'
    )
    cli.run(main)


if __name__ == '__main__':
    run()
