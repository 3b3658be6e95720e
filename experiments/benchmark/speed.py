"""Training-step and decoding throughput of a config on fixed synthetic batches.

    python experiments/benchmark/speed.py --config=configs/table3.py:row=base \
        --config.model.dtype=bfloat16 --peak_tflops=989
    python experiments/benchmark/speed.py --config=configs/table3.py:row=base \
        --compare=model.attention=reference            # ratio against a baseline variant
    python experiments/benchmark/speed.py --config=configs/table3.py:row=base --what=train \
        --steps=0 --batch=8 --length=128 --compare=sharding=fsdp   # memory per device
    python experiments/benchmark/speed.py --config=configs/l10n.py --what=decode --vocab=8000

Train: batches of --batch x --length tokens per side (default 96 x 256, vocabulary 32768,
as ANCHORS.md's peer figures), every token real, dropout and label smoothing as the
config. After --warmup steps, each of --steps steps is timed to completion; the median
is reported with target tokens/s, TFLOP/s by `attn.summary.forward_flops` x 3 (dense
attention, logits included), MFU against --peak_tflops per device, the compile time, XLA's
memory estimate of the step (per device: with `sharding=fsdp` the train state is split
over the devices) and, on an accelerator, the allocator's peak so far; --steps=0
compiles only. Decode: beam search (--beam_size, 1 = greedy) on --decode_batch sentences
of 30 source tokens forced to exactly 40 target tokens; target tokens/s, median of --runs.

--compare=field=value,... (repeatable) measures other variants of the config in the same
process, each under `baselines` with `speedup` = its time / the measured config's time
(> 1: the measured config is faster). Prints one JSON object.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from attn import cli, configs, decoding, summary
from attn.errors import UserError
from attn.model import build_model
from attn.model.tokens import EOS_ID, NUM_SPECIAL_TOKENS
from attn.training import sharding
from attn.training import step as step_lib

_WHAT = flags.DEFINE_list('what', ['train', 'decode'], 'What to measure: train, decode.')
_BATCH = flags.DEFINE_integer('batch', 96, 'Train: examples per step (all devices).')
_LENGTH = flags.DEFINE_integer('length', 256, 'Train: tokens per example, each side.')
_VOCAB = flags.DEFINE_integer('vocab', 32768, 'Vocabulary size (overrides the config).')
_STEPS = flags.DEFINE_integer(
    'steps', 20, 'Train: timed steps; 0 compiles only (memory, FLOPs, compile time).'
)
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Train: untimed steps after compilation.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device (0: no MFU).')
_BEAM = flags.DEFINE_integer('beam_size', 4, 'Decode: beam size; 1 = greedy.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 32, 'Decode: sentences per batch.')
_RUNS = flags.DEFINE_integer('runs', 5, 'Decode: timed runs.')
_PROFILE = flags.DEFINE_string(
    'profile_dir', None, 'Train: also trace 3 steps after the timed ones (jax.profiler) here.'
)
_COMPARE = flags.DEFINE_multi_string(
    'compare',
    [],
    'Baseline overrides, e.g. model.dtype=float32,model.attention=reference; repeat the '
    'flag for several baselines, each measured in this process.',
)

SOURCE_LENGTH, TARGET_LENGTH = 30, 40  # decode shapes of ANCHORS.md's CPU figures


def with_overrides(config, overrides: str | None):
    """A copy of `config` with `a.b=value,...` applied (values parsed as Python literals)."""
    fields = {}
    for item in filter(None, (overrides or '').split(',')):
        path, _, text = item.partition('=')
        try:
            fields[path.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            fields[path.strip()] = text  # a bare string such as bfloat16
    return configs.set_fields(copy.deepcopy(config), fields)


def synthetic_batch(kind: str, rows: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    names = ('targets',) if kind == 'lm' else ('inputs', 'targets')
    return {
        name: rng.integers(NUM_SPECIAL_TOKENS, vocab, (rows, length), np.int32) for name in names
    }


def xla_memory_bytes(compiled) -> int | None:
    """XLA's estimate of the compiled step's memory (arguments, outputs and temporaries),
    known before it runs."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def device_peak_bytes() -> int | None:
    """The allocator's peak on the first device since the process started (GPU/TPU; None
    on CPU). It never goes down, so only the first measurement of a process is its own."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get('peak_bytes_in_use')


def measure_train(config) -> dict:
    cfg = dataclasses.replace(configs.model_config(config), vocab_size=_VOCAB.value)
    mesh = sharding.make_mesh()
    run = step_lib.setup(config, cfg, mesh)
    state, step, rng = run.state, run.train, run.rng
    batch = sharding.global_batch(
        mesh, synthetic_batch(config.model_kind, _BATCH.value, _LENGTH.value, _VOCAB.value)
    )

    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start

    flops = (
        3
        * _BATCH.value
        * summary.forward_flops(cfg, config.model_kind, _LENGTH.value, _LENGTH.value)
    )
    result = {
        'batch': [_BATCH.value, _LENGTH.value],
        'sharding': config.sharding,  # of the train state
        'compile_s': round(compile_s, 2),
        'xla_flops_vs_formula': _xla_flops_ratio(compiled, flops),
        'xla_memory_gib': _gib(xla_memory_bytes(compiled)),
    }
    if not _STEPS.value:  # compiled only: does it fit, and how much does it hold
        return result

    last = {}

    def run():
        nonlocal state
        state, last['metrics'] = compiled(state, batch, rng)
        jax.block_until_ready(last['metrics'])

    _times(run, _WARMUP.value)
    times = _times(run, _STEPS.value)

    if _PROFILE.value:
        with jax.profiler.trace(_PROFILE.value):
            _times(run, 3)

    median = statistics.median(times)
    tflops = flops / median / 1e12
    result |= {
        'step_ms': round(1e3 * median, 2),
        'step_ms_min': round(1e3 * min(times), 2),
        'step_ms_max': round(1e3 * max(times), 2),
        'target_tokens_per_s': round(_BATCH.value * _LENGTH.value / median, 1),
        'tflops_per_s': round(tflops, 3),
        'loss': round(float(last['metrics']['loss']), 4),
        'device_peak_gib': _gib(device_peak_bytes()),
    }
    if _PEAK.value:
        result['mfu'] = round(tflops / (_PEAK.value * jax.device_count()), 4)
    return result


def _times(fn, runs: int) -> list[float]:
    """Wall seconds of each of `runs` calls of `fn` (which waits for its results)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _xla_flops_ratio(compiled, flops: int) -> float | None:
    """XLA's own FLOP count of the compiled step over the analytic count (None if absent).
    XLA counts one device's share of the SPMD program, so it is scaled by the devices."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # one entry per program in some JAX versions
        analysis = analysis[0] if analysis else None
    if not analysis or 'flops' not in analysis:
        return None
    return round(float(analysis['flops']) * jax.device_count() / flops, 3)


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**30, 3)


def decode_model(config, vocab: int):
    """A randomly initialised Transformer of `config`'s sizes at vocabulary `vocab`, without
    dropout: the model every decode measurement searches with."""
    cfg = dataclasses.replace(configs.model_config(config), vocab_size=vocab, dropout_rate=0.0)
    if config.model_kind != 'transformer':
        raise UserError('--what=decode measures the beam search of a translation model.')
    return build_model(config.model_kind, cfg, config.seed)


def decode_inputs(rows: int, vocab: int, length: int = SOURCE_LENGTH) -> np.ndarray:
    """[rows, length] fixed random source ids, each row ending in EOS (no padding)."""
    inputs = synthetic_batch('transformer', rows, length, vocab)['inputs']
    inputs[:, -1] = EOS_ID
    return inputs


def search(
    model, inputs, *, beam_size: int, max_extra_length: int, min_length: int, alpha: float = 0.6
) -> np.ndarray:
    """attn's greedy (beam_size 1) or beam search of `inputs`, waited for: [B, L] ids."""
    if beam_size == 1:
        out = decoding.greedy_search(
            model, inputs, max_extra_length=max_extra_length, min_length=min_length
        )
    else:
        out, _ = decoding.beam_search(
            model,
            inputs,
            beam_size=beam_size,
            alpha=alpha,
            max_extra_length=max_extra_length,
            min_length=min_length,
        )
    return np.asarray(jax.block_until_ready(out))


def kv_cache_bytes(model, inputs, beam_size: int, max_extra_length: int) -> int:
    """Bytes of every decoder layer's caches in the search of `inputs`: the self-attention
    caches at their full length (source + extra positions x beam entries) and the projected
    source (shapes only: nothing is computed)."""
    length = inputs.shape[1] + max_extra_length
    caches = jax.eval_shape(
        lambda: model.init_cache(jnp.asarray(inputs), length, width=max(beam_size, 1))
    )
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches))


def measure_decode(config) -> dict:
    model = decode_model(config, _VOCAB.value)
    rows = _DECODE_BATCH.value
    inputs = decode_inputs(rows, _VOCAB.value)
    extra = TARGET_LENGTH - SOURCE_LENGTH + 1  # room for exactly TARGET_LENGTH tokens

    last = {}

    def run() -> None:
        last['out'] = search(
            model,
            inputs,
            beam_size=_BEAM.value,
            max_extra_length=extra,
            min_length=TARGET_LENGTH,
        )

    first = _times(run, 1)[0]  # compiles
    times = _times(run, _RUNS.value)
    out = last['out']
    median = statistics.median(times)
    tokens = int(((out != 0) & (out != EOS_ID)).sum())  # EOS not counted
    return {
        'beam_size': _BEAM.value,
        'batch': [rows, SOURCE_LENGTH, TARGET_LENGTH],
        'kv_cache_mib': round(kv_cache_bytes(model, inputs, _BEAM.value, extra) / 2**20, 2),
        'median_s': round(median, 4),
        'target_tokens_per_s': round(tokens / median, 1),
        'sentences_per_s': round(rows / median, 2),
        'compile_s': round(first - median, 2),
    }


def measure(config) -> dict:
    result = {}
    if 'train' in _WHAT.value:
        result['train'] = measure_train(config)
    if 'decode' in _WHAT.value:
        result['decode'] = measure_decode(config)
    return result


def _baseline(config, overrides: str, measured: dict) -> dict:
    """A variant's measurements and `speedup` = its time / the measured config's time; a
    variant that fails (out of memory, say) is reported as such, not fatal."""
    try:
        baseline = {'overrides': overrides} | measure(with_overrides(config, overrides))
    except Exception as error:  # noqa: BLE001 - the other measurements are kept
        return {'overrides': overrides, 'error': f'{type(error).__name__}: {error}'[:500]}
    baseline['speedup'] = {
        part: round(baseline[part][key] / measured[part][key], 3)
        for part, key in (('train', 'step_ms'), ('decode', 'median_s'))
        if key in measured.get(part, {})
    }
    return baseline


def main(argv):
    del argv
    config = cli.config()
    report = {
        'model': configs.model_config(config).__dict__ | {'vocab_size': _VOCAB.value},
        'devices': jax.device_count(),
        'device': jax.devices()[0].device_kind,
        'measured': measure(config),
    }
    report['baselines'] = [
        _baseline(config, overrides, report['measured']) for overrides in _COMPARE.value
    ]
    print(json.dumps(report, indent=1))  # noqa: T201 - the benchmark's report


if __name__ == '__main__':
    cli.define_config_flag()
    cli.run(main)
