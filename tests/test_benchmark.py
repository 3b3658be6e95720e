"""experiments/benchmark/speed.py: its JSON report and the --compare ratio."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def _speed(*args: str) -> dict:
    """The JSON report of experiments/benchmark/speed.py with `args`."""
    result = subprocess.run(
        [sys.executable, str(ROOT / 'experiments' / 'benchmark' / 'speed.py'), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(result.stdout)


def test_speed_reports_train_and_decode_with_a_baseline_ratio(tmp_path):
    report = _speed(
        '--config=configs/l10n.py:size=tiny',
        '--batch=4',
        '--length=16',
        '--vocab=64',
        '--steps=3',
        '--warmup=1',
        '--runs=1',
        '--decode_batch=2',
        '--peak_tflops=1',
        '--compare=model.dtype=bfloat16,prng_impl=unsafe_rbg',
        '--compare=loss_chunk=8,model.remat=dots',
        f'--profile_dir={tmp_path}',
    )
    train, decode = report['measured']['train'], report['measured']['decode']
    assert train['batch'] == [4, 16] and report['model']['vocab_size'] == 64
    assert train['step_ms_min'] <= train['step_ms'] <= train['step_ms_max']
    assert train['target_tokens_per_s'] == pytest.approx(
        4 * 16 / (train['step_ms'] / 1e3), rel=1e-2
    )
    # --peak_tflops=1 per device: MFU is the TFLOP/s over the devices' total peak.
    assert train['mfu'] == pytest.approx(train['tflops_per_s'] / report['devices'], abs=1e-3)
    assert 0 < train['loss'] < 10
    assert 0.9 < train['xla_flops_vs_formula'] < 3  # XLA also counts softmax, Adam, ...
    assert decode['target_tokens_per_s'] > 0 and decode['beam_size'] == 4
    assert decode['batch'] == [2, 30, 40]
    overrides = ['model.dtype=bfloat16,prng_impl=unsafe_rbg', 'loss_chunk=8,model.remat=dots']
    assert [b['overrides'] for b in report['baselines']] == overrides
    for baseline in report['baselines']:
        expected = baseline['train']['step_ms'] / train['step_ms']
        assert baseline['speedup']['train'] == pytest.approx(expected, abs=1e-3)
    # Chunked loss and remat change the memory, not the loss (same batch, same first steps).
    assert report['baselines'][1]['train']['loss'] == pytest.approx(train['loss'], rel=1e-4)
    summary = subprocess.run(
        [sys.executable, str(ROOT / 'experiments' / 'benchmark' / 'trace_summary.py'), tmp_path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'ms of events' in summary and 'train_step' in summary


def test_speed_needs_no_data_stack():
    """The benchmark runs where only jax, flax, optax and ml_collections are installed
    (an accelerator image without TFDS, Grain or TensorBoard writers)."""
    code = (
        'import sys; sys.argv = ["speed"]; import speed; '
        'print(sorted({m.split(".")[0] for m in sys.modules}))'
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        cwd=ROOT / 'experiments' / 'benchmark',
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loaded = set(ast.literal_eval(out.strip().splitlines()[-1]))
    heavy = {'grain', 'tensorflow_datasets', 'tensorflow', 'array_record', 'tensorboardX'}
    assert loaded & heavy == set(), f'speed.py imports {loaded & heavy}'
    assert 'attn' in loaded and 'optax' in loaded


def test_compile_only_reports_memory_and_the_chunked_loss_holds_less():
    """--steps=0 compiles without running; a chunked loss holds less than [B, T, V]; a
    failing variant does not take the report with it."""
    report = _speed(
        '--config=configs/l10n.py:size=tiny',
        '--what=train',
        '--batch=4',
        '--length=64',
        '--vocab=8192',
        '--steps=0',
        '--compare=loss_chunk=8',
        '--compare=model.num_heads=7',
    )
    plain, chunked = report['measured']['train'], report['baselines'][0]['train']
    assert 'step_ms' not in plain and report['baselines'][0]['speedup'] == {}
    # One float32 [B, T, V] array, per device: the batch is split over the devices.
    logits_gib = 4 * 64 * 8192 * 4 / 2**30 / report['devices']
    assert plain['xla_memory_gib'] - chunked['xla_memory_gib'] > logits_gib
    # A variant that cannot run is reported, and the other measurements are kept.
    assert 'num_heads=7 does not divide' in report['baselines'][1]['error']
