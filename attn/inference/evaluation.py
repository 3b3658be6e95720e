"""BLEU and perplexity of a trained model on a whole split, and the reports that record them
(`attn.evaluate`; periodic and final BLEU in training)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from attn import compilation, decoding, rundir
from attn.data import datasets
from attn.errors import UserError
from attn.inference import batching, bleu, text
from attn.training import distributed
from attn.training import step as step_lib


def perplexity(run: rundir.Run, data: datasets.Data, split: str) -> dict[str, float]:
    """Teacher-forced loss and perplexity over every example of `split`."""
    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
    config = run.config
    cfg = step_lib.StepConfig(
        config.model_kind, config.label_smoothing, loss_chunk=config.loss_chunk
    )
    eval_step = jax.jit(
        functools.partial(step_lib.eval_step, graphdef=graphdef, rest=rest, cfg=cfg)
    )
    return step_lib.evaluate_loss(eval_step, params, data.eval_batches(config, split), run.mesh)


def translate_split(
    model,
    config,
    data: datasets.Data,
    split: str,
    *,
    beam_size: int,
    alpha: float,
    mesh,
    nbest: int = 0,
    attention: list | None = None,
) -> tuple[list[str], int, list[list[dict]]]:
    """Detokenized translations of every example of `data.splits[split]`, in order, the
    number of target tokens generated (EOS included) and, with `nbest` K, each example's
    K best hypotheses (`text.nbest_list`; else []). The translations are the 1-best.
    Given a list `attention`, appends to it the encoder-decoder attention statistics of the
    translations, gathered inside the search (`attention_report`).

    Data-parallel over `mesh`: each process decodes its rows of each batch over the
    devices, then every process gathers all rows, so each holds the whole split. Batches
    are of like source length (`pipeline.length_order`): a batch's search runs until its
    longest translation ends."""
    translations: dict[int, str] = {}
    lists: dict[int, list[dict]] = {}
    generated = 0
    sums = 0.0  # [layers, N, 2] over every translation's positions
    for batch in data.eval_batches(config, split, by_length=True):
        found = batching.translate(
            model,
            batch['inputs'],
            beam_size=beam_size,
            alpha=alpha,
            max_extra_length=config.decode.max_extra_length,
            mesh=mesh,
            nbest=nbest,
            attention_stats=attention is not None,
        )
        indices = distributed.gather_rows(batch['index'])
        if attention is not None:
            found, per_row = found
            sums = sums + distributed.gather_rows(per_row)[indices >= 0].sum(0)
        if nbest:
            found = decoding.Hypotheses(*(distributed.gather_rows(x) for x in found))
        tokens = found.tokens[:, 0] if nbest else distributed.gather_rows(found)
        for row, (index, best) in enumerate(zip(indices, tokens, strict=True)):
            if index >= 0:
                translations[int(index)] = data.tokenizer.decode(best)
                generated += decoding.output_length(best)
                if nbest:
                    lists[int(index)] = text.nbest_list(data.tokenizer, found, row)
    hypotheses = [translations[i] for i in range(len(translations))]
    if attention is not None:
        attention.append(attention_report(np.asarray(sums), generated))
    return hypotheses, generated, [lists[i] for i in range(len(lists))]


def attention_report(sums: np.ndarray, tokens: int) -> dict:
    """Mean entropy (nats) and peak weight (EOS left out) of every decoder layer's and head's
    encoder-decoder attention over `tokens` translated positions, from their sums
    [layers, N, 2]: {'tokens', 'layers': [per layer [per head {'entropy', 'peak_weight'}]]}."""
    means = sums / max(tokens, 1)
    return {
        'tokens': int(tokens),
        'layers': [
            [{'entropy': float(e), 'peak_weight': float(p)} for e, p in layer] for layer in means
        ],
    }


def sample_bleu(model, config, data: datasets.Data, split: str, examples: int, mesh) -> float:
    """sacreBLEU of the first `examples` of a split, with the config's beam search (for
    monitoring during training)."""
    source = data.splits[split]
    sample = [source[i] for i in range(min(examples, len(source)))]
    subset = datasets.Data(data.tokenizer, data.features, {split: sample})
    hypotheses, _, _ = translate_split(
        model,
        config,
        subset,
        split,
        beam_size=config.decode.beam_size,
        alpha=config.decode.alpha,
        mesh=mesh,
    )
    return bleu.sacre_bleu(hypotheses, references(subset, split))['bleu']


def references(data: datasets.Data, split: str) -> list[str]:
    source, target = data.splits[split], data.features[-1]
    return [datasets.text(source[i][target]) for i in range(len(source))]


def evaluate(
    workdir: str,
    *,
    split: str = 'test',
    average_last: int = 1,
    step: int | str | None = None,
    beam_size: int | None = None,
    alpha: float | None = None,
    data: datasets.Data | None = None,
    nbest: int = 0,
    attention_stats: bool = False,
) -> dict:
    """Scores a checkpoint (or an average of the last few) on a split; writes the report,
    and with `nbest` K each example's K best hypotheses beside it (<name>.nbest.jsonl).

    `data` defaults to the run's dataset (`datasets.load` of its saved config). With
    `attention_stats`, the mean entropy and peak weight of every encoder-decoder head along
    the translations, gathered inside the beam search, go beside it (<name>.attention.json).
    """
    start, compiled_before = time.perf_counter(), compilation.seconds()
    run = rundir.load(workdir, step=step, average_last=average_last)
    config = run.config
    beam_size = beam_size or config.decode.beam_size
    if nbest and config.model_kind != 'transformer':
        raise UserError('--nbest lists translations; a language model has none (drop --nbest).')
    batching.check_nbest(nbest, beam_size)
    data = data or datasets.load(config, [split])
    report = {
        'workdir': os.path.abspath(workdir),
        'split': split,
        'examples': len(data.splits[split]),
        'checkpoint_steps': run.steps,
    }
    report |= perplexity(run, data, split)
    lists, attention = [], [] if attention_stats else None
    if attention_stats and config.model_kind != 'transformer':
        raise UserError(
            '--attention_stats are of encoder-decoder attention: a language model has none.'
        )
    if config.model_kind == 'transformer':
        alpha = config.decode.alpha if alpha is None else alpha
        decode_start, compile_start = time.perf_counter(), compilation.seconds()
        hypotheses, generated, lists = translate_split(
            run.model,
            config,
            data,
            split,
            beam_size=beam_size,
            alpha=alpha,
            mesh=run.mesh,
            nbest=nbest,
            attention=attention,
        )
        seconds = time.perf_counter() - decode_start
        refs = references(data, split)
        report['decode'] = {
            'beam_size': beam_size,
            'alpha': alpha,
            'max_extra_length': config.decode.max_extra_length,
            'seconds': round(seconds, 2),
            'compile_seconds': round(compilation.seconds() - compile_start, 2),
            'target_tokens_per_s': round(generated / seconds, 1),
            'sentences_per_s': round(len(hypotheses) / seconds, 2),
        }
        report['sacrebleu'] = bleu.sacre_bleu(hypotheses, refs)
        report['paper_bleu'] = bleu.paper_bleu(hypotheses, refs, config.data.target_lang)
        pairs = zip(hypotheses[:5], refs[:5], strict=True)
        report['samples'] = [{'reference': r, 'translation': h} for h, r in pairs]
    report['seconds'] = round(time.perf_counter() - start, 2)
    report['compile_seconds'] = round(compilation.seconds() - compiled_before, 2)
    search = (beam_size, alpha) if config.model_kind == 'transformer' else None
    name = rundir.report_name(split, run.steps, search)
    if nbest:
        report['nbest'] = {'k': nbest, 'file': os.path.join(rundir.EVAL_DIR, f'{name}.nbest.jsonl')}
    if attention_stats:
        report['attention'] = {'file': os.path.join(rundir.EVAL_DIR, f'{name}.attention.json')}
    if distributed.is_main():
        write_report(workdir, report, name)
        if attention_stats:
            content = json.dumps(attention[0], indent=1)
            _write_eval_file(workdir, f'{name}.attention.json', content, 'the attention statistics')
        if config.model_kind == 'transformer':
            write_translations(workdir, hypotheses, name)
        if nbest:
            write_nbest(workdir, data.splits[split], data.features[0], lists, name)
    return report


def write_nbest(workdir: str, examples, source_feature: str, lists, name: str) -> str | None:
    """W/eval/<name>.nbest.jsonl: per example, in order, {"index", "source", "nbest"}."""
    lines = (
        json.dumps(
            {'index': i, 'source': datasets.text(examples[i][source_feature]), 'nbest': hypotheses},
            ensure_ascii=False,
        )
        + '\n'
        for i, hypotheses in enumerate(lists)
    )
    return _write_eval_file(workdir, f'{name}.nbest.jsonl', ''.join(lines), 'the n-best lists')


def write_translations(workdir: str, hypotheses: list[str], name: str) -> str | None:
    """W/eval/<name>.txt: the 1-best translation of every example, one per line, in order
    (what `attn.compare` tests against another run's)."""
    content = ''.join(line + '\n' for line in hypotheses)
    return _write_eval_file(workdir, f'{name}.txt', content, 'the translations')


def read_translations(workdir: str, name: str, examples: int) -> list[str] | None:
    """The translations `write_translations` wrote for `name`, or None when there are none
    (or not one per example: another split's, or cut short)."""
    path = os.path.join(workdir, rundir.EVAL_DIR, f'{name}.txt')
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().split('\n')
    except OSError:
        return None
    return lines[:-1] if len(lines) == examples + 1 and lines[-1] == '' else None


def write_report(workdir: str, report: dict, name: str) -> str | None:
    """Writes W/eval/<name>.json; its path, or None (after a warning naming it) when it
    cannot be written: the report is printed all the same."""
    content = json.dumps(report, indent=1, ensure_ascii=False)
    return _write_eval_file(workdir, f'{name}.json', content, 'the report')


def _write_eval_file(workdir: str, filename: str, content: str, what: str) -> str | None:
    """Writes W/eval/<filename>; its path, or None after a warning naming it. A file left
    half-written (a full disk) is removed: it would read as a result."""
    path = os.path.join(workdir, rundir.EVAL_DIR, filename)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(content)
    except OSError as error:
        logging.warning('Cannot write %s to %s (%s); the report is printed.', what, path, error)
        with contextlib.suppress(OSError):
            os.remove(path)
        return None
    return path
