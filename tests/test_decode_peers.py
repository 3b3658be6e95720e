"""experiments/benchmark/decode_peers.py: attn, CTranslate2 and generate do the same work
(exactly the forced number of target tokens, from one model), and its report adds up."""

import json
import pathlib
import subprocess
import sys

import pytest

for package in ('torch', 'transformers', 'safetensors', 'ctranslate2'):
    pytest.importorskip(package)

ROOT = pathlib.Path(__file__).parent.parent
BATCH, SOURCE, TARGET = 2, 5, 7

# Runs beside the script (it imports speed.py from there), in its own process: both
# scripts define absl flags at import.
CODE = f"""
import json
import numpy as np
import decode_peers as dp, speed
from attn import configs
from attn.model.tokens import BOS_ID, EOS_ID, PAD_ID

config = configs.set_fields(configs.base_config('tiny'), {{
    'data.vocab_size': 64, 'model.vocab_size': 64, 'model.num_layers': 1,
    'model.dropout_rate': 0.0}})
peers = dp.Peers(config, threads=1)
inputs = speed.decode_inputs({BATCH}, 64, {SOURCE})
raw = {{}}
for search, beam in dp.SEARCHES.items():
    out = {{p: peers.decode(p, peers.prepare(p, inputs), beam, {TARGET}) for p in dp.PEERS}}
    hf = out['hf'].numpy()
    raw[search] = {{
        # attn: [B, L] ids without BOS; PAD after EOS (none here)
        'attn': [[int(t) for t in row if t not in (PAD_ID, EOS_ID)] for row in out['attn']],
        'attn_width': out['attn'].shape[1],
        'ct2': [[peers.ids[p] for p in r.hypotheses[0]] for r in out['ct2']],
        # generate: [B, 1 + T], the decoder's start (BOS) first
        'hf': [[int(t) for t in row[1:] if t not in (PAD_ID, EOS_ID)] for row in hf],
        'hf_width': hf.shape[1],
        'hf_start': sorted(set(hf[:, 0].tolist())),
    }}
report = dp.measure({{'tiny': config}}, list(dp.SEARCHES), rounds=1, threads=1,
                    batch={BATCH}, source_length={SOURCE}, target_length={TARGET},
                    pause_s=0, log=lambda line: None)
print(json.dumps({{'raw': raw, 'report': report, 'table': dp.table(report)}}))
"""


@pytest.fixture(scope='module')
def tiny():
    result = subprocess.run(
        [sys.executable, '-c', CODE],
        cwd=ROOT / 'experiments' / 'benchmark',
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_peer_decodes_exactly_the_forced_length_from_one_model(tiny):
    for search, raw in tiny['raw'].items():
        assert raw['attn_width'] == TARGET and raw['hf_width'] == 1 + TARGET
        assert raw['hf_start'] == [2]  # BOS, as attn's decoder starts
        for peer in ('attn', 'ct2', 'hf'):  # EOS and PAD left out above: none were there
            assert [len(row) for row in raw[peer]] == [TARGET] * BATCH, (search, peer)
    # One function: greedy search gives the same tokens in all three.
    greedy = tiny['raw']['greedy']
    assert greedy['ct2'] == greedy['attn'] and greedy['hf'] == greedy['attn']


def test_report_counts_the_forced_tokens_per_second(tiny):
    rows = tiny['report']['results']
    assert [(r['search'], r['peer']) for r in rows] == [
        (search, peer) for search in ('beam4', 'greedy') for peer in ('attn', 'ct2', 'hf')
    ]
    for row in rows:
        assert row['tokens_per_sentence'] == TARGET and len(row['seconds']) == 1
        assert row['target_tokens_per_s'] == pytest.approx(
            BATCH * TARGET / row['median_s'], rel=1e-2
        )
        if row['search'] == 'greedy':
            assert row['same_as_attn'] == 1.0
    table = tiny['table'].splitlines()
    assert len(table) == 2 + 2 and table[2].startswith('| tiny | beam4 | ')
