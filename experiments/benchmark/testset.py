"""Real work: a trained run's test set through attn.translate, CTranslate2 (float32 and int8)
and transformers' `generate`, each as one whole process, in interleaved rounds; prints a
markdown table.

    python experiments/benchmark/testset.py --workdir=runs/l10n              # 3 rounds
    python experiments/benchmark/testset.py --workdir=runs/l10n --tools=attn,ct2 --rounds=1

The run is exported once (`attn.export --format=both`) and its test split written as
source and reference files. Every tool translates the same source lines with beam 4, length
penalty 0.6 (attn's is GNMT's ((5 + |Y|) / 6)^alpha, CTranslate2's and transformers' |Y|^alpha:
the BLEU column compares the settings as users run them, not the models), batches of 32
sentences (CTranslate2 sorts them by length itself; attn does, within windows of 16 batches;
transformers takes them in input order), at most source + 50 target tokens, on --threads
threads. Per tool and round:

- whole: the process's wall time, start-up to exit, as users run it. attn is the real
  `python -m attn.translate`, once with an empty compilation cache (cold) and once with the
  cache that run filled (warm); the peers are a short script around their library.
- decode: seconds of the translation loop alone, inside the process (attn: a second pass
  over the lines in the same process, after a first that compiled or loaded its programs).
- target tokens/s: SentencePiece pieces of the output (+1 per sentence for EOS) over decode.

The table gives the median over rounds, sacreBLEU of each output against the references, and
the share of lines identical to attn's. Needs the `export` extra.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
TOOLS = ('attn', 'ct2', 'ct2_int8', 'hf')
NAMES = {
    'attn': 'attn',
    'ct2': 'CTranslate2 fp32',
    'ct2_int8': 'CTranslate2 int8',
    'hf': 'transformers generate',
}
BATCH, BEAM, ALPHA, EXTRA = 32, 4, 0.6, 50

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run (the quickstart: runs/l10n).')
_TOOLS = flags.DEFINE_list('tools', list(TOOLS), f'Tools to time, of {list(TOOLS)}.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds; the median is reported.')
_THREADS = flags.DEFINE_integer('threads', 2, 'Threads of every tool.')
_OUT = flags.DEFINE_string('out', None, 'Also write the raw timings and the table as JSON.')
_BASELINE = flags.DEFINE_string(
    'baseline',
    None,
    'Also time `python -m attn.translate` of this checkout (e.g. an older commit).',
)
_ROLE = flags.DEFINE_string('role', None, 'Internal: run one tool on stdin and report.')
_EXPORT = flags.DEFINE_string('export', None, 'Internal: the exported run.')


# ----------------------------------------------------------------------------- the tools


def _peer(role: str, lines: list[str], workdir: str, export: str, threads: int) -> list[str]:
    """A peer's translations of `lines` (timed around the translation loop)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=f'{workdir}/tokenizer/spm.model')
    pieces = [sp.encode(line, out_type=str) + ['</s>'] for line in lines]
    limit = max(len(p) for p in pieces) + EXTRA
    if role.startswith('ct2'):
        import ctranslate2

        translator = ctranslate2.Translator(
            f'{export}/ct2',
            compute_type='int8' if role == 'ct2_int8' else 'float32',
            intra_threads=threads,
            inter_threads=1,
        )
        start = time.perf_counter()
        results = translator.translate_batch(
            pieces,
            max_batch_size=BATCH,
            beam_size=BEAM,
            length_penalty=ALPHA,
            max_decoding_length=limit,
            min_decoding_length=0,
        )
        out = [sp.decode(r.hypotheses[0]) for r in results]
    else:
        import torch
        import transformers

        torch.set_num_threads(threads)
        tokenizer = transformers.MarianTokenizer.from_pretrained(f'{export}/hf')
        model = transformers.MarianMTModel.from_pretrained(f'{export}/hf').eval()
        start, out = time.perf_counter(), []
        with torch.inference_mode():
            for i in range(0, len(lines), BATCH):
                batch = tokenizer(lines[i : i + BATCH], return_tensors='pt', padding=True)
                generated = model.generate(
                    **batch, num_beams=BEAM, length_penalty=ALPHA, max_new_tokens=limit
                )
                out += tokenizer.batch_decode(generated, skip_special_tokens=True)
    _report(time.perf_counter() - start)
    return out


def _attn(lines: list[str], workdir: str) -> list[str]:
    """attn.translate's own loop, twice: the second pass is timed."""
    from attn import compilation, rundir
    from attn.inference import text

    run = rundir.load(workdir)
    tokenizer = rundir.tokenizer(workdir, run.config)
    settings = dict(
        batch_size=BATCH, beam_size=BEAM, alpha=ALPHA, max_input_tokens=run.config.data.max_length
    )
    compiled = compilation.seconds()
    list(text.translate_lines(run, tokenizer, lines, **settings))
    compiled = compilation.seconds() - compiled
    start = time.perf_counter()
    out = list(text.translate_lines(run, tokenizer, lines, **settings))
    _report(time.perf_counter() - start, compile_seconds=compiled)
    return out


def _report(seconds: float, **extra) -> None:
    sys.stderr.write('DECODE ' + json.dumps({'seconds': seconds, **extra}) + '\n')


def _worker() -> None:
    """--role: one tool over stdin's lines, translations on stdout, timing on stderr."""
    lines = sys.stdin.read().splitlines()
    if _ROLE.value == 'attn':
        from attn import compilation

        compilation.use_cache()
        out = _attn(lines, _WORKDIR.value)
    else:
        out = _peer(_ROLE.value, lines, _WORKDIR.value, _EXPORT.value, _THREADS.value)
    sys.stdout.write(''.join(line + '\n' for line in out))


# ----------------------------------------------------------------------------- the harness


def _prepare(workdir: str, directory: str) -> tuple[str, list[str], list[str]]:
    """(export directory, test sources, references) of the run."""
    from attn import configs, rundir
    from attn.data import datasets

    export = os.path.join(directory, 'export')
    subprocess.run(
        [sys.executable, '-m', 'attn.export', f'--workdir={workdir}', f'--out={export}']
        + ['--format=both'],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    config = configs.upgrade(rundir.saved_config(workdir))
    data = datasets.load(config, ['test'])
    source, target = data.features
    test = [data.splits['test'][i] for i in range(len(data.splits['test']))]
    return (
        export,
        [datasets.text(x[source]) for x in test],
        [datasets.text(x[target]) for x in test],
    )


def _timed(command: list[str], lines: list[str], env: dict, cwd=ROOT) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        command,
        input=''.join(line + '\n' for line in lines),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
    )
    whole = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f'{command[:4]} failed:\n{done.stderr[-3000:]}')
    decode = [json.loads(x[7:]) for x in done.stderr.splitlines() if x.startswith('DECODE ')]
    return {
        'whole': whole,
        'decode': decode[0] if decode else None,
        'out': done.stdout.splitlines(),
    }


def _round(tools, workdir, export, lines, threads, env) -> dict:
    """Every tool once, in turn."""
    here = [sys.executable, str(pathlib.Path(__file__).resolve())]
    common = [f'--workdir={workdir}', f'--export={export}', f'--threads={threads}']
    times = {}
    for tool in tools:
        if tool == 'attn':
            with tempfile.TemporaryDirectory() as cache:
                cached = env | {'ATTN_COMPILATION_CACHE': cache}
                translate = [sys.executable, '-m', 'attn.translate', f'--workdir={workdir}']
                translate += [f'--batch_size={BATCH}', f'--beam_size={BEAM}', f'--alpha={ALPHA}']
                times['attn_cold'] = _timed(translate, lines, cached)
                times['attn_warm'] = _timed(translate, lines, cached)
                times['attn'] = _timed([*here, '--role=attn', *common], lines, cached)
            if _BASELINE.value:  # its own cache, if it has one: cold
                with tempfile.TemporaryDirectory() as cache:
                    cached = env | {'ATTN_COMPILATION_CACHE': cache}
                    times['baseline'] = _timed(translate, lines, cached, cwd=_BASELINE.value)
        else:
            times[tool] = _timed([*here, f'--role={tool}', *common], lines, env)
    return times


def _table(rounds: list[dict], refs: list[str]) -> list[str]:
    import sacrebleu

    from attn.data import tokenizer as tokenizer_lib

    tokenizer = tokenizer_lib.Tokenizer.load(f'{_WORKDIR.value}/tokenizer')
    reference = rounds[0]['attn']['out']
    lines = [
        '| tool | whole s (cold) | whole s (warm) | decode s | target tok/s | sacreBLEU | '
        'same as attn |',
        '|---|---|---|---|---|---|---|',
    ]
    for tool in rounds[0]:
        if tool in ('attn_cold', 'attn_warm'):
            continue
        out = rounds[0][tool]['out']
        bleu = sacrebleu.corpus_bleu(out, [refs]).score
        same = sum(a == b for a, b in zip(out, reference, strict=True)) / len(out)
        if tool == 'baseline':  # the whole process only
            whole = statistics.median(r[tool]['whole'] for r in rounds)
            lines.append(
                f'| attn at --baseline | {whole:.1f} | — | — | — | {bleu:.2f} | {same:.3f} |'
            )
            continue
        tokens = sum(len(tokenizer.encode(line)) for line in out)  # pieces + EOS
        decode = statistics.median(r[tool]['decode']['seconds'] for r in rounds)
        if tool == 'attn':
            cold = statistics.median(r['attn_cold']['whole'] for r in rounds)
            warm = statistics.median(r['attn_warm']['whole'] for r in rounds)
        else:
            cold = warm = statistics.median(r[tool]['whole'] for r in rounds)
        lines.append(
            f'| {NAMES[tool]} | {cold:.1f} | {warm:.1f} | {decode:.1f} | {tokens / decode:,.0f} '
            f'| {bleu:.2f} | {same:.3f} |'
        )
    return lines


def main(argv):
    del argv
    if _ROLE.value:
        return _worker()
    if _WORKDIR.value is None:
        raise app.UsageError('--workdir is required: a trained run, e.g. runs/l10n.')
    unknown = set(_TOOLS.value) - set(TOOLS)
    if unknown:
        raise app.UsageError(f'--tools: {sorted(unknown)} are not of {list(TOOLS)}.')
    workdir = os.path.abspath(_WORKDIR.value)
    env = dict(os.environ, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    with tempfile.TemporaryDirectory() as directory:
        export, sources, refs = _prepare(workdir, directory)
        rounds = [
            _round(_TOOLS.value, workdir, export, sources, _THREADS.value, env)
            for _ in range(_ROUNDS.value)
        ]
    table = _table(rounds, refs)
    print('\n'.join(table))  # noqa: T201 - the benchmark's output
    if _OUT.value:
        raw = [
            {t: {k: v for k, v in r.items() if k != 'out'} for t, r in x.items()} for x in rounds
        ]
        with open(_OUT.value, 'w', encoding='utf-8') as f:
            json.dump({'rounds': raw, 'table': table, 'sentences': len(sources)}, f, indent=1)


if __name__ == '__main__':
    app.run(main)
