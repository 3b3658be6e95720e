"""CPU decoding throughput of attn, CTranslate2 (float32) and transformers' `generate` on
the same work, measured in one run in interleaved rounds; prints a markdown table.

    python experiments/benchmark/decode_peers.py                  # base and small, 3 rounds
    python experiments/benchmark/decode_peers.py --models=small --searches=greedy --rounds=1 \
        --out=/tmp/peers.json                                     # raw timings as JSON

The work: batch 32 x 30 source tokens (29 fixed random ids, then EOS), exactly 40 target
tokens generated per sentence (EOS suppressed throughout, decoding stopped at 40: 40
decoder steps, no EOS), beam 4 (length penalty alpha 0.6) or greedy, on 2 threads;
target tokens/s = 32 x 40 / seconds, the median of --rounds rounds after an untimed warm-up
(attn compiles there). Each round times attn, CTranslate2 and generate on every (model,
search) cell in turn, so load that comes and goes hits all three alike. Every output is
checked to hold exactly 40 target tokens; a peer that decodes more or less stops the run.

The three decode one model: a randomly initialised attn Transformer (`speed.decode_model`;
base: configs/table3.py:row=base at vocabulary 32,000, small: configs/l10n.py at 8,000)
and its weights as transformers' MarianMTModel and as a CTranslate2 model, both written by
attn's exporter (`attn.export`: the same function up to float round-off), offline. Their
outputs are compared with attn's (`same_as_attn`: the fraction of identical sentences).
Length penalties differ in form (attn ((5 + |Y|) / 6)^alpha, the peers |Y|^alpha), which
does not change the work: every hypothesis has the same forced length.

Threads: torch.set_num_threads, CTranslate2 intra_threads (inter_threads 1), and, where the
process may run on more CPUs than --threads, the process is pinned to --threads of them
(XLA:CPU sizes its pool by the CPUs it may use). Optional dependencies: the `export` extra.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # read when huggingface_hub is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
import speed  # noqa: E402 - experiments/benchmark/speed.py, beside this script
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from attn import cli, configs  # noqa: E402
from attn.errors import UserError  # noqa: E402
from attn.model.tokens import BOS_ID, EOS_ID, NUM_SPECIAL_TOKENS, PAD_ID  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
# name: (config file, its argument, vocabulary): the README's decode table's models.
MODELS = {
    'base': ('configs/table3.py', 'row=base', 32000),
    'small': ('configs/l10n.py', 'size=small', 8000),
}
SEARCHES = {'beam4': 4, 'greedy': 1}  # name: beam size
PEERS = ('attn', 'ct2', 'hf')
PEER_NAMES = {'attn': 'attn', 'ct2': 'CTranslate2 fp32', 'hf': 'transformers generate'}
BATCH, SOURCE_LENGTH, TARGET_LENGTH = 32, speed.SOURCE_LENGTH, speed.TARGET_LENGTH
ALPHA = 0.6  # length penalty exponent of all three (forms differ; lengths are forced)
PAUSE_S = 0.5  # between timed calls: one peer's spinning worker threads settle first
EXTRA_PACKAGES = ('torch', 'transformers', 'safetensors', 'ctranslate2')


def _flags():
    flags.DEFINE_list('models', list(MODELS), f'Models to measure, of {list(MODELS)}.')
    flags.DEFINE_list('searches', list(SEARCHES), f'Searches to measure, of {list(SEARCHES)}.')
    flags.DEFINE_integer('rounds', 3, 'Timed rounds; the median is reported.')
    flags.DEFINE_integer('threads', 2, 'Threads of every peer.')
    flags.DEFINE_string('out', None, 'Write the raw timings (and the table) here as JSON.')


def require_peers() -> None:
    """Raises a one-line UserError naming the first missing optional dependency."""
    import importlib

    for name in EXTRA_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"decode_peers.py needs {name}: pip install -e '.[export]'") from None


def model_config(name: str):
    """The experiment config of one of `MODELS`, at its vocabulary, without dropout."""
    path, arg, vocab = MODELS[name]
    config = configs.load(ROOT / path, arg)
    return configs.set_fields(
        config, {'data.vocab_size': vocab, 'model.vocab_size': vocab, 'model.dropout_rate': 0.0}
    )


def pieces(vocab: int) -> list[str]:
    """CTranslate2's vocabulary: attn's special pieces at their ids, then made-up pieces."""
    from attn.export.weights import SPECIAL_PIECES

    special = [SPECIAL_PIECES[i] for i in range(NUM_SPECIAL_TOKENS)]
    return special + [f'w{i}' for i in range(NUM_SPECIAL_TOKENS, vocab)]


class Peers:
    """One randomly initialised model as attn's, a MarianMTModel and a CTranslate2 model;
    `decode(peer, inputs, beam_size, length)` runs one search, `target_ids` reads it back."""

    def __init__(self, config, *, threads: int):
        import ctranslate2
        import safetensors.numpy
        import torch
        import transformers

        from attn.export import ct2, hf
        from attn.export.weights import marian_tensors

        self.config, self.vocab = config, config.model.vocab_size
        self.attn = speed.decode_model(config, self.vocab)
        tensors = marian_tensors(nnx.to_pure_dict(nnx.state(self.attn, nnx.Param)))
        self.pieces = pieces(self.vocab)
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        with tempfile.TemporaryDirectory() as directory:  # both load into memory
            hf_dir, ct2_dir = os.path.join(directory, 'hf'), os.path.join(directory, 'ct2')
            os.makedirs(hf_dir)
            hf.marian_config(config).save_pretrained(hf_dir)
            safetensors.numpy.save_file(
                tensors, os.path.join(hf_dir, 'model.safetensors'), metadata={'format': 'pt'}
            )
            self.hf = transformers.MarianMTModel.from_pretrained(
                hf_dir, local_files_only=True, dtype=torch.float32
            ).eval()
            ct2.write_ct2(tensors, config, self.pieces, ct2_dir, 'none')
            self.ct2 = ctranslate2.Translator(
                ct2_dir,
                device='cpu',
                compute_type='float32',
                intra_threads=threads,
                inter_threads=1,
            )
        self._torch, self._generation = torch, hf.generation_settings(config)
        self._generation_configs = {}  # (beam size, length) -> GenerationConfig
        self._generation_class = transformers.GenerationConfig

    def prepare(self, peer: str, inputs: np.ndarray):
        """`inputs` [B, S] (rows ending in EOS, unpadded) as `peer` takes them: ids, piece
        strings (CTranslate2) or a torch tensor; made before the clock starts."""
        if peer == 'ct2':
            return [[self.pieces[i] for i in row] for row in inputs.tolist()]
        if peer == 'hf':
            return self._torch.from_numpy(inputs.astype(np.int64))
        return inputs

    def decode(self, peer: str, inputs, beam_size: int, length: int):
        """One search of `prepare`d inputs forced to exactly `length` target tokens (EOS
        suppressed, decoding stopped after `length` steps); the peer's own output."""
        if peer == 'attn':
            # Limit S + extra = length tokens; EOS suppressed before `length`: never produced.
            return speed.search(
                self.attn,
                inputs,
                beam_size=beam_size,
                alpha=ALPHA,
                max_extra_length=length - inputs.shape[1],
                min_length=length,
            )
        if peer == 'ct2':
            return self.ct2.translate_batch(
                inputs,
                beam_size=beam_size,
                length_penalty=ALPHA,
                max_decoding_length=length,
                min_decoding_length=length,
                suppress_sequences=[[self.pieces[PAD_ID]], [self.pieces[BOS_ID]]],  # as attn
                return_scores=False,
            )
        if peer == 'hf':
            with self._torch.inference_mode():
                return self.hf.generate(
                    input_ids=inputs,
                    attention_mask=self._torch.ones_like(inputs),
                    generation_config=self._generation_config(beam_size, length),
                )
        raise ValueError(f'Unknown peer {peer!r}.')

    def _generation_config(self, beam_size: int, length: int):
        """The export's generate settings (start from BOS, PAD and BOS suppressed), with
        alpha and exactly `length` new tokens (EOS suppressed before `length`)."""
        key = (beam_size, length)
        if key not in self._generation_configs:
            settings = dict(self._generation, length_penalty=ALPHA)
            del settings['max_length']
            settings |= dict(
                num_beams=beam_size, do_sample=False, max_new_tokens=length, min_new_tokens=length
            )
            if beam_size == 1:  # beam-only settings: generate warns about them when greedy
                del settings['length_penalty'], settings['early_stopping']
            self._generation_configs[key] = self._generation_class(**settings)
        return self._generation_configs[key]

    def target_ids(self, peer: str, output) -> np.ndarray:
        """[B, T] target ids of a `decode` output, BOS and padding left out (rows of
        different lengths are refused: the work is one length)."""
        if peer == 'attn':
            rows = [row[row != PAD_ID] for row in output]
        elif peer == 'ct2':
            rows = [np.array([self.ids[p] for p in r.hypotheses[0]]) for r in output]
        else:
            tokens = output.numpy()
            if not (tokens[:, 0] == BOS_ID).all():
                raise AssertionError('generate did not start from BOS.')
            rows = [row[row != PAD_ID] for row in tokens[:, 1:]]
        lengths = {len(row) for row in rows}
        if len(lengths) != 1:
            raise AssertionError(f'{peer} decoded rows of lengths {sorted(lengths)}.')
        return np.stack(rows)


def check_length(peer: str, ids: np.ndarray, length: int) -> None:
    """Raises unless every row holds exactly `length` target tokens, none of them EOS."""
    if ids.shape[1] != length or (ids == EOS_ID).any():
        ended = int((ids == EOS_ID).any(axis=1).sum())
        raise AssertionError(
            f'{peer} decoded {ids.shape[1]} tokens per sentence ({ended} rows with EOS), '
            f'not exactly {length}: not the same work.'
        )


def pin_threads(threads: int) -> list[int]:
    """Pins the process to `threads` of the CPUs it may use (before JAX starts its
    backend, so that XLA:CPU sizes its pool to them); returns the CPUs it runs on."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > threads:
        cpus = cpus[:threads]
        os.sched_setaffinity(0, cpus)
    return cpus


def measure(
    model_configs: dict,
    searches,
    *,
    rounds: int,
    threads: int,
    batch: int = BATCH,
    source_length: int = SOURCE_LENGTH,
    target_length: int = TARGET_LENGTH,
    pause_s: float = PAUSE_S,
    log=None,
) -> dict:
    """Warm-up, then `rounds` interleaved rounds over every (model, search) cell of
    `model_configs` ({name: experiment config}) x `searches`; each peer's raw seconds, median
    and target tokens/s per cell. Every output is checked (`check_length`)."""
    import torch

    log = log or _progress
    torch.set_num_threads(threads)
    cells = [(m, s) for m in model_configs for s in searches]
    peers, inputs = {}, {}
    for name, config in model_configs.items():
        start = time.perf_counter()
        peers[name] = Peers(config, threads=threads)
        ids = speed.decode_inputs(batch, config.model.vocab_size, source_length)
        inputs[name] = {peer: peers[name].prepare(peer, ids) for peer in PEERS}
        log(f'# {name}: built and exported in {time.perf_counter() - start:.1f} s')
    # (model, search) -> peer -> measurements
    results = {cell: {peer: {'seconds': []} for peer in PEERS} for cell in cells}

    def run(cell, peer, timed: bool) -> None:
        model, search = cell
        gc.collect()
        time.sleep(pause_s)
        start = time.perf_counter()
        output = peers[model].decode(peer, inputs[model][peer], SEARCHES[search], target_length)
        seconds = time.perf_counter() - start
        ids = peers[model].target_ids(peer, output)
        check_length(peer, ids, target_length)
        entry = results[cell][peer]
        if timed:
            entry['seconds'].append(seconds)
        else:
            entry['warmup_s'], entry['ids'] = seconds, ids

    for cell in cells:
        for peer in PEERS:
            run(cell, peer, timed=False)
        warmups = ', '.join(f'{p} {results[cell][p]["warmup_s"]:.2f} s' for p in PEERS)
        log(f'# warm-up {"/".join(cell)}: {warmups}')
    for r in range(rounds):
        for cell in cells:
            for peer in PEERS:
                run(cell, peer, timed=True)
        log(f'# round {r + 1}/{rounds} done')

    rows = []
    for (model, search), by_peer in results.items():
        reference = by_peer['attn']['ids']
        for peer, entry in by_peer.items():
            median = statistics.median(entry['seconds'])
            rows.append(
                {
                    'model': model,
                    'search': search,
                    'peer': peer,
                    'seconds': [round(s, 6) for s in entry['seconds']],
                    'warmup_s': round(entry['warmup_s'], 6),
                    'median_s': round(median, 6),
                    'target_tokens_per_s': round(batch * target_length / median, 1),
                    'tokens_per_sentence': int(entry['ids'].shape[1]),
                    'same_as_attn': float(np.mean((entry['ids'] == reference).all(axis=1))),
                }
            )
    return {
        'work': {
            'batch': batch,
            'source_tokens': source_length,
            'target_tokens': target_length,
            'beam_sizes': {s: SEARCHES[s] for s in searches},
            'alpha': ALPHA,
            'models': {name: config.model.to_dict() for name, config in model_configs.items()},
        },
        'rounds': rounds,
        'threads': threads,
        'results': rows,
    }


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # noqa: T201 - progress, apart from the table


def table(report: dict) -> str:
    """The markdown table of a `measure` report: target tokens/s per peer, and ratios."""
    by_cell = {}
    for row in report['results']:
        by_cell.setdefault((row['model'], row['search']), {})[row['peer']] = row
    lines = [
        '| model | search | '
        + ' | '.join(PEER_NAMES[p] for p in PEERS)
        + ' | attn / CT2 | attn / HF |',
        '|---|---|' + '---|' * (len(PEERS) + 2),
    ]
    for (model, search), rows in by_cell.items():
        speed_of = {p: rows[p]['target_tokens_per_s'] for p in PEERS}
        lines.append(
            f'| {model} | {search} | '
            + ' | '.join(f'{speed_of[p]:,.0f}' for p in PEERS)
            + f' | {speed_of["attn"] / speed_of["ct2"]:.2f}'
            + f' | {speed_of["attn"] / speed_of["hf"]:.2f} |'
        )
    return '\n'.join(lines)


def _versions() -> dict:
    import ctranslate2
    import torch
    import transformers

    return {
        'python': platform.python_version(),
        'jax': jax.__version__,
        'torch': torch.__version__,
        'transformers': transformers.__version__,
        'ctranslate2': ctranslate2.__version__,
    }


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    for name, known in (('models', MODELS), ('searches', SEARCHES)):
        unknown = [v for v in FLAGS[name].value if v not in known]
        if unknown or not FLAGS[name].value:
            raise UserError(f'--{name}={",".join(FLAGS[name].value)}: choose from {list(known)}.')
    if FLAGS.rounds < 1 or FLAGS.threads < 1:
        raise UserError('--rounds and --threads must be at least 1.')
    require_peers()
    cpus = pin_threads(FLAGS.threads)
    load_before = os.getloadavg()
    model_configs = {name: model_config(name) for name in FLAGS.models}
    report = measure(model_configs, FLAGS.searches, rounds=FLAGS.rounds, threads=FLAGS.threads)
    for name in FLAGS.models:
        report['work']['models'][name]['config'] = ':'.join(MODELS[name][:2])
    report |= {
        'cpus': cpus,
        'machine': platform.processor() or platform.machine(),
        'loadavg_before': [round(x, 2) for x in load_before],
        'loadavg_after': [round(x, 2) for x in os.getloadavg()],
        'versions': _versions(),
    }
    report['table'] = table(report)
    print(  # noqa: T201 - the benchmark's report
        f'Target tokens/s, batch {BATCH} x {SOURCE_LENGTH} source tokens, exactly '
        f'{TARGET_LENGTH} target tokens, {FLAGS.threads} threads, median of {FLAGS.rounds} '
        f'interleaved rounds (load average {report["loadavg_before"][0]} before, '
        f'{report["loadavg_after"][0]} after):\n\n{report["table"]}'
    )
    if FLAGS.out:
        with open(FLAGS.out, 'w', encoding='utf-8') as f:
            json.dump(report, f, indent=1)


if __name__ == '__main__':
    _flags()
    cli.run(main)
