"""Per-token log-probabilities of given translations (or text) under a trained model: the
training loss's cross-entropy without label smoothing or dropout (`attn.score`)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn import rundir
from attn.data import datasets
from attn.errors import UserError
from attn.inference import text
from attn.model.tokens import PAD_ID
from attn.training import distributed, sharding
from attn.training import step as step_lib

GIVEN = 'given'  # the split name of sentences read from files


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(y_t | y_<t, x) = logit(y_t) - logsumexp(logits), in float32: minus the
    per-token 'nll' that `step.cross_entropy` sums.

    Args:
      logits: [B, T, V] (any float dtype).
      targets: [B, T] int.
    Returns:
      [B, T] float32.
    """
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)  # [B, T]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_logprobs(graphdef, kind: str, params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    logits = step_lib.forward(model, batch, kind, deterministic=True, rngs=None)  # [B, T, V]
    return token_logprobs(logits, batch['targets']) * step_lib.target_weights(batch)  # [B, T]


def batch_logprobs(run: rundir.Run, batch: dict[str, np.ndarray]) -> np.ndarray:
    """[B, T] float32 log-probability of each target token of this host's rows, 0 at padding.

    Args:
      batch: 'targets' [B, T] ids ending in EOS, right-padded, and for a translation model
        'inputs' [B, S]; optionally their *_segmentation and *_position (`eval_batches`).
        B is a multiple of this host's devices; an 'index' is ignored.
    """
    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
    batch = sharding.global_batch(run.mesh, {k: v for k, v in batch.items() if k != 'index'})
    logprobs = _batch_logprobs(graphdef, run.config.model_kind, params, rest, batch)
    return sharding.host_rows(run.mesh, logprobs)


def score_split(run: rundir.Run, data: datasets.Data, split: str) -> Iterator[dict]:
    """One record per example of `data.splits[split]`, in order, on every process (each
    scores its rows of every batch; the rows are then gathered)."""
    examples = data.splits[split]
    for batch in data.eval_batches(run.config, split):
        logprobs = distributed.gather_rows(batch_logprobs(run, batch))  # [B, T]
        targets = distributed.gather_rows(batch['targets'])  # [B, T]
        indices = distributed.gather_rows(batch['index'])  # [B]
        for index, ids, row in zip(indices, targets, logprobs, strict=True):
            if index >= 0:
                yield record(data, examples[index], int(index), ids, row)


def record(data: datasets.Data, example: dict, index: int, ids: np.ndarray, logprobs) -> dict:
    """The JSON object of one sentence: `ids` [T] its target ids (EOS, then PAD) and
    `logprobs` [T] theirs."""
    count = int((ids != PAD_ID).sum())
    values = [_float32(x) for x in logprobs[:count]]
    roles = ('source', 'target')[-len(data.features) :]
    texts = {role: datasets.text(example[f]) for role, f in zip(roles, data.features, strict=True)}
    return {
        'index': index,
        **texts,
        'tokens': [data.tokenizer.id_to_piece(i) for i in ids[:count]],
        'token_logprobs': values,
        'logprob': _float32(sum(values)),
        'num_tokens': count,
    }


def _float32(x) -> float:
    """`x` as the shortest decimal that reads back as the same float32 (-9.595732, not
    -9.595731735229492)."""
    return float(str(np.float32(x)))


def read_file(path: str) -> list[str]:
    """The lines of a UTF-8 file, without their newlines."""
    try:
        with open(path, 'rb') as f:
            return list(text.read_lines(f))
    except OSError as error:
        raise UserError(f'Cannot read {path}: {error.strerror}.') from None
    except UserError as error:
        raise UserError(f'{path}: {error}') from None


def given_examples(
    features: tuple[str, ...], source: str | None, target: str | None
) -> list[dict[str, str]]:
    """Examples {feature: text} of the lines of the `source` and `target` files; `features`
    (`datasets.features`) are (source, target) for translation, (text,) for an LM."""
    if target is None:
        raise UserError('Give --target=FILE (one sentence per line), or --split=NAME.')
    if len(features) == 1:
        if source is not None:
            raise UserError(
                f'--source={source}: this is a language model; give its text as --target only.'
            )
        return [{features[0]: line} for line in read_file(target)]
    if source is None:
        raise UserError(f'--target={target} needs --source=FILE: this is a translation model.')
    sources, targets = read_file(source), read_file(target)
    if len(sources) != len(targets):
        raise UserError(
            f'--source={source} has {len(sources)} lines but --target={target} has '
            f'{len(targets)}: give one translation per source line.'
        )
    return [dict(zip(features, pair, strict=True)) for pair in zip(sources, targets, strict=True)]


def open_data(
    workdir: str, config, split: str | None, source: str | None, target: str | None
) -> tuple[datasets.Data, str]:
    """(Data, split name): `split` of the run's dataset, or the given files as split GIVEN
    with the tokenizer of workdir (`rundir.tokenizer`: no dataset needed). `config`: the
    run's."""
    if split is not None:
        if source is not None or target is not None:
            raise UserError('Give either --split or --source/--target files, not both.')
        return datasets.load(config, [split]), split
    features = datasets.features(config)
    examples = given_examples(features, source, target)
    tokenizer = rundir.tokenizer(workdir, config)
    return datasets.Data(tokenizer, features, {GIVEN: examples}), GIVEN


def output(path: str | None):
    """Where the lines go: `path` (default stdout) on process 0, nowhere elsewhere."""
    if not distributed.is_main():
        return open(os.devnull, 'w')  # noqa: SIM115 - closed by the caller's `with`
    if path is None:
        return contextlib.nullcontext(sys.stdout)
    try:
        return open(path, 'w', encoding='utf-8')  # noqa: SIM115 - closed by the caller's `with`
    except OSError as error:
        raise UserError(f'Cannot write --out={path}: {error.strerror}.') from None
